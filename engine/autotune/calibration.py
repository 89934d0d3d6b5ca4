"""The measured acceptance model: tau of every grid tree from the head's candidate pools along the
target's own answers (greedy: how far each tree follows the answer; sampling: its expected accepted
length, from one target forward over each pool). See engine/autotune/__init__.py."""

import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from engine.autotune.choice import pool_size
from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.draft import Drafter
from engine.kv import new_cache
from engine.tree import Tree
from engine.verify import processed_probs, target_forward, tree_attention_mask

CALIBRATION_PROMPTS = (  # varied, short, and not from any benchmark
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works and when you would use one instead of a list.",
    "A train travels 120 km in 1.5 hours, then 80 km in 1 hour. What is its average speed? Show your steps.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarize the main causes of the French Revolution in a few sentences.",
    "Give me three tips for staying focused while working from home.",
)


@dataclass
class MeasuredAcceptance:
    table: dict[tuple[int, int, int], float]  # (total_tokens, depth, top_k) -> tau
    samples: int  # draft positions per top_k behind each tau

    def tau(self, tree: TreeConfig) -> float:
        key = (tree.total_tokens, tree.depth, tree.top_k)
        if key not in self.table:
            raise ValueError(f"no calibrated acceptance for tree {key}; calibrate with a grid that holds it")
        return self.table[key]



def accepted_lengths(pool: Tree, continuation: list[int], totals, depths) -> dict[tuple[int, int], int]:
    """Accepted draft length of every EAGLE-2 tree (total_tokens, depth) cut from a full candidate pool,
    under greedy verification. `continuation` is the target's greedy tokens after the root; a node is
    accepted when its whole root path follows it (see `expected_lengths`)."""
    tokens, parents, node_depths = pool.tokens.tolist(), pool.parents.tolist(), pool.depths.tolist()
    reach = [1.0] + [0.0] * (len(tokens) - 1)
    for i in range(1, len(tokens)):
        d = node_depths[i]
        if reach[parents[i]] and d <= len(continuation) and tokens[i] == continuation[d - 1]:
            reach[i] = 1.0
    return {key: round(value) for key, value in expected_lengths(pool, reach, totals, depths).items()}


def expected_lengths(pool: Tree, reach: list[float], totals, depths) -> dict[tuple[int, int], float]:
    """Expected accepted draft length of every EAGLE-2 tree (total_tokens, depth) cut from a full pool.

    `pool` is a draft with total_tokens >= its pool size, so its nodes are the whole pool in pool order
    (root first, then depth by depth); `reach[i]` is the probability that verification accepts node i
    (greedy: 1 on the target's continuation, else 0). A tree (T, d) keeps the T best-scoring pool nodes
    of depth <= d (stable sort, as `select_dynamic`), a set that holds every kept node's ancestors, so
    its expected accepted length is the sum of `reach` over the nodes it keeps."""
    node_depths, scores = pool.depths.tolist(), pool.scores.float().tolist()
    out = {}
    for d in depths:
        kept = sorted((i for i in range(1, len(scores)) if node_depths[i] <= d), key=lambda i: -scores[i])
        running = [0.0]
        for node in kept:
            running.append(running[-1] + reach[node])
        for total in totals:
            out[(total, d)] = running[min(total, len(kept))]
    return out


@torch.no_grad()
def sampled_reach(engine: Engine, cache, root_position: int, pool: Tree, sampling: SamplingConfig) -> list[float]:
    """P(verification accepts node i) for every pool node when the target samples: one forward over
    the whole pool after the first `root_position` entries of `cache` (which may hold more: they are
    masked out, and the pool's entries are dropped again). A node is accepted when the target's draw at
    every node on its path is the next node's token (engine/verify.py), so its probability is the
    product of the processed target probabilities along its path."""
    n = pool.size
    mask = tree_attention_mask(pool, cache.get_seq_length(), engine.dtype, visible=root_position)
    _, logits = target_forward(engine.model, pool.tokens, root_position + pool.depths, mask, cache)  # (n, V)
    cache.crop(-n)
    probs = processed_probs(logits, sampling)  # (n, V)
    edge = probs[pool.parents.clamp(min=0), pool.tokens]  # (n,) P(parent's draw is this node's token)
    edge[0] = 1.0
    on_path = pool.paths >= 0
    return torch.where(on_path, edge[pool.paths.clamp(min=0)], 1.0).prod(dim=-1).tolist()


