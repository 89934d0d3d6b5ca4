"""The benchmark: decoding methods side by side on a question file, and the losslessness audit.

`python -m engine.bench --questions FILE --methods vanilla,eagle2,... --out RESULT.json [options]`

Methods: `vanilla`, `eagle1`, `eagle2` (this engine), `eagle2_lookup` (eagle2 plus a prompt-lookup
branch of `--prompt-lookup-tokens` tokens grafted into its tree, engine/lookup.py), `eagle2_adaptive`
(eagle2_lookup with the adaptive head, engine/gate.py; the app's `--adaptive`) and the baselines a
user would pick instead,
`hf_generate` (transformers `generate`) and `hf_prompt_lookup` (`generate` with
`prompt_lookup_num_tokens`). All run on the same loaded model.

How the measurement stays fair:
  - Every method first answers one warm-up prompt (not recorded), so none pays one-time start-up costs.
  - Then the methods are interleaved question by question, in the order given (A B C, A B C, ...), so
    machine drift hits them alike. A method answers every turn of a question before the next method
    starts; multi-turn questions feed each turn's answer back as history, each method its own.
  - `wall_s` is wall time around each generate call, prefill included. `tokens_per_s` in the summary is
    total new tokens over total wall time (per method, overall and per category); `speedup_vs_vanilla`
    divides it by vanilla's over the same questions.
  - `cycles` counts target forwards after the prefill; `tau` = (new tokens - turns) / cycles, the mean
    tokens committed per forward (the engine's definition), for the transformers baselines too.
  - In bf16 or fp16 a near-tie can send two methods' replies apart (see the audit below), and from there
    on they time different text: one reply may end early, another run into a long repetition that prompt
    lookup copies at many tokens per step. So every method also records when each of its tokens reached
    the host, and `matched` times each of this engine's methods against vanilla and each baseline over
    the text both replies share: per turn, from the start of each call (prefill included) until the last
    token of their common prefix reached the host. Same output tokens from the same prompt; only the speed
    differs. Each pair is timed over its own shared text, so compare within a row, not across rows.
    Greedy runs only (sampled replies differ by design). Small leanings, all under a millisecond a step:
    the baselines' streamer copies each step's tokens to the host (their `wall_s` includes it), the
    engine's marks come after its event is built, and a chunk that runs past the shared text is paid for
    whole. On Apple's mps, transformers streams one step late, so the baselines' marks lag there.

Result JSON (field names are stable, scripts read them):
  config, hardware, memory, results: [{question_id, category, method, turns, new_tokens, wall_s, cycles,
  tau, output_ids (one list per turn), text (one string per turn), finish_reasons, and for this engine's
  methods phase_ms {prefill_ms, draft_ms, verify_ms}, its stopwatch's split of the time, and head_cycles,
  the cycles in which the draft head drafted; emit_marks, per turn a list of [tokens so far, seconds since
  the call began] after every target forward}],
  summary: {method: {overall: {...}, per_category: {category: {...}}, peak_memory_mb}} where each {...}
  holds tokens_per_s, speedup_vs_vanilla, tau, new_tokens, wall_s (engine methods also draft_ms_per_cycle,
  verify_ms_per_cycle, prefill_ms_per_turn, head_share);
  matched: [{method, against, overall: {...}, per_category: {category: {...}}}] where each {...} holds
  turns (compared: same prompt), shared_turns (of those, the ones whose replies share a first token),
  tokens (the shared tokens), method_s, against_s (seconds each call took to deliver them)
  and speedup (against_s / method_s); and `lossless` with --check-lossless.
A markdown table (RESULT.md) and a chart of speedup per category (RESULT.png) are written beside it.
Every answer is also saved as it finishes in RESULT.partial.jsonl (removed at the end): after a crash
or a kill, the same command with `--resume` reuses those answers and runs only the rest.

The losslessness audit compares each method's tokens with vanilla's, turn by turn. At the first
differing position it recomputes the target's logits on the shared prefix (one plain forward) and
reports the top-2 margin there and the gap between the two diverging tokens. A divergence whose gap is
above the dtype's bound is not a near-tie: it is flagged as a bug and the command exits with status 1.
In fp32 the bound is float rounding, so outputs must be identical.
"""

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
import transformers
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from engine.autotune import load_or_tune
from engine.cli import add_engine_arguments, engine_from_args, quantization_of
from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine, common_prefix
from engine.detok import IncrementalDetokenizer
from engine.hardware import hardware_info, peak_rss_mb
from engine.kv import new_cache
from engine.verify import target_forward

