"""A head's shipped acceptance table: τ of every tree in the auto-tune grids, measured once per head.

Acceptance depends on the target and the head, not on the machine, so a head can ship it: then the
first launch only times this machine's forwards (seconds) instead of calibrating (minutes, most of them
in the sampled calibration's target forwards on CPUs without fast bf16). The table lives beside the
head's weights as `acceptance.json`:

  {"format": 1, "head_sha256": first 16 hex digits of the weights file's sha256,
   "target": what produced the answers (model and backend), "command": how it was made,
   "greedy": {"samples": n, "table": [[total_tokens, depth, top_k, tau], ...]},
   "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "samples": n, "table": [...]}}

A table whose head_sha256 is not that of the head's weights file beside it is ignored: the head was
retrained or replaced.

    python -m engine.acceptance --backend int8 --tokens 128 --out HEAD/acceptance.json
"""

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from engine.config import SamplingConfig

FORMAT = 1
FILE = "acceptance.json"
SAMPLING = SamplingConfig(temperature=1.0)  # the sampling settings the app's sampling tree is tuned for


def head_digest(head_dir: Path) -> str:
    """sha256 of the head folder's weights file (first 16 hex digits): the same whatever dtype it runs in."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = Path(head_dir) / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest()[:16]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {head_dir}")


def _table(acceptance) -> dict:
    return {"samples": acceptance.samples, "table": [[*key, round(tau, 4)] for key, tau in acceptance.table.items()]}


def _measured(entry: dict):
    from engine.autotune.calibration import MeasuredAcceptance

    return MeasuredAcceptance({tuple(row[:3]): row[3] for row in entry["table"]}, entry["samples"])


def load_shipped(head_dir: Path | None, sampling: SamplingConfig = SamplingConfig()):
    """The shipped `MeasuredAcceptance` of the head in `head_dir` for greedy decoding or for `SAMPLING`,
    else None."""
    if head_dir is None or not (Path(head_dir) / FILE).is_file():
        return None
    try:
        data = json.loads((Path(head_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None
    if data.get("format") != FORMAT or data.get("head_sha256") != head_digest(head_dir):
        return None
    if sampling.greedy:
        return _measured(data["greedy"]) if "greedy" in data else None
    entry = data.get("sampling")
    if entry is None or any(entry.get(k) != v for k, v in asdict(sampling).items() if k != "seed"):
        return None
    return _measured(entry)


def main(argv: list[str] | None = None) -> int:
    from engine.autotune.calibration import CALIBRATION_PROMPTS, calibrate_acceptance, reference_answers
    from engine.autotune.choice import SAMPLED_GRID, tree_grid
    from engine.autotune.cli import read_prompts
    from engine.cli import add_engine_arguments, engine_from_args
    from engine.models import backend_name

    parser = argparse.ArgumentParser(prog="python -m engine.acceptance", description=__doc__.split("\n\n")[0])
    add_engine_arguments(parser)
    parser.add_argument("--prompts", default=None, help="jsonl of prompts (default: auto-tune's built-in ones)")
    parser.add_argument("--count", type=int, default=6, help="how many prompts")
    parser.add_argument("--tokens", type=int, default=128, help="answer length per prompt")
    parser.add_argument("--stride", type=int, default=2, help="draft at every N-th answer position (greedy)")
    parser.add_argument("--sampling-stride", type=int, default=4, help="the same for the sampled calibration")
    parser.add_argument("--out", required=True, help="where to write the table (normally HEAD/acceptance.json)")
    args = parser.parse_args(argv)
    engine, head_path = engine_from_args(args, need_head=True)
    prompts = read_prompts(args.prompts, args.count) if args.prompts else list(CALIBRATION_PROMPTS[: args.count])
    print(f"[eagle-chat] greedy answers to {len(prompts)} prompts", file=sys.stderr)
    answers = reference_answers(engine, prompts, args.tokens)
    greedy = calibrate_acceptance(engine, answers, tree_grid(), args.stride, progress=True)
    print(f"[eagle-chat] sampled answers (T={SAMPLING.temperature:g})", file=sys.stderr)
    answers = reference_answers(engine, prompts, args.tokens, SAMPLING)
    sampled = calibrate_acceptance(engine, answers, SAMPLED_GRID, args.sampling_stride, True, SAMPLING)
    name = Path(getattr(engine.model.config, "_name_or_path", "") or "model").name
    data = {
        "format": FORMAT,
        "head_sha256": head_digest(Path(head_path)),
        "target": f"{name} {backend_name(engine.model)}",
        "command": "python -m engine.acceptance " + " ".join(argv if argv is not None else sys.argv[1:]),
        "greedy": _table(greedy),
        "sampling": {**{k: v for k, v in asdict(SAMPLING).items() if k != "seed"}, **_table(sampled)},
    }
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, out)
    best_greedy, best_sampled = max(greedy.table.values()), max(sampled.table.values())
    print(f"wrote {out}: τ of the grid's best tree {best_greedy:.2f} greedy, {best_sampled:.2f} sampled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
