"""Auto-tuning the draft tree for this machine: the (total_tokens, depth, top_k) with the most tokens/s.

Expected tokens/s of a tree = 1000 * tau(tree) / (draft_ms(depth, top_k) + verify_ms(total_tokens + 1)):
  - verify_ms(n): the target's forward over an n-node tree (mask, forward, lm_head, draws, acceptance,
    one host sync), measured for a few n on a realistic context and interpolated linearly.
  - draft_ms(depth, top_k): feeding the head the last cycle's accepted tokens, then growing an EAGLE-2
    tree of that depth and branching; measured for every (depth, top_k) of the grid, then fitted per
    top_k as a fixed cost plus a cost per depth step.
  - tau(tree): mean tokens committed per cycle (accepted drafts + the bonus token), from calibration.

Calibration (greedy): the target's answers to a few prompts are generated once. At every `stride`-th
position of an answer the head drafts its whole EAGLE-2 candidate pool for each top_k (depth D:
k + (D-1)k^2 candidates). The pool of a shallower tree is a prefix of the deeper one's, and EAGLE-2 keeps the
`total_tokens` best-scoring candidates, so the tree of every (total_tokens, depth) is known without
drafting it again; its accepted length is how far one of its paths follows the known continuation,
which is exactly what greedy verification would accept there. One draft per top_k and position scores
the whole grid; no verification is run.

Calibration (sampling, T > 0): the answers are sampled with the same settings, and one target forward
over each whole pool gives every node's probability of being accepted (the product of the target's
processed probabilities along its path, engine/verify.py), so each tree's *expected* accepted length is
a sum over the nodes it keeps: exact for these contexts, with no sampling noise. Sampling accepts less,
so it is tuned on a grid of smaller trees (`SAMPLED_GRID`) and cached under its own key.

`choose_tree` is the pure part: any cost and acceptance model in, the best grid point out. Results are
cached as JSON per (model, head weights, dtype, device and its CPU/GPU model and threads, and sampling
settings when T > 0; on a CPU also its ISA flags) under `cache_dir()/autotune/`; `load_or_tune` reads the cache or tunes (a minute or
two on a 2-core CPU for the default model) and is what `launch.py` calls for greedy decoding.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from engine.cli import add_engine_arguments, engine_from_args
from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.draft import Drafter
from engine.hardware import hardware_info
from engine.head import weights_digest
from engine.kv import new_cache
from engine.models import cache_dir
from engine.tree import Tree, make_tree
from engine.verify import accept, draw_tokens, processed_probs, target_forward, tree_attention_mask

FORMAT = 1  # bump when the cached JSON changes meaning
MAX_POOL = 512  # TreeConfig's total_tokens limit: the largest candidate pool drafted in calibration
TOTALS = (4, 8, 12, 16, 24, 32, 48, 64, 80, 96)
DEPTHS = (2, 3, 4, 5, 6, 7, 8)
TOP_KS = (4, 6, 8, 10)
NODE_COUNTS = (1, 8, 16, 32, 48, 64, 96, 128)
CALIBRATION_PROMPTS = (  # varied, short, and not from any benchmark
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works and when you would use one instead of a list.",
    "A train travels 120 km in 1.5 hours, then 80 km in 1 hour. What is its average speed? Show your steps.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Summarize the main causes of the French Revolution in a few sentences.",
    "Give me three tips for staying focused while working from home.",
)


# ---- the choice (pure) --------------------------------------------------------------------------


class CostModel(Protocol):
    def verify_ms(self, nodes: int) -> float: ...
    def draft_ms(self, depth: int, top_k: int) -> float: ...


class AcceptanceModel(Protocol):
    def tau(self, tree: TreeConfig) -> float: ...


@dataclass(frozen=True)
class Candidate:
    tree: TreeConfig
    tau: float
    draft_ms: float
    verify_ms: float

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.tau / (self.draft_ms + self.verify_ms)


def pool_size(depth: int, top_k: int) -> int:
    """Candidates an EAGLE-2 draft of this depth and branching produces before reranking."""
    return top_k + (depth - 1) * top_k * top_k


def tree_grid(totals=TOTALS, depths=DEPTHS, top_ks=TOP_KS) -> list[TreeConfig]:
    """Every (total_tokens, depth, top_k) worth scoring: the pool fits calibration, and total_tokens does
    not exceed the pool (a larger budget would select the same tree)."""
    return [
        TreeConfig(total, depth, k)
        for k in top_ks
        for depth in depths
        if pool_size(depth, k) <= MAX_POOL
        for total in totals
        if total <= pool_size(depth, k)
    ]


# Sampling accepts less, so smaller trees win; each pool is verified in calibration, so the grid stays small.
SAMPLED_GRID = tree_grid(totals=(2, 4, 6, 8, 12, 16, 24, 32), depths=(1, 2, 3, 4, 5), top_ks=(2, 4, 6, 8))


def rank_trees(cost: CostModel, acceptance: AcceptanceModel, grid: list[TreeConfig]) -> list[Candidate]:
    """Grid points by expected tokens/s, best first; ties go to the smaller tree."""
    candidates = [
        Candidate(
            tree, acceptance.tau(tree), cost.draft_ms(tree.depth, tree.top_k), cost.verify_ms(tree.total_tokens + 1)
        )
        for tree in grid
    ]
    return sorted(candidates, key=lambda c: (-c.tokens_per_s, c.tree.total_tokens, c.tree.depth, c.tree.top_k))


def choose_tree(cost: CostModel, acceptance: AcceptanceModel, grid: list[TreeConfig]) -> Candidate:
    """The grid point with the most expected tokens/s: tau / (draft_ms + verify_ms(total_tokens + 1))."""
    if not grid:
        raise ValueError("the tree grid is empty: nothing to choose from")
    return rank_trees(cost, acceptance, grid)[0]


# ---- measured models ----------------------------------------------------------------------------


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


@dataclass
class MeasuredAcceptance:
    table: dict[tuple[int, int, int], float]  # (total_tokens, depth, top_k) -> tau
    samples: int  # draft positions per top_k behind each tau

    def tau(self, tree: TreeConfig) -> float:
        key = (tree.total_tokens, tree.depth, tree.top_k)
        if key not in self.table:
            raise ValueError(f"no calibrated acceptance for tree {key}; calibrate with a grid that holds it")
        return self.table[key]


# ---- calibration --------------------------------------------------------------------------------


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
    """Target features (len(ids), H) of a plain causal forward (into `cache` when given)."""
    tokens = torch.tensor(ids, dtype=torch.long, device=engine.device)
    positions = torch.arange(len(ids), device=engine.device)
    features, _ = target_forward(engine.model, tokens, positions, None, new_cache(engine.model) if cache is None else cache, logits=False)
    return features


def _drafter(engine: Engine, capacity: int) -> Drafter:
    return Drafter(engine.head, engine.model.get_input_embeddings(), engine.model.lm_head, capacity)


def reference_answers(
    engine: Engine, prompts: list[str], new_tokens: int, sampling: SamplingConfig = SamplingConfig()
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per prompt: greedy, or sampled (seeded) when `sampling` says so.
    Vanilla: its cost does not depend on the head."""
    answers = []
    for seed, prompt in enumerate(prompts):
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        end = None
        config = GenerationConfig(method="vanilla", max_new_tokens=new_tokens, sampling=sampling, seed=seed)
        for end in engine.generate(ids, config):
            pass
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
            drafter = _drafter(engine, len(seq) + max(pool_size(deepest[k], k) for k in top_ks))
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


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


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
    `sampling`, which costs more than argmax). Each point is a median."""
    draft_points = draft_points or [(d, k) for k in TOP_KS for d in DEPTHS if pool_size(d, k) <= MAX_POOL]
    past = len(context_ids)
    if past < accepted + 2:
        raise ValueError(f"timing needs a context of at least {accepted + 2} tokens, got {past}")
    model, device = engine.model, engine.device
    generator = None if sampling.greedy else torch.Generator(device=device).manual_seed(0)
    context = torch.tensor(context_ids, dtype=torch.long, device=device)  # (P,)
    cache = new_cache(model)
    features, _ = target_forward(model, context, torch.arange(past, device=device), None, cache, logits=False)

    def verify(n: int):
        parents = torch.tensor([-1] + [0] * (n - 1), dtype=torch.long, device=device)  # a star: shape is free
        depths = torch.tensor([0] + [1] * (n - 1), dtype=torch.long, device=device)
        tokens = context[torch.arange(n, device=device) % past]  # (n,) any tokens: the cost is the same
        tree = make_tree(tokens, parents, depths, torch.zeros(n, device=device), max_depth=1)

        def once():  # the engine's verify stage
            mask = tree_attention_mask(tree, past, engine.dtype)
            _, logits = target_forward(model, tree.tokens, past + tree.depths, mask, cache)  # (n, V)
            int(accept(tree, draw_tokens(logits, sampling, generator)))  # the cycle's host sync
            cache.crop(-n)

        return once

    drafter = _drafter(engine, past + max(pool_size(d, k) for d, k in draft_points))
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

    verify_points, draft_costs = [], []
    with tqdm(total=len(node_counts) + len(draft_points), desc="timing", disable=not progress, file=sys.stderr) as bar:
        for n in node_counts:
            verify_points.append((n, _median_ms(verify(n), repeats)))
            bar.update()
        for depth, top_k in draft_points:
            draft_costs.append((depth, top_k, _median_ms(draft(depth, top_k), repeats)))
            bar.update()
    return MeasuredCost(verify_points, draft_costs)


# ---- tuning and its cache -----------------------------------------------------------------------


@dataclass
class TuneResult:
    key: dict
    tree: TreeConfig
    tau: float
    tokens_per_s: float  # expected, from the cost and acceptance models
    vanilla_tokens_per_s: float  # 1000 / verify_ms(1)
    cost: MeasuredCost
    acceptance: MeasuredAcceptance
    ranked: list[Candidate] = field(default_factory=list)  # best candidates, for reports

    @property
    def speedup(self) -> float:
        return self.tokens_per_s / self.vanilla_tokens_per_s

    def summary(self) -> str:
        t, sampling = self.tree, self.key.get("sampling")
        decoding = (
            " for greedy decoding" if sampling is None
            else f" for sampling at temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}"
            + (f", top-k {sampling['top_k']}" if sampling["top_k"] else "")
        )  # fmt: skip
        line = (
            f"auto-tuned tree{decoding}: {t.describe()} "
            f"(expected τ {self.tau:.2f}, {self.tokens_per_s:.1f} tokens/s, {self.speedup:.2f}x vanilla "
            f"on this machine; launch.py {'--tree' if sampling is None else '--sampling-tree'} "
            f"{t.total_tokens},{t.depth},{t.top_k})"
        )
        if self.speedup < 1.0:
            line += "; no tree beats vanilla here with this head, so vanilla is the faster choice"
        return line

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "tree": asdict(self.tree),
            "tau": self.tau,
            "tokens_per_s": self.tokens_per_s,
            "vanilla_tokens_per_s": self.vanilla_tokens_per_s,
            "cost": {"verify": self.cost.verify, "draft": self.cost.draft},
            "acceptance": {
                "samples": self.acceptance.samples,
                "table": [[*key, tau] for key, tau in self.acceptance.table.items()],
            },
            "ranked": [{**asdict(c.tree), "tau": c.tau, "draft_ms": c.draft_ms, "verify_ms": c.verify_ms,
                        "tokens_per_s": c.tokens_per_s} for c in self.ranked],  # fmt: skip
        }

    @classmethod
    def from_json(cls, data: dict) -> "TuneResult":
        if data.get("format") != FORMAT:
            raise ValueError(f"auto-tune cache format {data.get('format')} is not {FORMAT}")
        ranked = [
            Candidate(TreeConfig(c["total_tokens"], c["depth"], c["top_k"]), c["tau"], c["draft_ms"], c["verify_ms"])
            for c in data["ranked"]
        ]
        return cls(
            key=data["key"],
            tree=TreeConfig(**data["tree"]),
            tau=data["tau"],
            tokens_per_s=data["tokens_per_s"],
            vanilla_tokens_per_s=data["vanilla_tokens_per_s"],
            cost=MeasuredCost([tuple(p) for p in data["cost"]["verify"]], [tuple(p) for p in data["cost"]["draft"]]),
            acceptance=MeasuredAcceptance(
                {tuple(row[:3]): row[3] for row in data["acceptance"]["table"]}, data["acceptance"]["samples"]
            ),
            ranked=ranked,
        )


def tuning_key(engine: Engine, sampling: SamplingConfig = SamplingConfig()) -> dict:
    """What the tuned tree depends on: model, head weights, dtype, the hardware it was timed on (on a CPU
    with the ISA flags that pick its kernels), and the sampling settings when not greedy (they change
    acceptance)."""
    if engine.head is None:
        raise ValueError("auto-tuning picks the draft tree, so it needs a draft head; load one with --head")
    hw = hardware_info(engine.device)
    where = hw["gpu"] if hw["gpu"] else f"{hw['cpu']}, {hw['threads']} threads"
    config = engine.model.config
    key = {
        "model": getattr(config, "_name_or_path", "") or config.model_type,
        "model_shape": [config.hidden_size, config.num_hidden_layers, config.vocab_size],
        "head_sha256": weights_digest(engine.head)[:16],
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": f"{engine.device} ({where})",
        "torch": hw["torch"],
    }
    if engine.device.type == "cpu":  # the same CPU model ships with and without bf16 or AMX kernels
        key["isa"] = hw["isa"]
    if not sampling.greedy:  # greedy keys carry no sampling entry: greedy tunings cached before stay valid
        key["sampling"] = asdict(sampling)
    return key


def cache_path(key: dict, root: Path | None = None) -> Path:
    name = re.sub(r"[^A-Za-z0-9.]+", "-", Path(key["model"]).name or "model").strip("-")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return (root or cache_dir()) / "autotune" / f"{name}-{key['dtype']}-{digest}.json"


def tune(
    engine: Engine,
    prompts: list[str] = CALIBRATION_PROMPTS[:4],
    new_tokens: int = 64,
    stride: int = 2,
    grid: list[TreeConfig] | None = None,
    node_counts=NODE_COUNTS,
    repeats: int = 5,
    progress: bool = False,
    sampling: SamplingConfig = SamplingConfig(),
) -> TuneResult:
    """Measure costs and acceptance on this machine and choose the tree, for greedy decoding or for the
    given sampling settings (then on `SAMPLED_GRID`, the trees small enough to pay when sampling)."""
    key = tuning_key(engine, sampling)
    grid = grid or (tree_grid() if sampling.greedy else SAMPLED_GRID)
    answers = reference_answers(engine, list(prompts), new_tokens, sampling)
    acceptance = calibrate_acceptance(engine, answers, grid, stride, progress, sampling)
    longest = max(answers, key=lambda a: len(a[0]) + len(a[1]))
    draft_points = sorted({(t.depth, t.top_k) for t in grid})
    cost = measure_costs(
        engine, longest[0] + longest[1], node_counts, draft_points, repeats, progress=progress, sampling=sampling
    )
    ranked = rank_trees(cost, acceptance, grid)
    best = ranked[0]
    return TuneResult(
        key=key,
        tree=best.tree,
        tau=best.tau,
        tokens_per_s=best.tokens_per_s,
        vanilla_tokens_per_s=1000.0 / cost.verify_ms(1),
        cost=cost,
        acceptance=acceptance,
        ranked=ranked[:20],
    )


def load_or_tune_result(
    engine: Engine, cache: Path | None = None, retune: bool = False, progress: bool = False, **tune_args
) -> TuneResult:
    """The cached tuning for this model, head, dtype and device, or a fresh one (then cached)."""
    key = tuning_key(engine, tune_args.get("sampling", SamplingConfig()))
    path = cache_path(key, cache)
    if not retune and path.is_file():
        try:
            result = TuneResult.from_json(json.loads(path.read_text()))
            if result.key == key:
                return result
        except (ValueError, KeyError, TypeError) as error:
            print(f"[eagle-chat] ignoring unreadable auto-tune cache {path} ({error}); tuning again", file=sys.stderr)
    if progress:
        print(
            "[eagle-chat] auto-tuning the draft tree for this machine (once per model, head, dtype and device)",
            file=sys.stderr,
        )
    result = tune(engine, progress=progress, **tune_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    os.replace(partial, path)
    return result


def load_or_tune(
    engine: Engine, cache: Path | None = None, retune: bool = False, progress: bool = False, **tune_args
) -> TreeConfig:
    """The tree to use on this machine (see `load_or_tune_result` for the numbers behind it)."""
    return load_or_tune_result(engine, cache, retune, progress, **tune_args).tree


# ---- command line -------------------------------------------------------------------------------


def read_prompts(path: str | Path, count: int) -> list[str]:
    """First `count` prompts of a jsonl file: a `prompt` field, or the first of `turns`."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("prompt") or (row.get("turns") or [None])[0]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: expected a `prompt` string or a `turns` list")
            prompts.append(text)
            if len(prompts) == count:
                break
    return prompts


