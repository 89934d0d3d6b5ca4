"""How far could any draft head go at T=1? The τ of a perfect drafter (its distribution is the target's
own) with the best tree of n nodes, at positions of sampled replies.

Verification draws the target's token at every node and keeps the longest root path that matches, so a
node is accepted with the product of the target's probabilities along its path, and a tree's expected
accepted length is the sum of those products over its nodes. A child's product never exceeds its
parent's, so the best n-node tree holds the n largest path products, which a best-first search over
the target's own distributions pops in order (one target forward per expanded node).

    python -m scripts.t1_bound --answers RESULT.json \
        --questions ../shared/data/benchmarks/spec_bench/question.jsonl --stride 8

`--answers` is a benchmark result at T=1: its vanilla replies (first turns) give the contexts.
"""

import argparse
import copy
import heapq
import json

import torch
from tqdm import tqdm

from engine.bench.questions import load_questions, turn_prompt
from engine.cli import add_engine_arguments, engine_from_args
from engine.kv import new_cache
from engine.verify import target_forward

BUDGETS = (1, 2, 4, 8, 16)  # tree sizes reported
WIDTH = 8  # children pushed per expanded node: more than any best 16-node tree uses at one node here


@torch.no_grad()
def next_probs(model, cache, past: int, path: list[int]) -> torch.Tensor:
    """The target's next-token distribution after `path`, on a copy of the context's cache."""
    cache = copy.deepcopy(cache)
    _, logits = target_forward(model, torch.tensor(path), torch.arange(past, past + len(path)), None, cache)
    return logits[-1].softmax(-1)


@torch.no_grad()
def best_tree_masses(model, context: list[int], nodes: int) -> list[float]:
    """Path products of the best `nodes`-node tree rooted after `context`, largest first."""
    cache = new_cache(model)
    past = len(context) - 1  # the root (the last token) is not in the cache, as in the engine
    target_forward(model, torch.tensor(context[:-1]), torch.arange(past), None, cache, logits=False)
    root = context[-1]
    probs = next_probs(model, cache, past, [root])
    heap = [(-float(p), (int(t),)) for p, t in zip(*probs.topk(WIDTH))]
    heapq.heapify(heap)
    masses = []
    while len(masses) < nodes:
        neg, path = heapq.heappop(heap)
        masses.append(-neg)
        if len(masses) < nodes:
            probs = next_probs(model, cache, past, [root, *path])
            for p, t in zip(*probs.topk(WIDTH)):
                heapq.heappush(heap, (neg * float(p), path + (int(t),)))
    return masses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", required=True)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--stride", type=int, default=8, help="take every STRIDE-th position of each reply")
    add_engine_arguments(parser)
    parser.set_defaults(dtype="bfloat16", threads=2)
    args = parser.parse_args()
    engine, _ = engine_from_args(args, need_head=False)
    model = engine.model
    questions = {q["question_id"]: q for q in load_questions(args.questions)}
    report = json.load(open(args.answers))
    assert report["config"]["temperature"] > 0, "the bound is for sampling: pass a run with --temperature > 0"
    contexts = []
    for row in report["results"]:
        if row["method"] == "vanilla":
            prompt = turn_prompt(engine, questions[row["question_id"]], [], report["config"]["max_new_tokens"])
            reply = row["output_ids"][0]
            contexts += [prompt + reply[:t] for t in range(0, len(reply) - 1, args.stride)]
    sums = torch.zeros(max(BUDGETS))
    for context in tqdm(contexts, desc="positions"):
        sums += torch.tensor(best_tree_masses(model, context, max(BUDGETS))).cumsum(0)
    taus = ", ".join(f"{n} nodes {1 + float(sums[n - 1]) / len(contexts):.2f}" for n in BUDGETS)
    print(f"perfect-drafter τ at T={report['config']['temperature']} over {len(contexts)} positions: {taus}")


if __name__ == "__main__":
    main()
