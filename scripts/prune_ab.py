"""The EAGLE-2 drafter with and without its early stop (engine/draft.py `_settled`), on the same questions:
the replies must be identical, and the engine's stopwatch gives the drafting time per cycle. One question
per category (the 4th of each in the file), first turn, 128 new tokens, bf16, two rounds alternating.

    python -m scripts.prune_ab --questions ../shared/data/benchmarks/spec_bench/question.jsonl
"""

import argparse

from engine.bench.questions import load_questions
from engine.cli import add_engine_arguments, engine_from_args
from engine.config import GenerationConfig, TreeConfig
from engine.decode import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument(
        "--tree", default="8,4,4", help="TOTAL,DEPTH,TOPK (default: the tree auto-tuned on a 2-core CPU)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_engine_arguments(parser)
    parser.set_defaults(dtype="bfloat16", threads=2)
    args = parser.parse_args()
    engine, _ = engine_from_args(args, need_head=True)
    questions = load_questions(args.questions)
    categories = dict.fromkeys(q["category"] for q in questions)
    chosen = [[q for q in questions if q["category"] == c][3] for c in categories]
    prompts = [engine.chat_ids([{"role": "user", "content": q["turns"][0]}]) for q in chosen]
    tree = TreeConfig(*map(int, args.tree.split(",")))
    config = GenerationConfig(method="eagle2", max_new_tokens=args.max_new_tokens, tree=tree)
    engines = {  # every prompt prefilled in full: timed runs do not start from a kept cache
        prune: Engine(engine.model, engine.tokenizer, engine.head, prune=prune, reuse_prefix=False)
        for prune in (False, True)
    }
    replies = {}
    for round_ in (1, 2):
        for prune, variant in engines.items():
            ends = [list(variant.generate(ids, config))[-1] for ids in prompts]
            cycles = sum(e["totals"]["cycles"] for e in ends)
            draft_ms = sum(e["totals"]["draft_ms"] for e in ends) / cycles
            replies.setdefault(prune, [e["output_ids"] for e in ends])
            label = "early stop" if prune else "full depth"
            print(f"round {round_}, {label}: {draft_ms:.2f} ms drafting per cycle over {cycles} cycles", flush=True)
    print("identical replies:", replies[False] == replies[True])


if __name__ == "__main__":
    main()
