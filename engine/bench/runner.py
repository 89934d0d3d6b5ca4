"""Running the benchmark: one warm-up answer per method, then every question answered by every method in
turn (A B C, A B C, ...), each method feeding back its own answers on multi-turn questions."""

import sys
from dataclasses import replace

import torch
from tqdm import tqdm

from engine.bench.methods import PHASES, Method
from engine.bench.questions import BenchSettings, turn_prompt
from engine.decode import Engine


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
    """Every turn of one question with one method, its own answers fed back as history. The first turn
    starts cold; later turns may reuse the method's own cache of the turns before (`forget`, where the
    method keeps one)."""
    answers, outputs = [], []
    forget = getattr(method, "forget", None)
    if forget is not None:
        forget()
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
