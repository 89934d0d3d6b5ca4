"""Acceptance of a draft head: τ per category and acceptance by depth, at T=0 and T=1.

    python -m engine.evaluate --questions ../shared/data/benchmarks/spec_bench/question.jsonl \
        --per-category 3 --temperatures 0,1 --out runs/eval.json

Questions are picked as the benchmark picks them (engine/bench/questions.py: evenly spaced per category).

τ is the mean number of tokens committed per verify cycle (accepted drafts + the bonus token).
Acceptance by depth d is the share of cycles whose accepted path reaches depth d. Multi-turn questions
feed each answer back as history. Speed is the benchmark's job (engine/bench/); this reports only
acceptance, so it is valid on any machine load.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from engine.bench.questions import load_questions, turn_prompt
from engine.cli import add_engine_arguments, engine_from_args
from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine


def acceptance(engine: Engine, questions: list[dict], config: GenerationConfig, desc: str = "") -> dict:
    """Per category: cycles, tokens, τ, and acceptance-by-depth shares."""
    stats = defaultdict(lambda: {"cycles": 0, "tokens": 0, "depth_hist": defaultdict(int)})
    for q in tqdm(questions, desc=desc or f"{config.method} T={config.sampling.temperature}", unit="question"):
        answers = []
        for _ in q["turns"]:
            events = list(engine.generate(turn_prompt(engine, q, answers, config.max_new_tokens), config))
            s = stats[q["category"]]
            for e in events:
                if e["type"] == "cycle" and e["cycle"] > 0:
                    s["cycles"] += 1
                    s["tokens"] += len(e["new_token_ids"])
                    s["depth_hist"][len(e["accepted"]) - 1] += 1
            answers.append(events[-1]["text"])
    out = {}
    for cat, s in list(stats.items()) + [("overall", merge(stats.values()))]:
        max_d = max(s["depth_hist"], default=0)
        cycles = max(s["cycles"], 1)
        reach = [sum(n for d, n in s["depth_hist"].items() if d >= k) / cycles for k in range(1, max_d + 1)]
        out[cat] = {"cycles": s["cycles"], "tokens": s["tokens"], "tau": s["tokens"] / cycles, "accept_by_depth": reach}
    return out


def merge(stats) -> dict:
    total = {"cycles": 0, "tokens": 0, "depth_hist": defaultdict(int)}
    for s in stats:
        total["cycles"] += s["cycles"]
        total["tokens"] += s["tokens"]
        for d, n in s["depth_hist"].items():
            total["depth_hist"][d] += n
    return total


def markdown(results: dict) -> str:
    temps = list(results)
    cats = sorted({c for r in results.values() for c in r if c != "overall"}) + ["overall"]
    lines = ["| category | " + " | ".join(f"τ T={t}" for t in temps) + " |", "|---|" + "---|" * len(temps)]
    for c in cats:
        cells = [f"{results[t][c]['tau']:.2f}" if c in results[t] else "-" for t in temps]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Report τ and acceptance by depth of a draft head.")
    p.add_argument("--questions", required=True, help="Spec-Bench style jsonl (question_id, category, turns)")
    add_engine_arguments(p)
    p.add_argument("--method", default="eagle2", choices=["eagle1", "eagle2"])
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--per-category", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--total-tokens", type=int, default=60)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--lookup", type=int, default=0, help="prompt-lookup branch tokens (0: plain EAGLE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    engine, _ = engine_from_args(args, need_head=True)
    questions = load_questions(args.questions, args.limit, args.per_category)
    tree = TreeConfig(args.total_tokens, args.depth, args.top_k, args.lookup)
    results = {}
    for t in [float(x) for x in args.temperatures.split(",")]:
        cfg = GenerationConfig(args.method, args.max_new_tokens, SamplingConfig(temperature=t), tree, seed=args.seed)
        results[str(t)] = acceptance(engine, questions, cfg)
        if args.out:  # after every temperature, so a long run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))
    print(markdown(results))
    for t, r in results.items():
        depths = ", ".join(f"d{d + 1} {v:.2f}" for d, v in enumerate(r["overall"]["accept_by_depth"]))
        print(f"T={t} acceptance by depth (overall): {depths}", file=sys.stderr)


if __name__ == "__main__":
    main()