ENGINE_METHODS = ("vanilla", "eagle1", "eagle2", "eagle2_lookup", "eagle2_adaptive")
BASELINES = ("hf_generate", "hf_prompt_lookup")
BENCH_METHODS = ENGINE_METHODS + BASELINES
# Largest logit gap between two diverging tokens still accepted as a rounding tie, per dtype. bf16 logits
# near 20 are spaced 0.125 apart, and a 61-token tree and a 1-token step round differently.
MARGIN_BOUNDS = {torch.float32: 1e-4, torch.float16: 0.25, torch.bfloat16: 0.5}


# ---- questions and prompts ----------------------------------------------------------------------


def load_questions(path: str | Path, limit: int | None = None, per_category: int | None = None) -> list[dict]:
    """Spec-Bench jsonl (`question_id`, `category`, `turns`). `per_category` keeps that many questions of
    each category, evenly spaced through it; `limit` then keeps the first `limit`. File order is kept."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            q = json.loads(line)
            turns = q.get("turns")
            if "question_id" not in q or "category" not in q or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError(
                    f"{path}:{line_no}: expected a Spec-Bench question with question_id, category and a "
                    f"non-empty list of string turns; got keys {sorted(q)}"
                )
            questions.append(q)
    if per_category is not None:
        by_category: dict[str, list[int]] = {}
        for i, q in enumerate(questions):
            by_category.setdefault(q["category"], []).append(i)
        kept = set()
        for indices in by_category.values():
            n = min(per_category, len(indices))
            kept.update(indices[(j * len(indices)) // n] for j in range(n))
        questions = [q for i, q in enumerate(questions) if i in kept]
    return questions[:limit] if limit is not None else questions


def turn_messages(question: dict, answers: list[str]) -> list[dict]:
    """Chat messages for turn len(answers): earlier turns with this method's own answers, then the next."""
    messages = []
    for user, answer in zip(question["turns"], answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": question["turns"][len(answers)]}]


def turn_prompt(engine: Engine, question: dict, answers: list[str], max_new_tokens: int) -> list[int]:
    messages, _ = engine.trim_messages(turn_messages(question, answers), max_new_tokens)
    return engine.chat_ids(messages)


# ---- methods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    seed: int = 0
    warmup_tokens: int = 32  # tokens of the one warm-up answer per method
    prompt_lookup_num_tokens: int = 10


@dataclass
class TurnOutput:
    output_ids: list[int]
    text: str
    wall_s: float
    cycles: int  # target forwards after the prefill
    finish_reason: str
    phase_ms: dict[str, float] | None = None  # engine methods: prefill_ms, draft_ms, verify_ms (the engine's stopwatch)
    head_cycles: int | None = None  # engine methods: cycles in which the draft head drafted
    marks: list[list] = field(default_factory=list)  # [tokens so far, seconds since the start] per forward


class Method(Protocol):
    def run(self, prompt_ids: list[int], settings: BenchSettings) -> TurnOutput: ...


PHASES = ("prefill_ms", "draft_ms", "verify_ms")


class EngineMethod:
    """`vanilla`, `eagle1`, `eagle2`, `eagle2_lookup` or `eagle2_adaptive` through `Engine.generate`."""

    def __init__(self, engine: Engine, method: str):
        if method != "vanilla" and engine.head is None:
            raise ValueError(f"method {method} needs a draft head; pass --head PATH or drop {method} from --methods")
        self.engine, self.method = engine, method

    def run(self, prompt_ids: list[int], settings: BenchSettings) -> TurnOutput:
        extended = self.method in ("eagle2_lookup", "eagle2_adaptive")
        lookup = settings.prompt_lookup_num_tokens if extended else 0
        config = GenerationConfig(
            method="eagle2" if extended else self.method,
            max_new_tokens=settings.max_new_tokens,
            sampling=settings.sampling,
            tree=replace(settings.tree, lookup=lookup, adaptive=self.method == "eagle2_adaptive"),
            seed=settings.seed,
        )
        start = time.perf_counter()
        end, marks = None, []
        for event in self.engine.generate(prompt_ids, config):
            if event["type"] == "cycle":  # its tokens are on the host: the engine syncs every cycle
                marks.append([event["totals"]["new_tokens"], round(time.perf_counter() - start, 5)])
            end = event
        wall_s = time.perf_counter() - start
        phase_ms = {k: end["totals"][k] for k in PHASES}
        totals = end["totals"]
        return TurnOutput(
            end["output_ids"], end["text"], wall_s, totals["cycles"], end["finish_reason"], phase_ms, totals["head_cycles"], marks
        )


class EmitClock(BaseStreamer):
    """A streamer for `generate` that marks [tokens so far, seconds since `start`] as tokens reach the host."""

    def __init__(self, start: float):
        self.start, self.marks, self.count, self.prompt_seen = start, [], 0, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands the streamer the prompt first
            self.prompt_seen = True
            return
        self.count += value.numel()
        self.marks.append([self.count, round(time.perf_counter() - self.start, 5)])

    def end(self) -> None:
        pass


class HFGenerateMethod:
    """transformers `generate` on the engine's model: plain, or with prompt lookup decoding."""

    def __init__(self, engine: Engine, prompt_lookup: bool):
        self.engine, self.prompt_lookup = engine, prompt_lookup

    def generation_config(self, settings: BenchSettings) -> transformers.GenerationConfig:
        sampling = settings.sampling
        eos = sorted(self.engine.eos_ids)
        kwargs = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
        if sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if self.prompt_lookup:
            kwargs.update(prompt_lookup_num_tokens=settings.prompt_lookup_num_tokens)
        return transformers.GenerationConfig(**kwargs)

    @torch.no_grad()
    def run(self, prompt_ids: list[int], settings: BenchSettings) -> TurnOutput:
        model = self.engine.model
        config = self.generation_config(settings)
        forwards = [0]
        hook = model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
        try:
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.engine.device)  # (1, T)
            if not settings.sampling.greedy:
                torch.manual_seed(settings.seed)
            start = time.perf_counter()
            clock = EmitClock(start)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=clock)
            new_ids = out[0, len(prompt_ids) :].tolist()  # the host sync ends the timed region
            wall_s = time.perf_counter() - start
        finally:
            hook.remove()
        eos = self.engine.eos_ids
        detok = IncrementalDetokenizer(self.engine.tokenizer)
        detok.add([t for t in new_ids if t not in eos])
        reason = "eos" if new_ids and new_ids[-1] in eos else "max_new_tokens"
        return TurnOutput(new_ids, detok.text, wall_s, max(forwards[0] - 1, 0), reason, marks=clock.marks)


