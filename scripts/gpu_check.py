"""The first command on a GPU machine (issue #18 item 4): check and measure the GPU path in one call, in
at most --budget-s seconds (default 480 on a GPU), and write DIR/gpu_check.json and DIR/gpu_check.md.

    python -m scripts.gpu_check --out runs/gpu-check                  # on the GPU: sizes for <= 8 minutes
    python -m scripts.gpu_check --out runs/gpu-dry --device cpu       # the dry run: tiny sizes and probe

Steps, in this order, each with a progress line on stderr and a time budget:
  lossless        greedy eagle2, eagle2_lookup and eagle1 equal vanilla token for token, fp32, on the device
                  (tests/ has no CUDA marker: this is the CUDA test of the engine's promise)
  bench_bf16      engine.bench on the first questions of a Spec-Bench file, one per category: vanilla,
                  eagle2, eagle2_lookup, hf_generate (DIR/bench-bf16.json, .md, .png)
  profile         bf16: where an eagle2 and an eagle2_lookup cycle spend their time (draft per head cycle,
                  verify, host), torch.profiler's top ops of one generation each (DIR/profile-*.txt), and
                  eagle2 with cuDNN attention excluded from SDPA
  verify_cost     ms per target forward by tree size 1..128 after a 300-token context, bf16 and fp32
                  (engine/autotune/costs.py `measure_costs`, the tuner's own timing)
  bench_fp32      the benchmark in fp32 with the lossless audit
  probe_bf16      a random-weight model of an 8B-class Llama config (--probe-config 8b; tiny on a CPU):
                  vanilla through the Engine against transformers `generate` with a static cache, and
                  verify cost by tree size 1..64
  probe_4bit      the same with bitsandbytes nf4 decoder layers (skipped without CUDA or bitsandbytes)
  probe_compiled  `generate` with a static cache, compiled (transformers' own compile of the decode step)

A step that would not fit in what is left of the budget is not started; a started step is stopped by an
alarm at its budget. Every step catches its own failure, records it and the run moves on; the summary is
rewritten after every step, so a run killed from outside still leaves what it measured. Without the
default model in this machine's cache (a GPU machine cannot download it) the model steps run on a
random-weight stand-in of the same shape and a random head (`--stand-in`), which times the same work
(a random head's tree is as large as a trained one's) but accepts little; the benchmark needs the real
model and is skipped then. No step asserts a speed: this measures, the tests check behaviour.
"""

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scripts.gpu_measure import (
    LOOKUP,
    SHAPES,
    IdsTokenizer,
    default_model_cached,
    environment,
    free_memory,
    generation,
    hf_static,
    load_subject,
    model_argument,
    quantize_nf4,
    random_head,
    split_of,
    synthetic_model,
    verify_curve,
)
from scripts.gpu_report import bench_md, lossless_md, probe_md, profile_md, render, verify_md

DEFAULT_QUESTIONS = Path("../shared/data/benchmarks/spec_bench/question.jsonl")  # from the repository root
BENCH_METHODS = ("vanilla", "eagle2", "eagle2_lookup", "hf_generate")
VERIFY_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
PROBE_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Sizes:
    """How much each step runs: `full` fits a GPU's 8 minutes, `dry` a CPU's few."""

    prompts: int  # lossless: prompts per method
    lossless_tokens: int
    bench_questions: int  # the first N categories' first question (both turns of the multi-turn ones)
    bench_tokens: int
    warmup_tokens: int
    context: int  # tokens before a verify-cost curve
    repeats: int  # timings per point (the median is kept)
    profile_tokens: int
    probe_tokens: int
    budget_scale: float  # step budgets (and the default --budget-s) are set for a GPU; a CPU is slower


PRESETS = {
    "full": Sizes(prompts=3, lossless_tokens=64, bench_questions=3, bench_tokens=64, warmup_tokens=16,
                  context=300, repeats=5, profile_tokens=64, probe_tokens=128, budget_scale=1.0),
    "dry": Sizes(prompts=2, lossless_tokens=8, bench_questions=2, bench_tokens=8, warmup_tokens=4,
                 context=300, repeats=2, profile_tokens=8, probe_tokens=8, budget_scale=3.0),
}  # fmt: skip


@dataclass(frozen=True)
class Check:
    """What the whole run was asked for (parsed once in `main`)."""

    out: Path
    device: torch.device
    sizes: Sizes
    tree: object  # engine.config.TreeConfig
    model: str | None
    head: str | None
    questions: Path | None
    probe_config: str
    stand_in: str | None  # a SHAPES name: random weights instead of the real model
    notes: list[str] = field(default_factory=list)