def target_features(engine: Engine, ids: list[int], cache=None) -> torch.Tensor:
    """The features the head reads (len(ids), F) of a plain causal forward (into `cache` when given)."""
    tokens = torch.tensor(ids, dtype=torch.long, device=engine.device)
    positions = torch.arange(len(ids), device=engine.device)
    cache = new_cache(engine.model) if cache is None else cache
    features, _ = target_forward(engine.model, tokens, positions, None, cache, logits=False, capture=engine.capture)
    return features


def drafter_for(engine: Engine, capacity: int) -> Drafter:
    return Drafter(engine.head, engine.model.get_input_embeddings(), engine.model.lm_head, capacity)


def reference_answers(
    engine: Engine, prompts: list[str], new_tokens: int, sampling: SamplingConfig = SamplingConfig()
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per prompt: greedy, or sampled (seeded) when `sampling` says so.
    Vanilla: its cost does not depend on the head."""
    answers = []
    for seed, prompt in enumerate(prompts):
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        config = GenerationConfig(method="vanilla", max_new_tokens=new_tokens, sampling=sampling, seed=seed)
        end = list(engine.generate(ids, config))[-1]
        answers.append((ids, end["output_ids"]))
    return answers


@torch.no_grad()
def calibrate_acceptance(
    engine: Engine,
    answers: list[tuple[list[int], list[int]]],
    grid: list[TreeConfig],
    stride: int = 1,
    progress: bool = False,
    sampling: SamplingConfig = SamplingConfig(),
) -> MeasuredAcceptance:
    """tau of every grid tree from the head's candidate pools along known answers (module doc), drafting
    at every `stride`-th answer position. Greedy: a tree's accepted length is how far it follows the
    answer. Sampling: the expected accepted length, from one target forward over each pool
    (`sampled_reach`)."""
    top_ks = sorted({t.top_k for t in grid})
    deepest = {k: max(t.depth for t in grid if t.top_k == k) for k in top_ks}
    totals, depths = sorted({t.total_tokens for t in grid}), sorted({t.depth for t in grid})
    reach = max(deepest.values())  # a root needs this many known tokens after it
    roots = [range(len(p), len(p) + len(out) - reach, stride) for p, out in answers]  # root = seq index
    sums: dict[tuple[int, int, int], float] = {}
    samples = 0
    with tqdm(total=sum(map(len, roots)), desc="calibrating", unit="pos", disable=not progress, file=sys.stderr) as bar:
        for (prompt_ids, output_ids), positions in zip(answers, roots):
            if not positions:
                continue
            seq = prompt_ids + output_ids
            cache = None if sampling.greedy else new_cache(engine.model)  # sampling verifies pools against it
            features = target_features(engine, seq[:-1], cache)  # (N-1, H)
            tokens = torch.tensor(seq, dtype=torch.long, device=engine.device)  # (N,)
            drafter = drafter_for(engine, len(seq) + max(pool_size(deepest[k], k) for k in top_ks))
            done = 0  # pairs (f_i, x_{i+1}) for i < done are in the head's cache
            for p in positions:  # the first root is the first answer token, as after the engine's prefill
                hidden = drafter.extend(tokens[done + 1 : p + 1], features[done:p])
                done = p
                continuation = seq[p + 1 : p + 1 + reach]
                for k in top_ks:
                    depth = deepest[k]
                    pool = drafter.dynamic_tree(tokens[p], hidden, TreeConfig(pool_size(depth, k), depth, k))
                    drafter.cache.truncate(drafter.cache.length)  # drop this draft's scratch entries
                    cut = [d for d in depths if d <= depth]
                    if sampling.greedy:
                        lengths = accepted_lengths(pool, continuation, totals, cut)
                    else:
                        lengths = expected_lengths(pool, sampled_reach(engine, cache, p, pool, sampling), totals, cut)
                    for (total, d), accepted in lengths.items():
                        sums[(total, d, k)] = sums.get((total, d, k), 0) + accepted
                samples += 1
                bar.update()
    if samples == 0:
        raise ValueError(
            f"calibration answers are too short to score trees of depth {reach}: raise the calibration "
            f"tokens or use more prompts"
        )
    keys = [(t.total_tokens, t.depth, t.top_k) for t in grid]
    return MeasuredAcceptance({key: 1.0 + sums[key] / samples for key in keys}, samples)