def build_methods(engine: Engine, names: list[str]) -> dict[str, Method]:
    methods = {}
    for name in names:
        if name in ENGINE_METHODS:
            methods[name] = EngineMethod(engine, name)
        elif name in BASELINES:
            methods[name] = HFGenerateMethod(engine, prompt_lookup=name == "hf_prompt_lookup")
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(BENCH_METHODS)}")
    return methods


# ---- running ------------------------------------------------------------------------------------


class MemoryMeter:
    """Peak accelerator memory per method (CUDA only: the process's CPU peak is shared by all methods)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_mb: dict[str, float] = {}

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def stop(self, method: str) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
            self.peak_mb[method] = max(self.peak_mb.get(method, 0.0), peak)


def answer_question(engine: Engine, method: Method, name: str, question: dict, settings: BenchSettings) -> dict:
    """Every turn of one question with one method, its own answers fed back as history."""
    answers, outputs = [], []
    for _ in question["turns"]:
        prompt = turn_prompt(engine, question, answers, settings.max_new_tokens)
        out = method.run(prompt, settings)
        answers.append(out.text)
        outputs.append(out)
    new_tokens = sum(len(o.output_ids) for o in outputs)
    cycles = sum(o.cycles for o in outputs)
    phases = {}
    if all(o.phase_ms for o in outputs):  # where a cycle's time goes (engine methods only)
        phases = {"phase_ms": {k: sum(o.phase_ms[k] for o in outputs) for k in PHASES}}
        phases["head_cycles"] = sum(o.head_cycles for o in outputs)
    return {
        "question_id": question["question_id"],
        "category": question["category"],
        "method": name,
        "turns": len(outputs),
        "new_tokens": new_tokens,
        "wall_s": sum(o.wall_s for o in outputs),
        "cycles": cycles,
        "tau": (new_tokens - len(outputs)) / cycles if cycles else 0.0,
        "output_ids": [o.output_ids for o in outputs],
        "text": [o.text for o in outputs],
        "finish_reasons": [o.finish_reason for o in outputs],
        "emit_marks": [o.marks for o in outputs],
        **phases,
    }


def warm_up(engine: Engine, methods: dict[str, Method], question: dict, settings: BenchSettings) -> None:
    """One short unrecorded answer per method: kernels, allocators and caches warm for all alike."""
    short = replace(settings, max_new_tokens=min(settings.warmup_tokens, settings.max_new_tokens))
    prompt = turn_prompt(engine, question, [], short.max_new_tokens)
    for method in methods.values():
        method.run(prompt, short)


def run_benchmark(
    engine: Engine,
    methods: dict[str, Method],
    questions: list[dict],
    settings: BenchSettings,
    progress: bool = False,
    memory: MemoryMeter | None = None,
    done: dict[tuple, dict] | None = None,
    record=None,
) -> list[dict]:
    """Warm up, then answer each question with every method in turn (A B C, A B C, ...).

    `done` maps (question_id, method) to rows of an earlier, interrupted run: those answers are reused,
    not run again. `record(row)` is called with every new row as soon as it exists (the checkpoint)."""
    if not questions:
        raise ValueError("no questions to run: check the question file, --limit and --per-category")
    done = done or {}
    todo = [(q, name) for q in questions for name in methods if (q["question_id"], name) not in done]
    if todo:
        warm_up(engine, methods, questions[0], settings)
    memory = memory or MemoryMeter(engine.device)
    results = []
    with tqdm(total=len(todo), desc="bench", unit="answer", disable=not progress, file=sys.stderr) as bar:
        for question in questions:
            for name, method in methods.items():
                row = done.get((question["question_id"], name))
                if row is None:
                    bar.set_postfix_str(f"q{question['question_id']} {name}")
                    memory.start()
                    row = answer_question(engine, method, name, question, settings)
                    memory.stop(name)
                    if record is not None:
                        record(row)
                    bar.update()
                results.append(row)
    return results


class Checkpoint:
    """Answers saved as they finish, so an interrupted run can go on with `--resume`.

    A jsonl file beside the result (RESULT.partial.jsonl): its first line holds the run's settings, then
    one line per answer. Resuming reuses the answers only when the settings match, and the file is
    removed once the full report is written. Reused answers were timed in the earlier process; the
    question-by-question interleaving still holds within each process."""

    def __init__(self, out: Path, settings: dict):
        self.path = out.with_name(out.stem + ".partial.jsonl")
        self.settings = settings

    def load(self) -> dict[tuple, dict]:
        """Answers of an earlier run with the same settings, by (question_id, method)."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            saved = json.loads(lines[0])["settings"]
        except (IndexError, json.JSONDecodeError, KeyError, TypeError):  # killed before its first line was written
            return {}
        if saved != self.settings:
            changed = sorted(k for k in saved.keys() | self.settings.keys() if saved.get(k) != self.settings.get(k))
            raise SystemExit(
                f"cannot resume from {self.path}: it was run with other settings ({', '.join(changed)}); "
                f"run the same command again, or drop --resume to start over"
            )
        rows = {}
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the run was killed
                continue
            rows[(row["question_id"], row["method"])] = row
        return rows

    def start(self, rows: dict[tuple, dict]) -> None:
        """Begin the file afresh with the settings and the answers being kept."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"settings": self.settings})] + [json.dumps(r) for r in rows.values()]
        self.path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def record(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


# ---- summary ------------------------------------------------------------------------------------


def _rates(rows: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    cycles = sum(r["cycles"] for r in rows)
    turns = sum(r["turns"] for r in rows)
    rates = {
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "tau": (tokens - turns) / cycles if cycles else 0.0,
        "new_tokens": tokens,
        "wall_s": wall,
    }
    if rows and cycles and all("phase_ms" in r for r in rows):
        rates["draft_ms_per_cycle"] = sum(r["phase_ms"]["draft_ms"] for r in rows) / cycles
        rates["verify_ms_per_cycle"] = sum(r["phase_ms"]["verify_ms"] for r in rows) / cycles
        rates["prefill_ms_per_turn"] = sum(r["phase_ms"]["prefill_ms"] for r in rows) / turns
        if all("head_cycles" in r for r in rows):  # results from before the adaptive head lack it
            rates["head_share"] = sum(r["head_cycles"] for r in rows) / cycles
    return rates


def summarize(results: list[dict], memory_mb: dict[str, float] | None = None) -> dict:
    """Per method, overall and per category: tokens/s, speedup over vanilla on the same questions, tau."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    categories = list(dict.fromkeys(r["category"] for r in results))

    def group(method, category=None):
        return [r for r in results if r["method"] == method and category in (None, r["category"])]

    summary = {}
    for method in methods:
        overall = _rates(group(method))
        per_category = {c: _rates(group(method, c)) for c in categories if group(method, c)}
        for cat, stats in [(None, overall), *per_category.items()]:
            base = _rates(group("vanilla", cat)) if "vanilla" in methods else None
            stats["speedup_vs_vanilla"] = (
                stats["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] > 0 else None
            )
        summary[method] = {
            "overall": overall,
            "per_category": per_category,
            "peak_memory_mb": (memory_mb or {}).get(method),
        }
    return summary


def _time_to(marks: list[list], tokens: int) -> float | None:
    """Seconds until a reply had at least `tokens` tokens on the host (None if its marks never got there)."""
    return next((t for n, t in marks if n >= tokens), None)


def _matched_stats(pairs: list[tuple[dict, dict, int]]) -> dict:
    """Totals over (method row, against row, turn) of the shared tokens and the seconds each call took to
    deliver them (from its start, prefill included: a first forward may bring several tokens at once)."""
    tokens, method_s, against_s, shared_turns = 0, 0.0, 0.0, 0
    for a, b, turn in pairs:
        shared = common_prefix(a["output_ids"][turn], b["output_ids"][turn])
        times = [_time_to(row["emit_marks"][turn], shared) for row in (a, b)]
        if shared == 0 or None in times:  # nothing shared (or marks cut short: nothing to time)
            continue
        tokens, shared_turns = tokens + shared, shared_turns + 1
        method_s, against_s = method_s + times[0], against_s + times[1]
    return {
        "turns": len(pairs),
        "shared_turns": shared_turns,
        "tokens": tokens,
        "method_s": method_s,
        "against_s": against_s,
        "speedup": against_s / method_s if method_s > 0 else None,
    }


def matched_speedups(results: list[dict], against: list[str] | None = None) -> list[dict]:
    """Each of this engine's methods against each method in `against` (default: vanilla and the
    baselines), timed over the text both replies share (per turn; a later turn only where every earlier
    reply was the same, so that the prompt is).

    Rows without emit marks (answers resumed from an older checkpoint) are left out."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    rows = {(r["question_id"], r["method"]): r for r in results if "emit_marks" in r}
    if against is None:
        against = [m for m in methods if m == "vanilla" or m in BASELINES]
    out = []
    for method in methods:
        for other in against:
            if other == method or method in BASELINES:  # this engine's methods against the others
                continue
            pairs = {}  # category -> [(method row, against row, turn)]
            for (qid, name), row in rows.items():
                twin = rows.get((qid, other))
                if name == method and twin is not None:  # a later turn counts only after the same history
                    same = [t for t in range(row["turns"]) if row["output_ids"][:t] == twin["output_ids"][:t]]
                    pairs.setdefault(row["category"], []).extend((row, twin, t) for t in same)
            if pairs:
                out.append({
                    "method": method,
                    "against": other,
                    "overall": _matched_stats([p for ps in pairs.values() for p in ps]),
                    "per_category": {c: _matched_stats(ps) for c, ps in pairs.items()},
                })
    return out


# ---- losslessness -------------------------------------------------------------------------------


@torch.no_grad()
def logit_margin(engine: Engine, prefix_ids: list[int], token_a: int, token_b: int) -> dict:
    """The target's next-token logits after `prefix_ids` (one plain forward): top-2 margin, gap a vs b."""
    ids = torch.tensor(prefix_ids, dtype=torch.long, device=engine.device)  # (T,)
    positions = torch.arange(len(prefix_ids), device=engine.device)
    features, _ = target_forward(engine.model, ids, positions, None, new_cache(engine.model), logits=False)
    logits = engine.model.lm_head(features[-1:]).float()[0]  # (V,)
    top = logits.topk(2).values.tolist()
    return {
        "margin": top[0] - top[1],
        "gap": abs(float(logits[token_a] - logits[token_b])),
        "vanilla_rank": int((logits > logits[token_a]).sum()),  # 0: the recomputed argmax
        "method_rank": int((logits > logits[token_b]).sum()),
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    same = common_prefix(a, b)
    return None if same == len(a) == len(b) else same


def check_lossless(
    engine: Engine, questions: list[dict], results: list[dict], bound: float, max_new_tokens: int
) -> dict:
    """Compare every method's tokens with vanilla's, turn by turn, stopping at a question's first
    divergence (later turns have different histories). Each divergence carries the target's logit margin
    at that position; `bug` is True when the two tokens' logit gap exceeds `bound` (not a near-tie), or
    when one output stops early without a differing token."""
    vanilla = {r["question_id"]: r for r in results if r["method"] == "vanilla"}
    if not vanilla:
        raise ValueError("--check-lossless compares against vanilla: add vanilla to --methods")
    by_id = {q["question_id"]: q for q in questions}
    compared, divergences = 0, []
    for r in results:
        if r["method"] == "vanilla":
            continue
        ref, question = vanilla[r["question_id"]], by_id[r["question_id"]]
        for turn, (want, got) in enumerate(zip(ref["output_ids"], r["output_ids"])):
            compared += 1
            pos = first_difference(want, got)
            if pos is None:
                continue
            entry = {"question_id": r["question_id"], "category": r["category"], "method": r["method"],
                     "turn": turn, "position": pos}  # fmt: skip
            if pos < len(want) and pos < len(got):
                prompt = turn_prompt(engine, question, ref["text"][:turn], max_new_tokens)
                m = logit_margin(engine, prompt + want[:pos], want[pos], got[pos])
                entry.update(vanilla_token=want[pos], method_token=got[pos], **m, bug=m["gap"] > bound)
            else:
                entry.update(vanilla_token=None, method_token=None, margin=None, gap=None, bug=True,
                             note=f"lengths differ ({len(want)} vs {len(got)}) with no differing token")  # fmt: skip
            divergences.append(entry)
            break
    return {
        "bound": bound,
        "compared_turns": compared,
        "divergences": divergences,
        "bugs": sum(d["bug"] for d in divergences),
    }


# ---- reporting ----------------------------------------------------------------------------------


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown_report(report: dict) -> str:
    summary, hw, cfg = report["summary"], report["hardware"], report["config"]
    categories = list(dict.fromkeys(c for s in summary.values() for c in s["per_category"]))
    gpu = f", {hw['gpu']}" if hw.get("gpu") else ""
    lines = [
        f"Hardware: {hw['cpu']} ({hw['threads']} threads){gpu}; torch {hw['torch']}, transformers "
        f"{hw['transformers']}. Model {cfg['model'] or 'default'}, {cfg['dtype']}, {cfg['device']}; "
        f"T={cfg['temperature']}, {cfg['max_new_tokens']} new tokens, {cfg['question_count']} questions; "
        f"tree {cfg['tree']['total_tokens']}/{cfg['tree']['depth']}/{cfg['tree']['top_k']} "
        f"(total tokens/depth/top-k). Peak RSS {_fmt(report['memory']['peak_rss_mb'], '.0f', ' MB')}.",
        "",
        f"Command: `{cfg['command']}`",
        "",
        "| method | tokens/s | speedup vs vanilla | τ | peak GPU memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, s in summary.items():
        o = s["overall"]
        lines.append(
            f"| {method} | {o['tokens_per_s']:.1f} | {_fmt(o['speedup_vs_vanilla'], '.2f', 'x')} | "
            f"{o['tau']:.2f} | {_fmt(s['peak_memory_mb'], '.0f', ' MB')} |"
        )
    lines += ["", "Speedup vs vanilla per category:", ""]
    lines.append("| method | overall | " + " | ".join(categories) + " |")
    lines.append("|---|" + "---:|" * (len(categories) + 1))
    for method, s in summary.items():
        cells = [_fmt(s["overall"]["speedup_vs_vanilla"], ".2f", "x")]
        cells += [_fmt(s["per_category"].get(c, {}).get("speedup_vs_vanilla"), ".2f", "x") for c in categories]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    matched = report.get("matched") or []
    if matched:
        lines += [
            "",
            "Speedup on the same text: per turn, each pair of calls timed until the last token both replies",
            "share reached the host (after a near-tie sends two replies apart, they are no longer the same work).",
            "Each row is timed over its own pair's shared text, so rows do not compare with each other:",
            "",
            "| method | against | overall | " + " | ".join(categories) + " |",
            "|---|---|" + "---:|" * (len(categories) + 1),
        ]
        for m in matched:
            cells = [_fmt(m["overall"]["speedup"], ".2f", "x")]
            cells += [_fmt(m["per_category"].get(c, {}).get("speedup"), ".2f", "x") for c in categories]
            lines.append(f"| {m['method']} | {m['against']} | " + " | ".join(cells) + " |")
    timed = {m: s["overall"] for m, s in summary.items() if "verify_ms_per_cycle" in s["overall"]}
    if timed:
        lines += ["", "Where the engine's time goes (ms; a cycle is one draft plus one verify):", ""]
        lines += [
            "| method | draft per cycle | verify per cycle | prefill per turn | cycles the head drafted |",
            "|---|---:|---:|---:|---:|",
        ]
        for method, o in timed.items():
            lines.append(
                f"| {method} | {o['draft_ms_per_cycle']:.1f} | {o['verify_ms_per_cycle']:.1f} | "
                f"{o['prefill_ms_per_turn']:.1f} | {_fmt(100 * o['head_share'] if 'head_share' in o else None, '.0f', '%')} |"
            )
    lossless = report.get("lossless")
    if lossless is not None:
        lines += [
            "",
            f"Lossless check: {lossless['compared_turns']} turns compared with vanilla, "
            f"{len(lossless['divergences'])} divergences, {lossless['bugs']} above the near-tie bound "
            f"({lossless['bound']:g} logits).",
        ]
    return "\n".join(lines) + "\n"


def plot_speedups(summary: dict, path: Path, title: str) -> None:
    """Grouped bars: speedup vs vanilla per category (and overall) for every method but vanilla."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m != "vanilla"] or list(summary)
    categories = ["overall"] + list(dict.fromkeys(c for s in summary.values() for c in s["per_category"]))

    def speedup(method, cat):
        stats = summary[method]["overall"] if cat == "overall" else summary[method]["per_category"].get(cat, {})
        return stats.get("speedup_vs_vanilla") or 0.0

    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(categories)), 4.0))
    for i, method in enumerate(methods):
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(categories))]
        ax.bar(xs, [speedup(method, c) for c in categories], width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_ylabel("speedup vs vanilla (tokens/s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """RESULT.json, RESULT.md beside it, and RESULT.png; returns (md, png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    md.write_text(markdown_report(report))
    hw, cfg = report["hardware"], report["config"]
    title = f"{cfg['model'] or 'default model'} · {cfg['dtype']} · {hw['gpu'] or hw['cpu']} · T={cfg['temperature']}"
    plot_speedups(report["summary"], png, title)
    return md, png


# ---- command line -------------------------------------------------------------------------------


def run_settings(args, questions: list[dict], names: list[str], head_path, engine: Engine, settings: BenchSettings) -> dict:
    """Everything that changes an answer or its timing: what `--resume` must find unchanged."""
    hw = hardware_info(engine.device)
    return {
        "question_ids": [q["question_id"] for q in questions],
        "questions_sha256": hashlib.sha256(json.dumps([q["turns"] for q in questions]).encode()).hexdigest(),
        "hardware": {k: hw[k] for k in ("cpu", "gpu", "torch", "transformers")},
        "methods": names,
        "model": args.model,
        "head": head_path,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
        "quantization": quantization_of(args),
        "threads": torch.get_num_threads(),
        **json.loads(json.dumps(asdict(settings))),  # max_new_tokens, sampling, tree, seed, ...
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, help="Spec-Bench style jsonl (question_id, category, turns)")
    parser.add_argument("--methods", default=",".join(BENCH_METHODS), help=", ".join(BENCH_METHODS))
    parser.add_argument("--out", required=True, help="result JSON path; .md and .png are written beside it")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N questions (after --per-category)")
    parser.add_argument("--per-category", type=int, default=None, help="keep N questions per category, evenly spaced")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every method and turn")
    add_engine_arguments(parser)
    default_tree = TreeConfig()
    parser.add_argument("--total-tokens", type=int, default=default_tree.total_tokens, help="draft tree nodes")
    parser.add_argument("--depth", type=int, default=default_tree.depth, help="draft tree depth")
    parser.add_argument("--top-k", type=int, default=default_tree.top_k, help="draft tree branching (eagle2)")
    parser.add_argument("--autotune", action="store_true", help="use the tree auto-tuned for this hardware and sampling instead")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens of hf_prompt_lookup, and the lookup branch of eagle2_lookup and eagle2_adaptive")
    parser.add_argument("--warmup-tokens", type=int, default=32)
    parser.add_argument("--check-lossless", action="store_true", help="compare every method's tokens with vanilla's")
    parser.add_argument(
        "--resume", action="store_true",
        help="reuse the answers an interrupted run with the same settings saved in RESULT.partial.jsonl",
    )  # fmt: skip
    parser.add_argument("--margin-bound", type=float, default=None, help="logit gap above which a divergence is "
                        "a bug (default by dtype: fp32 1e-4, fp16 0.25, bf16 0.5)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in BENCH_METHODS]
    if unknown or not names:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(BENCH_METHODS)}")
    if args.check_lossless and "vanilla" not in names:
        raise SystemExit("--check-lossless compares against vanilla: add vanilla to --methods")
    if args.check_lossless and args.temperature > 0:
        raise SystemExit("--check-lossless needs greedy decoding (--temperature 0): sampled tokens differ by design")
    questions = load_questions(args.questions, args.limit, args.per_category)
    engine, head_path = engine_from_args(args, need_head=any(m.startswith("eagle") for m in names))
    tree = TreeConfig(args.total_tokens, args.depth, args.top_k)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    if args.autotune:  # tuned for this sampling: it changes acceptance, so the best tree
        tree = load_or_tune(engine, progress=not args.no_progress, sampling=sampling)
    settings = BenchSettings(
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        tree=tree,
        seed=args.seed,
        warmup_tokens=args.warmup_tokens,
        prompt_lookup_num_tokens=args.prompt_lookup_tokens,
    )
    GenerationConfig(max_new_tokens=settings.max_new_tokens, sampling=settings.sampling, tree=tree).validate()
    memory = MemoryMeter(engine.device)
    checkpoint = Checkpoint(Path(args.out), run_settings(args, questions, names, head_path, engine, settings))
    done = checkpoint.load() if args.resume else {}
    if done:
        print(f"resuming: {len(done)} answer(s) reused from {checkpoint.path}", file=sys.stderr)
    checkpoint.start(done)
    results = run_benchmark(
        engine, build_methods(engine, names), questions, settings, not args.no_progress, memory, done, checkpoint.record
    )

    dtype, quantization = checkpoint.settings["dtype"], checkpoint.settings["quantization"]
    bound = args.margin_bound if args.margin_bound is not None else MARGIN_BOUNDS.get(engine.dtype, 0.5)
    report = {
        "config": {
            "command": "python -m engine.bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "questions": str(args.questions),
            "question_count": len(questions),
            "limit": args.limit,
            "per_category": args.per_category,
            "methods": names,
            "model": args.model,
            "head": head_path,
            "dtype": dtype,
            "device": str(engine.device),
            "quantization": quantization,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "tree": asdict(tree),
            "autotune": args.autotune,
            "prompt_lookup_num_tokens": args.prompt_lookup_tokens,
            "warmup_tokens": args.warmup_tokens,
            "resumed_answers": len(done),  # answers reused from an interrupted run (--resume)
        },
        "hardware": hardware_info(engine.device),
        "memory": {"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": memory.peak_mb or None},
        "results": results,
        "summary": summarize(results, memory.peak_mb),
        "matched": matched_speedups(results) if sampling.greedy else [],  # sampled replies differ by design
    }
    if args.check_lossless:
        report["lossless"] = check_lossless(engine, questions, results, bound, args.max_new_tokens)
    md, png = write_report(report, Path(args.out))
    checkpoint.finish()
    print(md.read_text())
    print(f"wrote {args.out}, {md} and {png}")
    lossless = report.get("lossless")
    if lossless:
        for d in lossless["divergences"]:
            kind = "BUG" if d["bug"] else "near-tie"
            print(f"{kind}: question {d['question_id']} turn {d['turn']} {d['method']} diverges at token "
                  f"{d['position']}: vanilla {d['vanilla_token']} vs {d['method_token']}, top-2 margin "
                  f"{_fmt(d['margin'], '.4g')}, gap {_fmt(d['gap'], '.4g')} (bound {bound:g})")  # fmt: skip
        if lossless["bugs"]:
            print(f"lossless check FAILED: {lossless['bugs']} divergence(s) are not near-ties", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
