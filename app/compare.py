"""Compare mode: the same prompt through two methods, timed honestly, then shown side by side.

How the timing stays honest: the two runs never share the machine. After a short warm-up of each
method (so neither pays one-time start-up costs), method A runs alone, then method B runs alone, each
streaming live into its own pane while it runs. Their speeds are the engine's own measurements (new
tokens over wall time, prefill included). Then both runs are replayed side by side, each cycle appearing
at the moment it was produced in its own run, so the panes race at their measured speeds.

Pure functions over event lists, plus `measure`, which drives the engine through `app.pump`.
"""

import html
import os.path
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from app.pump import pump
from app.reply import Piece, pieces_from_cycle, render_tinted
from app.stats import method_label, speedup_line, stats_line
from engine.config import GenerationConfig

WARMUP_TOKENS = 4
# Backends whose greedy EAGLE output is the model's own token for token, bit for bit (docs/backends.md);
# on the others the two can part at a rounding near-tie.
EXACT_BACKENDS = ("int8",)
MEASURED_NOTE = (
    "**What is measured:** after a {warmup}-token warm-up of each method, **{a}** ran alone, then **{b}** ran "
    "alone on the same engine and prompt, so neither slowed the other down. Tokens/s is the engine's own "
    "count: new tokens ÷ wall time, prompt prefill included. The two panes then replay the measured runs "
    "side by side, each cycle shown at the moment it was produced in its own run."
)


@dataclass
class Run:
    """One measured generation: its cycle events (in order) and its end event."""

    method: str
    cycles: list[dict] = field(default_factory=list)
    end: dict | None = None
    pieces: list[Piece] = field(default_factory=list)  # filled once the run has ended

    @property
    def text(self) -> str:
        return self.end["text"] if self.end else "".join(c["text"] for c in self.cycles)

    @property
    def totals(self) -> dict:
        if self.end:
            return self.end["totals"]
        return self.cycles[-1]["totals"] if self.cycles else {}

    @property
    def elapsed_s(self) -> float:
        return float(self.totals.get("elapsed_s", 0.0))

    def shown_at(self, t: float) -> tuple[str, dict, bool]:
        """Text, totals and whether it is done, as the run stood t seconds after it started."""
        text, totals, done = "", {}, False
        for cycle in self.cycles:
            if cycle["totals"]["elapsed_s"] > t:
                break
            text += cycle["text"]
            totals = cycle["totals"]
        else:
            done = self.end is not None and t >= self.elapsed_s
            if done:
                text, totals = self.text, self.end["totals"]
        return text, totals, done


def measure(
    engine,
    prompt_ids: list[int],
    configs: tuple[GenerationConfig, GenerationConfig],
    cancel: threading.Event,
    poll_s: float = 0.1,
) -> Iterator[tuple[Run, Run | None, str]]:
    """Warm up, then run each config alone; yields (run A, run B or None, phase) as events arrive."""
    yield Run(configs[0].method), None, "warm-up"
    for config in configs:
        warm = replace(config, max_new_tokens=min(WARMUP_TOKENS, config.max_new_tokens))
        for _ in engine.generate(prompt_ids, warm, cancel):
            pass
    runs: list[Run] = []
    for config in configs:
        engine.forget()  # each run prefills the whole prompt: neither starts from the other's cache
        run = Run(config.method)
        runs.append(run)
        for batch in pump(engine.generate(prompt_ids, config, cancel), cancel, poll_s):
            for event in batch:
                if event["type"] == "cycle":
                    run.cycles.append(event)
                elif event["type"] == "end":
                    run.end = event
            yield runs[0], (runs[1] if len(runs) > 1 else None), "running"
        run.pieces = [p for c in run.cycles for p in pieces_from_cycle(c, engine.token_texts)]
    yield runs[0], runs[1], "measured"


def replay_times(run_a: Run, run_b: Run, fps: float = 10.0) -> Iterator[float]:
    """Moments (seconds since both runs 'started') at which to redraw the replay, ending at the slower run's end."""
    end = max(run_a.elapsed_s, run_b.elapsed_s)
    step = 1.0 / fps
    t = 0.0
    while t < end:
        yield t
        t += step
    yield end


def pane(run: Run | None, label: str, status: str, t: float | None = None, tint: bool = False) -> str:
    """HTML of one compare pane; t=None shows the whole run."""
    if run is None:
        body, totals, done = "", {}, False
    elif t is None:
        body, totals, done = run.text, run.totals, run.end is not None
    else:
        body, totals, done = run.shown_at(t)
    if tint and done and run is not None and run.pieces:
        text_html = render_tinted(run.pieces)
    else:
        text_html = f'<div class="pane-text">{html.escape(body)}</div>'
    stats = html.escape(stats_line(totals)) if totals else "&nbsp;"
    state = "done" if done else "live"
    return (
        f'<div class="compare-pane {state}"><div class="pane-head"><b>{html.escape(label)}</b> '
        f'<span class="pane-status">{html.escape(status)}</span></div>'
        f'<div class="pane-stats">{stats}</div>{text_html}</div>'
    )


def summary(run_a: Run, run_b: Run, greedy: bool, backend: str = "fp32") -> str:
    """Markdown: speed-up of B over A and whether the two replies are identical, as `backend` promises."""
    ends = (run_a.end, run_b.end)
    if any(end is None or end["finish_reason"] == "cancelled" for end in ends):
        return "The comparison was stopped before both runs finished."
    la, lb = method_label(run_a.method), method_label(run_b.method)
    lines = [speedup_line(run_a.totals["tokens_per_s"], run_b.totals["tokens_per_s"], la, lb)]
    if run_a.end["output_ids"] == run_b.end["output_ids"]:
        lines.append(f"Texts identical: **yes**, token for token ({len(run_a.end['output_ids'])} tokens).")
    else:
        first = len(os.path.commonprefix([run_a.text, run_b.text]))  # not engine.decode's: that imports torch
        if not greedy:
            why = "With temperature > 0 each run samples its own tokens, so different texts are expected."
        elif backend in EXACT_BACKENDS:
            why = (
                f"With {backend} greedy decoding must give the same tokens bit for bit (see the header): "
                "this is a bug; please report the prompt and the settings."
            )
        else:
            why = (
                f"A rounding near-tie of {backend}: two tokens' scores tied within {backend} rounding, the "
                "methods picked different ones, and from there on the texts part (the header's exception)."
            )
        lines.append(f"Texts identical: **no**, they differ from character {first}. {why}")
    for run, label in ((run_a, la), (run_b, lb)):
        lines.append(f"{label}: {run.end['message']}.")
    return "  \n".join(lines)