class Skip(Exception):
    """A step that cannot run here; the message says why."""


class StepTimeout(BaseException):  # not an Exception: library code catching Exception must not swallow it
    pass


# ---- models -------------------------------------------------------------------------------------


# ---- steps --------------------------------------------------------------------------------------


def step_lossless(check: Check) -> dict:
    subject = load_subject(check, "float32")
    engine, tokens = subject.engine, check.sizes.lossless_tokens
    methods = {}
    for ids in subject.prompts:
        reference = generation(engine, ids, "vanilla", tokens, check.tree)["output_ids"]
        for method in ("eagle2", "eagle2_lookup", "eagle1"):
            run = generation(engine, ids, method, tokens, check.tree)
            row = methods.setdefault(method, {"equal": 0, "prompts": 0, "first_divergence": [], "tau": []})
            out = run["output_ids"]
            same = out == reference
            row["equal"] += same
            row["prompts"] += 1
            row["tau"].append(run["tau"])
            if not same:
                row["first_divergence"].append(next((i for i, (a, b) in enumerate(zip(out, reference)) if a != b),
                                                    min(len(out), len(reference))))  # fmt: skip
    for row in methods.values():
        row["tau"] = sum(row["tau"]) / len(row["tau"])
    return {"model": subject.label, "dtype": "float32", "new_tokens": tokens, "methods": methods,
            "passed": all(r["equal"] == r["prompts"] for r in methods.values())}  # fmt: skip


