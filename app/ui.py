"""The Gradio app: chat tab with the live draft-tree panel, compare tab, and the `chat` API endpoint.

`build_ui(engine, options)` wires components to the functions in app/chat.py, app/compare.py,
app/tree_svg.py and app/stats.py; it holds no state of its own beyond what it is given. Per-browser
state lives in `gr.State` (a `ChatSession` per session). The one engine is shared by every session
through the queue: all events that run the engine share the concurrency group "engine" with limit 1,
so requests run one at a time and later ones see their queue position.

A request that cannot run (bad settings, a prompt too long, a model error) shows a warning and leaves the
session's history as it was; the typed message is put back in the textbox.
"""

import html
import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.chat import (
    ChatSession,
    Turn,
    build_messages,
    chatbot_messages,
    check_message,
    finish_note,
    make_config,
    samples,
    session_history,
    stream_reply,
    tree_for_temperature,
)
from app.compare import MEASURED_NOTE, WARMUP_TOKENS, measure, pane, replay_times, summary
from app.stats import method_label, stats_line
from app.tree_svg import LEGEND, empty_panel, render_cycle
from engine.config import TreeConfig

log = logging.getLogger(__name__)

ENGINE = "engine"  # concurrency group of every event that runs the model
ROOT = Path(__file__).resolve().parent.parent
CSS_PATH = ROOT / "assets" / "style.css"
EXAMPLES_PATH = ROOT / "assets" / "examples.json"

TINT_LEGEND = (
    '<div class="tint-legend"><span class="tok tok-draft cyc-odd">accepted draft tokens</span> '
    '<span class="tok tok-target cyc-odd">the target\'s own tokens (bonus / vanilla)</span> '
    "— shading alternates from one cycle to the next; hover a token for its cycle.</div>"
)


@dataclass(frozen=True)
class AppOptions:
    """What the UI needs besides the engine; launch.py fills it from the command line."""

    title: str = "EAGLE-2 speculative decoding chat"
    examples: tuple[str, ...] = ()
    system_prompt: str = "You are a helpful assistant."
    max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    poll_s: float = 0.08  # how often streaming updates reach the browser
    tree: TreeConfig = TreeConfig()  # default tree settings (auto-tuned by launch.py)
    tree_note: str = "EAGLE-2 paper defaults"  # where the default tree came from, shown in the sidebar
    sampling_tree: TreeConfig | None = None  # the tree for temperature > 0 (None: the same as `tree`)
    sampling_tree_note: str = ""
    default_method: str | None = None  # the method selected on load (None: EAGLE-2 when a head is loaded)
    backend_note: str = ""  # why this backend runs the target (launch.py's measurement), shown in the sidebar


def load_examples(path: str | Path = EXAMPLES_PATH) -> tuple[str, ...]:
    """Example prompts from a JSON list of strings; a missing file means no examples."""
    path = Path(path)
    if not path.exists():
        return ()
    prompts = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{path} must hold a JSON list of strings")
    return tuple(prompts)


def promise(engine) -> str:
    """What greedy decoding guarantees for the backend that runs, in one sentence for the header."""
    name = engine.describe().split(" · ")[0]
    if engine.backend == "int8":  # integer products and float64 attention: batch-independent, bit for bit
        return f"With temperature 0 the reply is exactly the one {name} (int8) writes alone."
    return (
        f"With temperature 0 the reply is the one {name} ({engine.backend}) writes alone, except where two "
        f"tokens tie to within {engine.backend} rounding: there the texts can part (docs/performance.md)."
    )


def available_methods(engine) -> list[str]:
    return ["vanilla"] if engine.head is None else ["eagle2", "eagle1", "vanilla"]


def slider_max(trees: list[TreeConfig], field: str, usual: int) -> int:
    """A tree slider's maximum: `usual`, or more when a default tree needs it (so switching trees fits)."""
    return max([usual] + [getattr(t, field) for t in trees])


def _slider(count: int, at: int | None = None, interactive: bool = True) -> dict:
    """Cycle slider over positions 0..count-1 (the engine numbers cycles from 0, the prefill's token).

    Gradio needs minimum < maximum, so an empty or one-cycle reply still gets a 0..1 range, disabled.
    """
    last = max(count - 1, 0)
    at = last if at is None else min(max(at, 0), last)
    return gr.update(minimum=0, maximum=max(last, 1), value=at, step=1, interactive=interactive and count > 1)


