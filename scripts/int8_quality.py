"""How far the int8 backend is from the float32 model it is made from: teacher-forced on fp32's own greedy
replies to Spec-Bench questions (one per 60, first turns), the share of positions where int8's argmax
equals fp32's token and the mean negative log-likelihood per token, for int8 through the C kernels
and through torch ops (engine/kernels.py).

    python -m scripts.int8_quality --questions ../shared/data/benchmarks/spec_bench/question.jsonl
"""

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from engine.cli import add_engine_arguments, engine_from_args
from engine.int8 import quantize_int8
from engine.kv import new_cache
from engine.lean import LeanForward, attach_lean
from engine.verify import target_forward


def score(model, replies: list[tuple[int, list[int]]]) -> tuple[float, float, int]:
    """(argmax agreement, mean NLL per token, positions) over (prompt length, prompt + reply) pairs."""
    agree, nll, total = 0, 0.0, 0
    for prompt_len, ids in replies:
        ids = torch.tensor(ids)
        _, logits = target_forward(model, ids[:-1], torch.arange(len(ids) - 1), None, new_cache(model))
        logits, targets = logits[prompt_len - 1 :], ids[prompt_len:]  # (reply, V), (reply,)
        agree += int((logits.argmax(-1) == targets).sum())
        nll += float(F.cross_entropy(logits, targets, reduction="sum"))
        total += len(targets)
    return agree / total, nll / total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--every", type=int, default=60, help="take one question in this many")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    add_engine_arguments(parser)
    parser.set_defaults(threads=2, backend="fp32")
    args = parser.parse_args()
    engine, _ = engine_from_args(args, need_head=False)
    fp32 = engine.model
    with open(args.questions, encoding="utf-8") as f:
        questions = [json.loads(line) for line in f][:: args.every]
    replies = []
    for q in questions:
        ids = engine.chat_ids([{"role": "user", "content": q["turns"][0]}])
        out = fp32.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False)[0]
        replies.append((len(ids), out.tolist()))
    int8 = quantize_int8(copy.deepcopy(fp32))
    attach_lean(int8)
    with_kernels = int8.lean
    torch_ops = LeanForward(int8, kernels=False)
    rows = [("fp32", fp32, getattr(fp32, "lean", None)), ("int8, torch ops", int8, torch_ops)]
    if with_kernels.kernels is not None:
        rows.insert(1, ("int8, C kernels", int8, with_kernels))
    else:
        print("int8, C kernels: not available on this machine")
    for name, model, lean in rows:
        model.lean = lean
        agree, nll, total = score(model, replies)
        print(f"{name:22s} argmax = fp32's at {agree:.1%} of {total} positions, NLL/token {nll:.3f}")


if __name__ == "__main__":
    main()