def bench(check: Check, dtype: str) -> dict:
    from engine.bench.cli import main as bench_main

    if check.stand_in:
        raise Skip("the benchmark needs the real model and its tokenizer (none cached here; see the notes)")
    if check.questions is None:
        raise Skip(f"no questions file: pass --questions (default {DEFAULT_QUESTIONS} is not there)")
    sizes, tag = check.sizes, {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    out = check.out / f"bench-{tag}.json"
    argv = [
        "--questions", str(check.questions), "--per-category", "1", "--limit", str(sizes.bench_questions),
        "--max-new-tokens", str(sizes.bench_tokens), "--warmup-tokens", str(sizes.warmup_tokens),
        "--methods", ",".join(BENCH_METHODS), "--dtype", dtype, "--device", str(check.device),
        "--total-tokens", str(check.tree.total_tokens), "--depth", str(check.tree.depth),
        "--top-k", str(check.tree.top_k), "--prompt-lookup-tokens", str(LOOKUP), "--no-progress",
        "--model", model_argument(check), "--out", str(out),
    ]  # fmt: skip
    if check.head:
        argv += ["--head", check.head]
    if dtype == "float32":
        argv.append("--check-lossless")
    try:
        status = bench_main(argv)
    except SystemExit as stop:  # the bench refuses bad flags with SystemExit: record it, move on
        raise RuntimeError(f"engine.bench stopped: {stop}") from None
    report = json.loads(out.read_text())
    methods = {}
    for name, stats in report["summary"].items():
        overall = stats["overall"]
        rows = [r for r in report["results"] if r["method"] == name]
        cycles = sum(r["cycles"] for r in rows)
        row = {k: overall.get(k) for k in ("tokens_per_s", "speedup_vs_vanilla", "tau", "draft_ms_per_cycle",
                                           "verify_ms_per_cycle", "head_share")}  # fmt: skip
        row["ms_per_cycle"] = 1000.0 * sum(r["wall_s"] for r in rows) / cycles if cycles else None
        if row["head_share"]:
            row["draft_ms_per_head_cycle"] = row["draft_ms_per_cycle"] / row["head_share"]
        methods[name] = row
    result = {"dtype": dtype, "questions": report["config"]["question_count"], "new_tokens": sizes.bench_tokens,
              "tree": report["config"]["tree"], "methods": methods, "report": out.with_suffix(".md").name,
              "exit_status": status}  # fmt: skip
    if "lossless" in report:
        lossless = report["lossless"]
        result["lossless"] = {"compared_turns": lossless["compared_turns"], "divergences": len(lossless["divergences"]),
                              "bugs": lossless["bugs"]}  # fmt: skip
    return result


def step_profile(check: Check) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    subject = load_subject(check, "bfloat16")
    engine, tokens, ids = subject.engine, check.sizes.profile_tokens, subject.prompts[0]
    cuda = check.device.type == "cuda"
    result = {"model": subject.label, "dtype": "bfloat16", "new_tokens": tokens, "methods": {}}
    for method in ("eagle2", "eagle2_lookup"):
        generation(engine, ids, method, check.sizes.warmup_tokens, check.tree)  # warm-up
        split = split_of(generation(engine, ids, method, tokens, check.tree))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            generation(engine, ids, method, tokens, check.tree)
        averages = prof.key_averages()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        (check.out / f"profile-{method}.txt").write_text(averages.table(sort_by=sort, row_limit=30))
        key = (lambda a: a.self_device_time_total) if cuda else (lambda a: a.self_cpu_time_total)
        top = sorted(averages, key=key, reverse=True)[:10]
        split["top_ops"] = [
            {"name": a.key, "calls": a.count, "self_cpu_ms": a.self_cpu_time_total / 1000.0,
             "self_device_ms": a.self_device_time_total / 1000.0 if cuda else None}
            for a in top
        ]  # fmt: skip
        result["methods"][method] = split
    # cuDNN attention plans per new shape and the KV length grows every cycle: time eagle2 without it
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        generation(engine, ids, "eagle2", check.sizes.warmup_tokens, check.tree)
        result["eagle2_without_cudnn_sdpa"] = split_of(generation(engine, ids, "eagle2", tokens, check.tree))
    return result


def step_verify_cost(check: Check) -> dict:
    result = {}
    for dtype in ("bfloat16", "float32"):
        subject = load_subject(check, dtype)
        result[dtype] = verify_curve(subject.engine, subject.context, VERIFY_SIZES, check.sizes.repeats, check.tree)
        result["model"] = subject.label
        del subject
        free_memory()
    return result


def probe(check: Check, kind: str) -> dict:
    """vanilla through the Engine against `generate` with a static cache on a random-weight model."""
    from engine.decode import Engine

    cuda = check.device.type == "cuda"
    if kind == "4bit":
        if not cuda:
            raise Skip("bitsandbytes 4-bit needs CUDA")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Skip("bitsandbytes is not installed here") from None
    if kind == "compiled" and not cuda:
        raise Skip("a compiled decode step is timed on CUDA only (on a CPU it would time the compiler)")
    sizes = check.sizes
    model = synthetic_model(check.probe_config, torch.bfloat16, check.device)
    if kind == "4bit":
        quantize_nf4(model)
    engine = Engine(model, IdsTokenizer(), random_head(model))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (sizes.context,), generator=g).tolist()
    result = {"config": check.probe_config, "shape": SHAPES[check.probe_config], "weights": "nf4" if kind == "4bit"
              else "bf16", "prompt_tokens": len(ids), "new_tokens": sizes.probe_tokens}  # fmt: skip
    compiled = kind == "compiled"
    if not compiled:
        generation(engine, ids, "vanilla", sizes.warmup_tokens, check.tree)
        result["engine_vanilla"] = split_of(generation(engine, ids, "vanilla", sizes.probe_tokens, check.tree))
    for _ in range(2 if compiled else 1):  # warm-up (compiled: compile, then capture), same shapes as the timed run
        hf_static(model, ids, sizes.probe_tokens if compiled else sizes.warmup_tokens, compiled)
    result["hf_static_compiled" if compiled else "hf_static"] = hf_static(model, ids, sizes.probe_tokens, compiled)
    if not compiled:
        result["verify"] = verify_curve(engine, ids, PROBE_SIZES, sizes.repeats, check.tree)
        ours, theirs = result["engine_vanilla"]["decode_ms_per_token"], result["hf_static"]["decode_ms_per_token"]
        result["engine_vs_hf_decode"] = theirs / ours if ours else None
    del engine, model
    free_memory()
    return result


# ---- running and reporting ----------------------------------------------------------------------


def _alarm(signum, frame):
    raise StepTimeout


def run_step(step: "Step", check: Check, seconds: float) -> dict:
    """Run one step under an alarm; returns its record (status ok, skipped, failed or timed_out)."""
    record = {"name": step.name, "budget_s": seconds}
    alarm = hasattr(signal, "setitimer")
    start = time.perf_counter()
    try:
        if alarm:
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, seconds)
        record.update(status="ok", result=step.run(check))
    except Skip as reason:
        record.update(status="skipped", reason=str(reason))
    except StepTimeout:
        record.update(status="timed_out", reason=f"stopped at its budget of {seconds:.0f} s")
    except Exception as error:  # a step's failure is a finding: record it and go on to the next step
        record.update(status="failed", error=f"{type(error).__name__}: {error}")
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    record["seconds"] = round(time.perf_counter() - start, 2)
    free_memory()
    return record


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: float
    run: object  # Check -> dict of numbers
    render: object  # that dict -> markdown lines