def build_ui(engine, options: AppOptions | None = None) -> gr.Blocks:
    options = options or AppOptions()
    methods = available_methods(engine)
    choices = [(method_label(m), m) for m in methods]
    first = options.default_method if options.default_method in methods else methods[0]

    def tree_at(session: ChatSession, position: int) -> str:
        if not session.cycles:
            return empty_panel()
        position = min(max(int(position), 0), len(session.cycles) - 1)
        return render_cycle(session.cycles[position], engine.token_texts)

    def status_line(view) -> str:
        line = stats_line(view.totals, view.method) if view.totals else f"{method_label(view.method)}: starting…"
        if view.finished:
            line += f" — {view.finish_message}"
        return line

    # ---- chat ---------------------------------------------------------------------------------

    # Sending is three chained steps: claim the session (raises gr.Error on bad input; its only output is
    # the State, so no visible component is marked as failed), show the pending message, then stream.
    def accept_message(message: str, session: ChatSession) -> ChatSession:
        try:
            session.begin(check_message(message, engine.context_length))
        except ValueError as err:
            raise gr.Error(str(err), duration=8) from None
        return session

    def accept_regenerate(session: ChatSession) -> ChatSession:
        if not session.turns:
            raise gr.Error("nothing to regenerate yet: send a message first", duration=6)
        try:
            session.begin(session.turns[-1].user)
        except ValueError as err:
            raise gr.Error(str(err), duration=6) from None
        session.turns.pop()
        return session

    def show_pending(session: ChatSession, tint: bool):
        return "", chatbot_messages(session.turns, tint, session.pending)

    def stream_chat(
        session, system_prompt, tint, method, max_new, temperature, top_p, top_k, total, depth, tree_k, seed, lookup,
        adaptive,
    ):
        message = session.pending
        if message is None:  # nothing claimed the session (e.g. a stale chained event)
            session.active = False
            return
        keep = gr.update()
        try:
            config = make_config(
                method, max_new, temperature, top_p, top_k, total, depth, tree_k, seed, lookup, adaptive
            )
            messages = build_messages(system_prompt, session_history(session.turns), message)
            view = None
            for view in stream_reply(engine, messages, config, session.cancel, options.poll_s):
                tree = render_cycle(view.cycles[-1], engine.token_texts) if view.cycles else keep
                yield (
                    keep,
                    chatbot_messages(session.turns, tint, message, view),
                    session,
                    tree,
                    status_line(view),
                    view.notice,
                    _slider(len(view.cycles), interactive=False),
                )
            if session.pending is None:  # Clear was pressed meanwhile: keep the conversation cleared
                return
            session.turns.append(Turn(message, view.text, view.pieces, finish_note(view)))
            session.cycles = view.cycles
            if view.notice:
                gr.Info(view.notice, duration=8)
            final = chatbot_messages(session.turns, tint)
            yield keep, final, session, keep, status_line(view), view.notice, _slider(len(view.cycles))
        except ValueError as err:  # the request cannot run: settings, prompt length, missing head
            gr.Warning(str(err), duration=10)
            yield message, chatbot_messages(session.turns, tint), session, keep, f"Not sent: {err}", "", keep
        except Exception as err:  # a model failure must not take the app down; history stays intact
            log.exception("generation failed")
            gr.Warning(f"The model failed: {err}. Your conversation is unchanged; try again.", duration=12)
            yield message, chatbot_messages(session.turns, tint), session, keep, f"Model error: {err}", "", keep
        finally:
            session.active, session.pending = False, None

    def stop(session: ChatSession) -> None:
        session.cancel.set()

    def clear_chat(session: ChatSession):
        session.clear()
        return [], session, empty_panel(), "", "", _slider(0)

    def retint(session: ChatSession, tint: bool):
        legend = TINT_LEGEND if tint else ""
        return chatbot_messages(session.turns, tint, session.pending), legend

    def step(session: ChatSession, position, delta: int):
        position = min(max(int(position) + delta, 0), max(len(session.cycles) - 1, 0))
        return tree_at(session, position), _slider(len(session.cycles), position)

    # ---- compare ------------------------------------------------------------------------------

    def accept_compare(prompt: str, session: ChatSession):
        try:
            prompt = check_message(prompt, engine.context_length)
            session.begin(prompt)
        except ValueError as err:
            raise gr.Error(str(err), duration=8) from None
        return session

    def compare_measure(
        session, system_prompt, method_a, method_b, max_new, temperature, top_p, top_k, total, depth, tree_k, seed,
        lookup,
        adaptive,
    ):
        prompt = session.pending
        if prompt is None:
            session.active = False
            return
        la, lb = method_label(method_a), method_label(method_b)
        try:
            # One seed for both sides, so a sampled comparison differs only by method.
            shared_seed = seed if seed is not None and seed >= 0 else random.randrange(2**31)
            configs = tuple(
                make_config(m, max_new, temperature, top_p, top_k, total, depth, tree_k, shared_seed, lookup, adaptive)
                for m in (method_a, method_b)
            )
            prompt_ids = engine.chat_ids(build_messages(system_prompt, [], prompt))
            note = MEASURED_NOTE.format(warmup=WARMUP_TOKENS, a=la, b=lb)
            for run_a, run_b, phase in measure(engine, prompt_ids, configs, session.cancel, options.poll_s):
                if phase == "warm-up":
                    yield pane(None, la, "warming up…"), pane(None, lb, "waiting"), note, None
                elif phase == "running":
                    status_a = "measured" if run_a.end else "running alone…"
                    status_b = "waiting for the left run to finish" if run_b is None else "running alone…"
                    yield pane(run_a, la, status_a), pane(run_b, lb, status_b), note, None
                else:
                    runs = (run_a, run_b, configs[0].sampling.greedy)
                    replaying = note + "\n\nReplaying both at their measured speeds…"
                    yield pane(run_a, la, "measured"), pane(run_b, lb, "measured"), replaying, runs
        except ValueError as err:
            gr.Warning(str(err), duration=10)
            yield gr.update(), gr.update(), f"Not run: {err}", None
        except Exception as err:  # a model failure must not take the app down
            log.exception("comparison failed")
            gr.Warning(f"The model failed: {err}", duration=12)
            yield gr.update(), gr.update(), f"Model error: {err}", None
        finally:
            session.active, session.pending = False, None

    def compare_replay(runs, tint: bool):
        if runs is None:
            return
        run_a, run_b, greedy = runs
        la, lb = method_label(run_a.method), method_label(run_b.method)
        clock = _Clock()
        for t in replay_times(run_a, run_b):
            clock.sleep_until(t)
            status = f"replay {t:.1f} s"
            yield pane(run_a, la, status, t, tint), pane(run_b, lb, status, t, tint), gr.update()
        note = MEASURED_NOTE.format(warmup=WARMUP_TOKENS, a=la, b=lb)
        yield (
            pane(run_a, la, "finished", None, tint),
            pane(run_b, lb, "finished", None, tint),
            note + "\n\n" + summary(run_a, run_b, greedy),
        )

    # ---- API ----------------------------------------------------------------------------------

    def chat(
        message: str,
        history: list[dict] | None = None,
        system_prompt: str = "",
        method: str = methods[0],
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = options.max_new_tokens,
    ) -> Iterator[str]:
        """Stream a reply to `message`, given earlier `history` as [{"role": "user"|"assistant", "content": str}].

        Yields the reply text so far, once per update. method: eagle2, eagle1 or vanilla.
        """
        try:
            message = check_message(message, engine.context_length)
            tree = options.sampling_tree if options.sampling_tree is not None and samples(temperature) else options.tree
            config = make_config(
                method, max_new_tokens, temperature, top_p, top_k, tree.total_tokens, tree.depth, tree.top_k,
                lookup=tree.lookup, adaptive=tree.adaptive,
            )
            well_formed = history is None or all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in history
            )
            if not well_formed:
                raise ValueError('history must be a list of {"role": ..., "content": ...} messages')
            messages = build_messages(system_prompt, history or [], message)
            cancel = ChatSession().cancel
            for view in stream_reply(engine, messages, config, cancel, options.poll_s):
                yield view.text
        except ValueError as err:
            raise gr.Error(str(err)) from None

    # ---- layout -------------------------------------------------------------------------------

    with gr.Blocks(title=options.title, analytics_enabled=False, fill_width=True) as demo:
        session = gr.State(ChatSession())
        compare_runs = gr.State(None)
        gr.Markdown(
            f"## {options.title}\n"
            f"<span class='engine-line'>{engine.describe()}</span> — a small draft head guesses a tree of "
            "next tokens; the model checks the whole tree in one pass and keeps the longest path it agrees "
            f"with. {promise(engine)}"
        )
        with gr.Sidebar(label="Settings", open=True, width=310):
            system_prompt = gr.Textbox(label="System prompt", value=options.system_prompt, lines=3)
            method = gr.Dropdown(choices, value=first, label="Method (chat)", elem_id="method")
            max_new = gr.Slider(
                1, options.max_new_tokens_limit, value=options.max_new_tokens, step=1, label="Max new tokens"
            )
            temperature = gr.Slider(
                0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                info="0 = greedy: the same text as vanilla decoding", elem_id="temperature",
            )
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 = off")
            seed = gr.Number(-1, precision=0, label="Seed", info="-1 = random (used when temperature > 0)")
            if options.backend_note:
                backend = html.escape(options.backend_note)
                gr.Markdown(f"<small>Measured on this CPU: {backend}</small>", elem_id="backend-note")
            with gr.Accordion("Draft tree", open=True):
                note = f"Defaults: {options.tree_note}"
                if options.sampling_tree is not None:
                    note += (
                        ". When the temperature is above 0 the sliders switch to the sampling tree "
                        f"(unless you have moved them): {options.sampling_tree_note}"
                    )
                gr.Markdown(f"<small>{html.escape(note)}</small>", elem_id="tree-note")
                t = options.tree
                trees = [t] + ([options.sampling_tree] if options.sampling_tree is not None else [])
                total = gr.Slider(
                    1, slider_max(trees, "total_tokens", 128), value=t.total_tokens, step=1,
                    label="Total drafted tokens",
                    info="EAGLE-2 paper: 60", elem_id="tree-total",
                )
                depth = gr.Slider(
                    1, slider_max(trees, "depth", 12), value=t.depth, step=1, label="Depth",
                    info="EAGLE-2 paper: 6", elem_id="tree-depth",
                )
                tree_k = gr.Slider(
                    1, slider_max(trees, "top_k", 20), value=t.top_k, step=1, label="Top-k per expansion",
                    info="EAGLE-2 only; paper: 10",
                )
                lookup = gr.Slider(
                    0, 32, value=t.lookup, step=1, label="Prompt-lookup branch (tokens)", elem_id="lookup",
                    info="0 = off. Adds tokens copied from the conversation (teal in the tree); still lossless",
                )
                adaptive = gr.Checkbox(
                    value=t.adaptive, label="Rest the draft head when it does not pay", elem_id="adaptive",
                    info="Where the head's guesses are rarely accepted, verify only the copied branch (or one "
                    "token) and try the head again now and then. Greedy text is unchanged",
                )
        settings = [max_new, temperature, top_p, top_k, total, depth, tree_k, seed, lookup, adaptive]

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=420):
                        chatbot = gr.Chatbot(
                            label="Chat", height=500, elem_id="chatbot", feedback_options=None, buttons=["copy"]
                        )
                        notice = gr.Markdown(elem_id="notice", elem_classes=["notice"])
                        with gr.Row():
                            msg = gr.Textbox(
                                placeholder="Message the model (Enter sends, Shift+Enter for a new line)",
                                show_label=False, lines=1, max_lines=8, scale=6, elem_id="msg", autofocus=True,
                            )
                            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                            stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
                        with gr.Row():
                            regen = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                            clear = gr.Button("Clear", size="sm", elem_id="clear")
                            tint = gr.Checkbox(
                                label="Tint tokens: accepted drafts vs target", value=False, elem_id="tint"
                            )
                        stats = gr.Markdown(elem_id="stats", elem_classes=["stats"])
                        tint_legend = gr.HTML("", js_on_load=None)
                        if options.examples:
                            gr.Examples([[e] for e in options.examples], inputs=[msg], label="Example prompts")
                    with gr.Column(scale=2, min_width=360):
                        gr.Markdown("### Draft tree, cycle by cycle")
                        with gr.Row(equal_height=True):
                            prev = gr.Button("◀ Previous", size="sm", min_width=60, elem_id="prev-cycle")
                            cycle = gr.Slider(
                                0, 1, value=0, step=1, label="Cycle of the last reply", interactive=False,
                                elem_id="cycle-slider", scale=3,
                            )
                            nxt = gr.Button("Next ▶", size="sm", min_width=60, elem_id="next-cycle")
                        tree = gr.HTML(empty_panel(), elem_id="tree-panel", js_on_load=None)
                        gr.HTML(LEGEND, js_on_load=None)

            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "One prompt, two methods, same settings (sidebar). Each method is timed running **alone**, "
                    "one after the other; then both runs are replayed side by side at their measured speeds."
                )
                cmp_prompt = gr.Textbox(label="Prompt", lines=3, elem_id="cmp-prompt")
                with gr.Row():
                    method_a = gr.Dropdown(choices, value="vanilla", label="Left", elem_id="method-a")
                    method_b = gr.Dropdown(choices, value=methods[0], label="Right", elem_id="method-b")
                    cmp_run = gr.Button("Run comparison", variant="primary", elem_id="cmp-run")
                    cmp_stop = gr.Button("Stop", variant="stop", elem_id="cmp-stop")
                    cmp_replay = gr.Button("Replay", elem_id="cmp-replay")
                with gr.Row(equal_height=True):
                    pane_a = gr.HTML(pane(None, method_label("vanilla"), "idle"), elem_id="pane-a", js_on_load=None)
                    pane_b = gr.HTML(pane(None, method_label(methods[0]), "idle"), elem_id="pane-b", js_on_load=None)
                cmp_summary = gr.Markdown(elem_id="cmp-summary")
                if options.examples:
                    gr.Examples([[e] for e in options.examples], inputs=[cmp_prompt], label="Example prompts")

        # ---- events ---------------------------------------------------------------------------
        private = dict(api_visibility="private")
        engine_run = dict(concurrency_id=ENGINE, concurrency_limit=1, **private)
        # Steps that do not run the engine (input checks, showing the pending message, replays): queued,
        # so errors and warnings reach the browser as messages, but never waiting behind a generation.
        quick = dict(concurrency_limit=None, show_progress="hidden", **private)
        stream_outputs = [msg, chatbot, session, tree, stats, notice, cycle]
        stream_inputs = [session, system_prompt, tint, method, *settings]

        gr.on([msg.submit, send.click], accept_message, [msg, session], [session], **quick).success(
            show_pending, [session, tint], [msg, chatbot], **quick
        ).success(
            stream_chat, stream_inputs, stream_outputs, show_progress="minimal", show_progress_on=[chatbot],
            **engine_run,
        )  # fmt: skip
        regen.click(accept_regenerate, [session], [session], **quick).success(
            show_pending, [session, tint], [msg, chatbot], **quick
        ).success(
            stream_chat, stream_inputs, stream_outputs, show_progress="minimal", show_progress_on=[chatbot],
            **engine_run,
        )  # fmt: skip
        stop_btn.click(stop, [session], None, queue=False, **private)
        clear.click(clear_chat, [session], [chatbot, session, tree, stats, notice, cycle], queue=False, **private)
        tint.change(retint, [session, tint], [chatbot, tint_legend], queue=False, **private)
        if options.sampling_tree is not None:
            temperature.change(
                lambda temp, *tree: tree_for_temperature(temp, *tree, options.tree, options.sampling_tree),
                [temperature, total, depth, tree_k], [total, depth, tree_k], queue=False, **private,
            )
        cycle.input(lambda s, k: step(s, k, 0), [session, cycle], [tree, cycle], queue=False, **private)
        prev.click(lambda s, k: step(s, k, -1), [session, cycle], [tree, cycle], queue=False, **private)
        nxt.click(lambda s, k: step(s, k, +1), [session, cycle], [tree, cycle], queue=False, **private)

        cmp_run.click(accept_compare, [cmp_prompt, session], [session], **quick).success(
            compare_measure,
            [session, system_prompt, method_a, method_b, *settings],
            [pane_a, pane_b, cmp_summary, compare_runs],
            show_progress="minimal",
            show_progress_on=[pane_a, pane_b],
            **engine_run,
        ).success(compare_replay, [compare_runs, tint], [pane_a, pane_b, cmp_summary], **quick)
        cmp_stop.click(stop, [session], None, queue=False, **private)
        cmp_replay.click(compare_replay, [compare_runs, tint], [pane_a, pane_b, cmp_summary], **quick)

        gr.api(chat, api_name="chat", concurrency_id=ENGINE, concurrency_limit=1)

    demo.queue(default_concurrency_limit=1)
    return demo


class _Clock:
    """Paces a replay: sleep until t seconds after the clock was made."""

    def __init__(self):
        self._start = time.monotonic()

    def sleep_until(self, t: float) -> None:
        wait = self._start + t - time.monotonic()
        if wait > 0:
            time.sleep(wait)
