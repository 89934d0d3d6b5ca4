"""`python -m engine.autotune`: tune (or read the cached tuning) and print the numbers behind the choice."""

import argparse
import json
from pathlib import Path

import engine.autotune as package
from engine.autotune.cache import TuneResult, cache_path, load_or_tune_result
from engine.autotune.calibration import CALIBRATION_PROMPTS
from engine.cli import add_engine_arguments, engine_from_args
from engine.config import SamplingConfig


def read_prompts(path: str | Path, count: int) -> list[str]:
    """First `count` prompts of a jsonl file: a `prompt` field, or the first of `turns`."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("prompt") or (row.get("turns") or [None])[0]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: expected a `prompt` string or a `turns` list")
            prompts.append(text)
            if len(prompts) == count:
                break
    return prompts


def report(result: TuneResult, path: Path, top: int) -> str:
    lines = [result.summary(), f"cached in {path}", "", "verify cost (target forward over n tree nodes):"]
    lines += [f"  {n:4d} nodes  {ms:7.2f} ms" for n, ms in result.cost.verify]
    lines += ["", "draft cost (ms) by depth, one row per top-k:"]
    depths = sorted({d for d, _, _ in result.cost.draft})
    lines.append("  top_k " + "".join(f"{d:>8d}" for d in depths))
    for k in sorted({k for _, k, _ in result.cost.draft}):
        lines.append(f"  {k:5d} " + "".join(f"{result.cost.draft_ms(d, k):8.2f}" for d in depths))
    lines += ["", f"best trees (calibrated on {result.acceptance.samples} positions):",
              "  total depth top_k    tau  draft_ms verify_ms  tokens/s"]  # fmt: skip
    for c in result.ranked[:top]:
        t = c.tree
        lines.append(
            f"  {t.total_tokens:5d} {t.depth:5d} {t.top_k:5d} {c.tau:6.2f} {c.draft_ms:9.2f} {c.verify_ms:9.2f} "
            f"{c.tokens_per_s:9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.autotune", description=package.__doc__.split("\n\n")[0])
    add_engine_arguments(parser)
    parser.add_argument("--prompts", default=None, help="jsonl of calibration prompts (default: built-in)")
    parser.add_argument("--calibration-prompts", type=int, default=4, help="how many prompts to calibrate on")
    parser.add_argument("--calibration-tokens", type=int, default=64, help="answer length per calibration prompt")
    parser.add_argument("--calibration-stride", type=int, default=2, help="draft at every N-th answer position")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per cost point (median)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="tune for sampling at this temperature (0: greedy)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="tune for sampling with this top-p")
    parser.add_argument("--retune", action="store_true", help="ignore the cache and measure again")
    parser.add_argument("--top", type=int, default=10, help="how many ranked trees to print")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.prompts:
        prompts = read_prompts(args.prompts, args.calibration_prompts)
    else:
        prompts = list(CALIBRATION_PROMPTS[: args.calibration_prompts])
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    sampling.validate()
    engine, _ = engine_from_args(args, need_head=True)
    result = load_or_tune_result(
        engine, retune=args.retune, progress=not args.no_progress, prompts=prompts,
        new_tokens=args.calibration_tokens, stride=args.calibration_stride, repeats=args.repeats, sampling=sampling,
    )  # fmt: skip
    print(report(result, cache_path(result.key), args.top))
    return 0
