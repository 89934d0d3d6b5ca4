"""`python -m engine.bench`: parse the flags, load the engine, run, audit, and write the report."""

import argparse
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import engine.bench as package
from engine.autotune.cache import load_or_tune
from engine.bench.checkpoint import Checkpoint
from engine.bench.lossless import MARGIN_BOUNDS, check_lossless
from engine.bench.methods import BENCH_METHODS, DEFAULT_METHODS, build_methods
from engine.bench.questions import BenchSettings, load_questions
from engine.bench.report import fmt, write_report
from engine.bench.runner import MemoryMeter, run_benchmark
from engine.bench.stats import matched_speedups, summarize
from engine.cli import add_engine_arguments, engine_from_args, quantization_of
from engine.config import DEFAULT_LOOKUP, GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.hardware import hardware_info, peak_rss_mb


def run_settings(
    args, questions: list[dict], names: list[str], head_path, engine: Engine, settings: BenchSettings
) -> dict:
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
        "backend": engine.backend,
        "device": str(engine.device),
        "quantization": quantization_of(args),
        "threads": torch.get_num_threads(),
        **json.loads(json.dumps(asdict(settings))),  # max_new_tokens, sampling, tree, seed, ...
    }


def measured_engine(args):
    """`--backend auto` on a CPU: the engine launch.py would build, and the tuning behind it."""
    from engine.autotune.backends import tune_cpu
    from engine.backend import spec_for
    from engine.cli import head_folder, model_spec
    from engine.models import load_target, resolve_device

    spec = model_spec(args)
    if resolve_device(spec.device).type != "cpu":
        raise SystemExit("--backend auto measures CPU backends; on a GPU name one (--backend bf16)")
    path, found = head_folder(args.head)
    if not found:
        raise SystemExit(f"--backend auto tunes with a draft head; none at {path} (pass --head PATH)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(spec_for("fp32", spec))
    engine, tuning = tune_cpu(model, tokenizer, path, progress=not args.no_progress)
    return engine, str(path), tuning


def gguf_of(args, names: list[str]) -> str | None:
    """The GGUF file the target comes from, for the llama_cpp method: the default model's, or --model
    FILE.gguf; None when llama_cpp is not among `names` (finding the default's may download it)."""
    from engine.models import default_gguf

    if "llama_cpp" not in names:
        return None
    if args.model is None:
        return str(default_gguf(progress=False))
    return args.model if str(args.model).endswith(".gguf") else None


def git_commit() -> str | None:
    """The checkout's commit, with "+changes" when the work tree differs from it; None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=package.__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, help="Spec-Bench style jsonl (question_id, category, turns)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"{', '.join(BENCH_METHODS)} (default: all but llama_cpp, which needs llama-cpp-python)",
    )
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
    parser.add_argument(
        "--autotune", action="store_true", help="use the tree auto-tuned for this hardware and sampling instead"
    )
    parser.add_argument(
        "--prompt-lookup-tokens", type=int, default=DEFAULT_LOOKUP,
        help="prompt_lookup_num_tokens of hf_prompt_lookup, and the lookup branch of eagle2_lookup and eagle2_adaptive",
    )  # fmt: skip
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
    commit = git_commit()  # before the run: the code that is measured
    questions = load_questions(args.questions, args.limit, args.per_category)
    tree = TreeConfig(args.total_tokens, args.depth, args.top_k)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    choice = None
    if args.backend == "auto":  # the app's default: backend and trees measured on this CPU (launch.py)
        engine, head_path, tuning = measured_engine(args)
        choice = {"backend": tuning.choice.backend, "method": tuning.choice.method, "reason": tuning.choice.reason(),
                  "acceptance": tuning.acceptance_source}  # fmt: skip
        tree = tuning.greedy.tree if sampling.greedy else tuning.sampling.tree
    else:
        engine, head_path = engine_from_args(args, need_head=any(m.startswith("eagle") for m in names))
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
    methods = build_methods(engine, names, gguf_of(args, names))
    results = run_benchmark(
        engine, methods, questions, settings, not args.no_progress, memory, done, checkpoint.record,
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
            "backend": engine.backend,
            "backend_choice": choice,  # --backend auto: what was measured and why this backend
            "commit": commit,
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
                  f"{fmt(d['margin'], '.4g')}, gap {fmt(d['gap'], '.4g')} (bound {bound:g})")  # fmt: skip
        if lossless["bugs"]:
            print(f"lossless check FAILED: {lossless['bugs']} divergence(s) are not near-ties", file=sys.stderr)
            return 1
    return 0
