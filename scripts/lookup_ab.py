"""The prompt-lookup branch's 1-token fallback (engine/lookup.py) against the rule without it, on the same
text: eagle2_lookup answers every question both ways, interleaved, and each pair of calls is timed over
the tokens both replies share (engine.bench's matched timing). Greedy, bf16, every turn.

    python -m scripts.lookup_ab --questions ../shared/data/benchmarks/spec_bench/question.jsonl \
        --per-category 2
"""

import argparse

from engine.bench.methods import EngineMethod
from engine.bench.questions import BenchSettings, load_questions
from engine.bench.runner import run_benchmark
from engine.bench.stats import matched_speedups, summarize
from engine.cli import add_engine_arguments, engine_from_args
from engine.config import TreeConfig
from engine.decode import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument(
        "--tree", default="8,4,4", help="TOTAL,DEPTH,TOPK (default: the tree auto-tuned on a 2-core CPU)"
    )
    add_engine_arguments(parser)
    parser.set_defaults(dtype="bfloat16", threads=2)
    args = parser.parse_args()
    eng, _ = engine_from_args(args, need_head=True)
    questions = load_questions(args.questions, per_category=args.per_category)
    rules = {"3,2,1": (3, 2, 1), "3,2": (3, 2)}  # the n-grams the lookup branch matches, longest first
    methods = {
        name: EngineMethod(Engine(eng.model, eng.tokenizer, eng.head, lookup_ngrams=ngrams), "eagle2_lookup")
        for name, ngrams in rules.items()
    }
    settings = BenchSettings(tree=TreeConfig(*map(int, args.tree.split(","))))
    rows = run_benchmark(eng, methods, questions, settings, progress=True)
    (matched,) = matched_speedups(rows, against=["3,2"])
    summary = summarize(rows)
    print("3,2,1 against 3,2 on the text both replies share (above 1: the fallback is faster)")
    for category, m in [*matched["per_category"].items(), ("overall", matched["overall"])]:
        taus = []
        for r in ("3,2", "3,2,1"):
            stats = summary[r]["overall"] if category == "overall" else summary[r]["per_category"][category]
            taus.append(stats["tau"])
        print(f"  {category:15s} {m['speedup'] or 0:.3f}x over {m['tokens']} tokens; τ {taus[0]:.2f} -> {taus[1]:.2f}")


if __name__ == "__main__":
    main()
