"""The prompt-lookup branch's 1-token fallback (engine/lookup.py) against the rule without it, on the same
text: eagle2_lookup answers every question both ways, interleaved, and each pair of calls is timed over
the tokens both replies share (engine.bench's matched timing). Greedy, bf16, every turn.

    python docs/results/lookup_ab.py --questions ../shared/data/benchmarks/spec_bench/question.jsonl \
        --per-category 2
"""

import argparse
import functools

import engine.decode
from engine.bench.methods import EngineMethod
from engine.bench.questions import BenchSettings, load_questions
from engine.bench.runner import run_benchmark
from engine.bench.stats import matched_speedups, summarize
from engine.cli import add_engine_arguments, engine_from_args
from engine.config import TreeConfig
from engine.lookup import lookup_chain


class WithRule:
    """eagle2_lookup with the decode loop's chain search swapped for `rule`."""

    def __init__(self, method: EngineMethod, rule):
        self.method, self.rule = method, rule

    def run(self, prompt_ids, settings):
        engine.decode.lookup_chain = self.rule
        try:
            return self.method.run(prompt_ids, settings)
        finally:
            engine.decode.lookup_chain = lookup_chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--tree", default="8,4,4", help="TOTAL,DEPTH,TOPK (default: the tree tuned on the project's CPU)")
    add_engine_arguments(parser)
    parser.set_defaults(dtype="bfloat16", threads=2)
    args = parser.parse_args()
    eng, _ = engine_from_args(args, need_head=True)
    questions = load_questions(args.questions, per_category=args.per_category)
    method = EngineMethod(eng, "eagle2_lookup")
    rules = {"3,2,1": lookup_chain, "3,2": functools.partial(lookup_chain, ngrams=(3, 2))}
    methods = {name: WithRule(method, rule) for name, rule in rules.items()}
    settings = BenchSettings(tree=TreeConfig(*map(int, args.tree.split(","))))
    rows = run_benchmark(eng, methods, questions, settings, progress=True)
    (matched,) = matched_speedups(rows, against=["3,2"])
    summary = summarize(rows)
    print("3,2,1 against 3,2 on the text both replies share (above 1: the fallback is faster)")
    for category, m in [*matched["per_category"].items(), ("overall", matched["overall"])]:
        taus = [(summary[r]["overall"] if category == "overall" else summary[r]["per_category"][category])["tau"] for r in ("3,2", "3,2,1")]
        print(f"  {category:15s} {m['speedup'] or 0:.3f}x over {m['tokens']} tokens; τ {taus[0]:.2f} -> {taus[1]:.2f}")


if __name__ == "__main__":
    main()