STEPS = (
    Step("lossless", 45, step_lossless, lossless_md),
    Step("bench_bf16", 100, lambda check: bench(check, "bfloat16"), bench_md),
    Step("profile", 60, step_profile, profile_md),
    Step("verify_cost", 30, step_verify_cost, verify_md),
    Step("bench_fp32", 70, lambda check: bench(check, "float32"), bench_md),
    Step("probe_bf16", 70, lambda check: probe(check, "bf16"), probe_md),
    Step("probe_4bit", 60, lambda check: probe(check, "4bit"), probe_md),
    Step("probe_compiled", 150, lambda check: probe(check, "compiled"), probe_md),
)


def write_summary(summary: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "gpu_check.md").write_text(render(summary, {step.name: step.render for step in STEPS}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the step files")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu")
    parser.add_argument("--model", default=None, help="target folder or id (default: the default model, cached)")
    parser.add_argument("--head", default=None, help="draft head folder (default: the shipped head)")
    parser.add_argument("--questions", default=None,
                        help=f"Spec-Bench question.jsonl (default: {DEFAULT_QUESTIONS} when it exists)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None,
                        help="no step starts that would not fit in it (default 480; the dry preset's, 3 times that)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: full on CUDA, else dry")
    parser.add_argument("--probe-config", choices=("tiny", "8b"), default=None, help="default: 8b on CUDA, tiny else")
    parser.add_argument("--stand-in", choices=sorted(SHAPES), default=None,
                        help="random weights of this shape for the model steps (default: smollm2 when the default "
                        "model is not cached and no --model is given)")  # fmt: skip
    parser.add_argument("--tree", default="60,6,10", help="TOTAL,DEPTH,TOPK draft tree (default: the paper's)")
    parser.add_argument("--only", default=None, help=f"steps to run, of {','.join(s.name for s in STEPS)}")
    parser.add_argument("--skip", default="", help="comma-separated steps not to run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from engine.config import TreeConfig
    from engine.models import resolve_device

    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    questions = Path(args.questions) if args.questions else (DEFAULT_QUESTIONS if DEFAULT_QUESTIONS.is_file() else None)
    notes = []
    stand_in = args.stand_in
    if stand_in is None and args.model is None and not default_model_cached():
        stand_in = "smollm2"
        notes.append("the default model is not in this machine's cache (a GPU machine cannot download it): the "
                     "model steps ran on a random-weight stand-in of its shape; the benchmark needs the real one")
    wanted = [s.strip() for s in args.only.split(",")] if args.only else [s.name for s in STEPS]
    unknown = set(wanted) - {s.name for s in STEPS}
    if unknown:
        raise SystemExit(f"unknown step(s) {sorted(unknown)}; choose from {', '.join(s.name for s in STEPS)}")
    steps = [s for s in STEPS if s.name in wanted and s.name not in args.skip.split(",")]
    preset = args.preset or ("full" if cuda else "dry")
    sizes = PRESETS[preset]
    total = args.budget_s if args.budget_s is not None else 480.0 * sizes.budget_scale
    check = Check(
        out=out, device=device, sizes=sizes,
        tree=TreeConfig(*map(int, args.tree.split(","))), model=args.model, head=args.head, questions=questions,
        probe_config=args.probe_config or ("8b" if cuda else "tiny"), stand_in=stand_in, notes=notes,
    )  # fmt: skip
    summary = {
        "config": {"command": "python -m scripts.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
                   "budget_s": total, "preset": preset,
                   "sizes": check.sizes.__dict__, "tree": check.tree.__dict__, "probe_config": check.probe_config,
                   "stand_in": stand_in, "questions": str(questions) if questions else None, "notes": notes},
        "environment": environment(device), "steps": [], "total_s": 0.0,
    }  # fmt: skip
    start = time.perf_counter()
    for i, step in enumerate(steps, start=1):
        left, budget = total - (time.perf_counter() - start), step.budget_s * sizes.budget_scale
        if budget > left:
            record = {"name": step.name, "budget_s": budget, "status": "skipped", "seconds": 0.0,
                      "reason": f"needs {budget:.0f} s, {left:.0f} s of the budget left"}  # fmt: skip
        else:
            print(f"[gpu_check {i}/{len(steps)}] {step.name}: budget {budget:.0f} s, {left:.0f} s left",
                  file=sys.stderr, flush=True)  # fmt: skip
            record = run_step(step, check, budget)
        print(f"[gpu_check {i}/{len(steps)}] {step.name}: {record['status']} in {record['seconds']:.1f} s "
              f"{record.get('reason') or record.get('error') or ''}", file=sys.stderr, flush=True)  # fmt: skip
        summary["steps"].append(record)
        summary["total_s"] = time.perf_counter() - start
        write_summary(summary, out)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
