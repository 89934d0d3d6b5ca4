"""The command-line pieces every engine tool shares: the flags that pick the target, the head and the
hardware, and building an `Engine` from them.

`launch.py` (the app), `engine.bench`, `engine.autotune`, `engine.evaluate` and `engine.train` each parse
their own command line; they read these flags the same way through `model_spec` and `head_folder`, and
the tools build their engine with `engine_from_args`. Nothing heavy is imported until a model is loaded,
so a parser can refuse bad flags fast.
"""

import argparse
from pathlib import Path


def add_engine_arguments(parser: argparse.ArgumentParser, head: bool = True) -> None:
    """--model, --head (when `head`), --dtype, --device, --load-in-4bit / --load-in-8bit and --threads."""
    parser.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: SmolLM2-135M-Instruct)")
    if head:
        parser.add_argument("--head", default=None, help="draft head folder (default: the shipped head)")
    parser.add_argument(
        "--backend", default=None,
        help="how the target runs: int8 (CPU), fp32, bf16, fp16, bnb-8bit, bnb-4bit, or auto (the benchmark: measured "
        "on this CPU like launch.py); overrides --dtype and the "
        "quantization flags (engine/backend.py)",
    )
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit target")
    quant.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit target")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def quantization_of(args: argparse.Namespace) -> str | None:
    return "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None


def model_spec(args: argparse.Namespace):
    """The `ModelSpec` that --model, --dtype, --device and the quantization flags name."""
    from engine.models import ModelSpec

    spec = ModelSpec(args.model, args.dtype, args.device, quantization_of(args))
    if getattr(args, "backend", None) not in (None, "auto"):
        from engine.backend import spec_for

        spec = spec_for(args.backend, spec)
    return spec


def head_folder(head: str | None) -> tuple[Path, bool]:
    """The draft-head folder a --head value names (None: the shipped head), and whether a head is there."""
    from engine.models import default_head_path

    path = Path(head) if head else default_head_path()
    return path, (path / "config.json").is_file()


def engine_from_args(args: argparse.Namespace, need_head: bool):
    """Load the target (and the head when `need_head`); returns (engine, head path or None)."""
    import torch

    from engine.checkpoint import load_head
    from engine.decode import Engine
    from engine.models import load_target

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(model_spec(args))
    head, head_path = None, None
    if need_head:
        path, found = head_folder(args.head)
        if not found:
            raise SystemExit(
                f"no draft head at {path}; pass --head PATH (a folder with config.json and "
                f"model.safetensors), or run without the methods that draft"
            )
        head, head_path = load_head(path, model), str(path)
    return Engine(model, tokenizer, head), head_path
