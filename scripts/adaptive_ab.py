"""The adaptive head (engine/gate.py) against the same engine without it: eagle2 with the prompt-lookup
branch, with and without `adaptive`, on the same questions, alternating, two rounds. Greedy, bf16, first
turns. Prints tokens/s, τ and the share of cycles the head drafted, per category.

    python -m scripts.adaptive_ab --questions ../shared/data/benchmarks/spec_bench/question.jsonl \
        --categories writing,roleplay,translation --per-category 3
"""

import argparse
import time
from collections import defaultdict
from dataclasses import replace

from engine.bench.questions import load_questions
from engine.cli import add_engine_arguments, engine_from_args
from engine.config import GenerationConfig, TreeConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--categories", default="writing,roleplay,translation")
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument(
        "--tree", default="8,4,4", help="TOTAL,DEPTH,TOPK (default: the tree auto-tuned on a 2-core CPU)"
    )
    parser.add_argument("--lookup", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    add_engine_arguments(parser)
    parser.set_defaults(dtype="bfloat16", threads=2)
    args = parser.parse_args()
    engine, _ = engine_from_args(args, need_head=True)
    questions = load_questions(args.questions)
    chosen = [
        q for c in args.categories.split(",") for q in [q for q in questions if q["category"] == c][: args.per_category]
    ]
    tree = TreeConfig(*map(int, args.tree.split(",")), lookup=args.lookup)
    variants = {"eagle2_lookup": tree, "eagle2_adaptive": replace(tree, adaptive=True)}
    totals = defaultdict(lambda: defaultdict(float))  # (variant, category) -> sums
    for _ in range(2):
        for q in chosen:
            ids = engine.chat_ids([{"role": "user", "content": q["turns"][0]}])
            for name, variant in variants.items():
                engine.forget()  # neither variant starts from the other's kept cache
                start = time.perf_counter()
                config = GenerationConfig(method="eagle2", max_new_tokens=args.max_new_tokens, tree=variant)
                end = list(engine.generate(ids, config))[-1]
                sums = totals[name, q["category"]]
                sums["wall"] += time.perf_counter() - start
                for key in ("new_tokens", "cycles", "head_cycles"):
                    sums[key] += end["totals"][key]
                sums["turns"] += 1
    for (name, category), s in sorted(totals.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(
            f"{category:12s} {name:16s} {s['new_tokens'] / s['wall']:6.1f} tokens/s  "
            f"τ {(s['new_tokens'] - s['turns']) / s['cycles']:.2f}  "
            f"head drafted {s['head_cycles'] / s['cycles']:.0%} of cycles"
        )


if __name__ == "__main__":
    main()