def report(result: TuneResult, path: Path, top: int) -> str:
    lines = [result.summary(), f"cached in {path}", "", "verify cost (target forward over n tree nodes):"]
    lines += [f"  {n:4d} nodes  {ms:7.2f} ms" for n, ms in result.cost.verify]
    lines += ["", "draft cost (ms) by depth, one row per top-k:"]
    depths = sorted({d for d, _, _ in result.cost.draft})
    lines.append("  top_k " + "".join(f"{d:>8d}" for d in depths))
    for k in sorted({k for _, k, _ in result.cost.draft}):
        lines.append(f"  {k:5d} " + "".join(f"{result.cost.draft_ms(d, k):8.2f}" for d in depths))
    lines += ["", f"best trees (calibrated on {result.acceptance.samples} positions):",
              "  total depth top_k    tau  draft_ms verify_ms  tokens/s"]  # fmt: skip
    for c in result.ranked[:top]:
        t = c.tree
        lines.append(
            f"  {t.total_tokens:5d} {t.depth:5d} {t.top_k:5d} {c.tau:6.2f} {c.draft_ms:9.2f} {c.verify_ms:9.2f} "
            f"{c.tokens_per_s:9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.autotune", description=__doc__.split("\n\n")[0])
    add_engine_arguments(parser)
    parser.add_argument("--prompts", default=None, help="jsonl of calibration prompts (default: built-in)")
    parser.add_argument("--calibration-prompts", type=int, default=4, help="how many prompts to calibrate on")
    parser.add_argument("--calibration-tokens", type=int, default=64, help="answer length per calibration prompt")
    parser.add_argument("--calibration-stride", type=int, default=2, help="draft at every N-th answer position")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per cost point (median)")
    parser.add_argument("--temperature", type=float, default=0.0, help="tune for sampling at this temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="tune for sampling with this top-p")
    parser.add_argument("--retune", action="store_true", help="ignore the cache and measure again")
    parser.add_argument("--top", type=int, default=10, help="how many ranked trees to print")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.prompts:
        prompts = read_prompts(args.prompts, args.calibration_prompts)
    else:
        prompts = list(CALIBRATION_PROMPTS[: args.calibration_prompts])
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    sampling.validate()
    engine, _ = engine_from_args(args, need_head=True)
    result = load_or_tune_result(
        engine, retune=args.retune, progress=not args.no_progress, prompts=prompts,
        new_tokens=args.calibration_tokens, stride=args.calibration_stride, repeats=args.repeats, sampling=sampling,
    )  # fmt: skip
    print(report(result, cache_path(result.key), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
