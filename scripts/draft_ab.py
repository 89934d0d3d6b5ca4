"""Drafting with an int8 target, three ways, on the same questions: the whole EAGLE-2 tree in one C call
(`Drafter.dynamic_tree`, engine/kernels.c draft_tree), one C call per tree level (`Drafter._grow`), and
call by call (the head's layer, then the int8 lm_head, log-softmax and top-k, each its own call, as the
drafter ran before `draft_rows`). All three build the same trees, so the replies must be identical; the
engine's stopwatch gives drafting and verifying time per cycle. Vanilla decoding runs in every round too.
One question per category (the 4th of each in the file), first turns, rounds alternating in one process.

    python -m scripts.draft_ab --questions path/to/spec_bench/question.jsonl [--lookup 5]
"""

import argparse
import time

import numpy as np
import torch

import engine.decode as decode
from engine.backend import spec_for
from engine.bench.questions import load_questions
from engine.checkpoint import load_head
from engine.config import GenerationConfig, TreeConfig
from engine.draft import Drafter
from engine.models import ModelSpec, default_head_path, load_target


class LevelDrafter(Drafter):
    """One C call per level (`draft_rows`), the frontier and the rerank in tensor ops."""

    def dynamic_tree(self, root_token, root_hidden, cfg):
        self.cache.truncate(self.cache.length)
        return self._grow(root_token, root_hidden, cfg)


class CallDrafter(LevelDrafter):
    """Each step its own call: the head's int8 layer (`RowsHead.run`), the int8 lm_head, then
    log-softmax and top-k (`Drafter._run`'s path for runs too long for one call)."""

    def _one_call(self, rows, top_k):
        return False

    def _top(self, hidden, k):
        scores, idx = self.rows_head.rows.top_logsoftmax(self._logits(hidden), k)
        return scores, (idx if self.vocab_ids is None else self.vocab_ids[idx])


VARIANTS = {"one call per tree": Drafter, "one call per level": LevelDrafter, "call by call": CallDrafter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--tree", default="4,3,4", help="TOTAL,DEPTH,TOPK")
    parser.add_argument("--lookup", type=int, default=0, help="prompt-lookup tokens (0: plain EAGLE-2)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_target(spec_for("int8", ModelSpec()))
    head = load_head(default_head_path(), model)
    engine = decode.Engine(model, tokenizer, head, reuse_prefix=False)  # every prompt prefilled in full
    questions = load_questions(args.questions)
    categories = dict.fromkeys(q["category"] for q in questions)
    chosen = [[q for q in questions if q["category"] == c][3] for c in categories]
    prompts = [engine.chat_ids([{"role": "user", "content": q["turns"][0]}]) for q in chosen]
    tree = TreeConfig(*map(int, args.tree.split(",")), lookup=args.lookup)
    runs = {"vanilla": ("vanilla", Drafter)} | {name: ("eagle2", cls) for name, cls in VARIANTS.items()}
    rates, draft, verify, replies = {}, {}, {}, {}
    for round_ in range(1, args.rounds + 1):
        for name, (method, drafter) in runs.items():
            decode.Drafter = drafter  # the class Engine.generate builds its drafter from
            config = GenerationConfig(method=method, max_new_tokens=args.max_new_tokens, tree=tree)
            start = time.perf_counter()
            ends = [list(engine.generate(ids, config))[-1] for ids in prompts]
            wall = time.perf_counter() - start
            cycles = sum(e["totals"]["cycles"] for e in ends)
            rates.setdefault(name, []).append(sum(len(e["output_ids"]) for e in ends) / wall)
            draft.setdefault(name, []).append(sum(e["totals"]["draft_ms"] for e in ends) / cycles)
            verify.setdefault(name, []).append(sum(e["totals"]["verify_ms"] for e in ends) / cycles)
            replies.setdefault(name, [e["output_ids"] for e in ends])
            print(f"round {round_}, {name}: {rates[name][-1]:.1f} tokens/s, {draft[name][-1]:.2f} ms drafting "
                  f"and {verify[name][-1]:.2f} ms verifying per cycle", flush=True)  # fmt: skip
    decode.Drafter = Drafter
    print(f"\nmedians over {args.rounds} rounds, {len(prompts)} questions, tree {args.tree}, lookup {args.lookup}:")
    for name in runs:
        print(f"  {name}: {np.median(rates[name]):.1f} tokens/s, drafting {np.median(draft[name]):.2f} ms, "
              f"verifying {np.median(verify[name]):.2f} ms per cycle")  # fmt: skip
    print("identical replies:", all(replies[name] == replies["vanilla"] for name in runs))


if __name__ == "__main__":
    main()
