"""The measured cost model: the target's verify latency per tree size, interpolated, and the head's draft
latency per (depth, top_k), fitted per top_k as a fixed cost plus a cost per depth step.

Each draft is timed right after a one-token target step, as in decoding, where every draft follows a
verify: the target's weights have just streamed through the caches and pushed the head's out. Timed
back to back instead, drafts find the head in cache and came out up to 2 ms faster per cycle than in
decoding on a 2-core CPU (docs/experiments.md), which made the tuner expect speedups it did not get."""

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from engine.autotune.calibration import drafter_for
from engine.autotune.choice import DEPTHS, MAX_POOL, TOP_KS, pool_size
from engine.config import SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.kv import new_cache
from engine.tree import make_tree
from engine.verify import accept, draw_tokens, target_forward, tree_attention_mask

NODE_COUNTS = (1, 8, 16, 32, 48, 64, 96, 128)
# How `measure_costs` times, in the tuning caches' keys: a tuning timed another way is timed again.
TIMING = "drafts after a target step, interleaved rounds"


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise linear through (xs, ys), extended linearly past both ends (one point: constant)."""
    if len(xs) == 1:
        return ys[0]
    if x < xs[0]:
        return ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    if x > xs[-1]:
        return ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(np.interp(x, xs, ys))


@dataclass
class MeasuredCost:
    verify: list[tuple[int, float]]  # (tree nodes, ms), nodes ascending
    draft: list[tuple[int, int, float]]  # (depth, top_k, ms)

    def verify_ms(self, nodes: int) -> float:
        return _interp(nodes, [n for n, _ in self.verify], [ms for _, ms in self.verify])

    def draft_ms(self, depth: int, top_k: int) -> float:
        """A least-squares line over depth for this top_k: a fixed cost plus a cost per depth step (one
        head step and one lm_head per level), which irons out noise in single points."""
        points = [(d, ms) for d, k, ms in self.draft if k == top_k]
        if not points:
            measured = sorted({k for _, k, _ in self.draft})
            raise ValueError(f"draft cost not measured for top_k {top_k}; measured: {measured}")
        depths = {d for d, _ in points}
        if len(depths) == 1:
            return float(np.mean([ms for _, ms in points]))
        per_step, fixed = np.polyfit([d for d, _ in points], [ms for _, ms in points], 1)
        return float(fixed + per_step * depth)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def _interleaved_ms(stages: list, repeats: int, progress: bool = False) -> list[float]:
    """Median ms of each (fn, before) stage over `repeats` rounds after a warm-up round; a round times
    every stage once, so a machine whose speed drifts over the seconds of timing (shared VMs drift by
    tens of percent) shifts all stages alike instead of some. `before()`, untimed, runs ahead of its fn."""
    times: list[list[float]] = [[] for _ in stages]
    with tqdm(total=repeats + 1, desc="timing", disable=not progress, file=sys.stderr, unit="round") as bar:
        for round_ in range(repeats + 1):
            for (fn, before), out in zip(stages, times):
                if before is not None:
                    before()
                start = time.perf_counter()
                fn()
                if round_:  # the first round warms up
                    out.append((time.perf_counter() - start) * 1000.0)
            bar.update()
    return [float(np.median(t)) for t in times]


@torch.no_grad()
def measure_costs(
    engine: Engine,
    context_ids: list[int],
    node_counts=NODE_COUNTS,
    draft_points: list[tuple[int, int]] | None = None,
    repeats: int = 5,
    accepted: int = 3,
    progress: bool = False,
    sampling: SamplingConfig = SamplingConfig(),
) -> MeasuredCost:
    """Verify latency per tree size and draft latency per (depth, top_k), after `context_ids` (the
    length of context changes attention cost, so pass a realistic one; the draws at the nodes follow
    `sampling`, which costs more than argmax). Each point is a median over rounds that time every point
    once (`_interleaved_ms`)."""
    draft_points = draft_points or [(d, k) for k in TOP_KS for d in DEPTHS if pool_size(d, k) <= MAX_POOL]
    past = len(context_ids)
    if past < accepted + 2:
        raise ValueError(f"timing needs a context of at least {accepted + 2} tokens, got {past}")
    model, device = engine.model, engine.device
    generator = None if sampling.greedy else torch.Generator(device=device).manual_seed(0)
    context = torch.tensor(context_ids, dtype=torch.long, device=device)  # (P,)
    cache = new_cache(model)
    positions = torch.arange(past, device=device)
    features, _ = target_forward(model, context, positions, None, cache, logits=False, capture=engine.capture)

    def verify(n: int):
        parents = torch.tensor([-1] + [0] * (n - 1), dtype=torch.long, device=device)  # a star: shape is free
        depths = torch.tensor([0] + [1] * (n - 1), dtype=torch.long, device=device)
        tokens = context[torch.arange(n, device=device) % past]  # (n,) any tokens: the cost is the same
        tree = make_tree(tokens, parents, depths, torch.zeros(n, device=device), max_depth=1)

        def once():  # the engine's verify stage
            mask = tree_attention_mask(tree, past, engine.dtype)
            _, logits = target_forward(model, tree.tokens, past + tree.depths, mask, cache, capture=engine.capture)
            int(accept(tree, draw_tokens(logits, sampling, generator)))  # the cycle's host sync
            cache.crop(-n)

        return once

    drafter = drafter_for(engine, past + max(pool_size(d, k) for d, k in draft_points))
    split = past - 1 - accepted  # pairs (f_i, x_{i+1}) with i < split are committed context
    drafter.extend(context[1 : split + 1], features[:split])
    base = drafter.cache.length
    pairs = (context[split + 1 :], features[split : past - 1])  # the last cycle's `accepted` pairs

    def draft(depth: int, top_k: int):
        tree_cfg = TreeConfig(min(64, pool_size(depth, top_k)), depth, top_k)

        def once():  # the engine's draft stage: feed the accepted pairs, grow the tree
            hidden = drafter.extend(*pairs)
            int(drafter.dynamic_tree(context[-1], hidden, tree_cfg).tokens[-1])
            drafter.cache.truncate(base)

        return once

    target_step = verify(1)  # what precedes every draft in decoding (see the module doc)
    stages = [(verify(n), None) for n in node_counts] + [(draft(d, k), target_step) for d, k in draft_points]
    times = _interleaved_ms(stages, repeats, progress)
    verify_points = list(zip(node_counts, times[: len(node_counts)]))
    draft_costs = [(d, k, ms) for (d, k), ms in zip(draft_points, times[len(node_counts) :])]
    return MeasuredCost(verify_points, draft_costs)
