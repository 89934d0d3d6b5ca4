"""Draft trees as pure tensor functions: dynamic (EAGLE-2) selection and static (EAGLE-1) plans.

A `Tree` holds n nodes in topological order (every parent index is smaller than its child's); node 0 is
the root, the last committed token. Scores are cumulative draft log-probabilities, so a child never
scores above its parent; selection sorts stably by score over candidates listed parent-before-child,
which is why an ancestor of a kept node is always kept, ties included.

Nothing here reads model weights or syncs with the host except `leaf_paths` (for reporting only).
"""

from dataclasses import dataclass

import torch

from engine.events import TreeView


@dataclass
class Tree:
    tokens: torch.Tensor  # (n,) long, node 0 = root
    parents: torch.Tensor  # (n,) long, parents[0] = -1
    depths: torch.Tensor  # (n,) long, depths[0] = 0
    scores: torch.Tensor  # (n,) float, cumulative draft log-prob, root 0
    ancestors: torch.Tensor  # (n, n) bool, [i, j]: j is i or an ancestor of i
    paths: torch.Tensor  # (n, max_depth + 1) long, root-to-node path of every node, -1 padded

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def leaf_paths(self) -> list[list[int]]:
        """Root-to-leaf node paths (host sync; for reports and tests, not the hot path)."""
        parents = self.parents.tolist()
        has_child = set(parents[1:])
        rows = self.paths.tolist()
        return [[j for j in rows[i] if j >= 0] for i in range(len(parents)) if i not in has_child]

    def view(self) -> TreeView:
        return TreeView(
            tokens=self.tokens.tolist(),
            parents=self.parents.tolist(),
            depths=self.depths.tolist(),
            scores=[round(s, 4) for s in self.scores.float().tolist()],
        )


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(n, n) bool: [i, j] is True when j == i or j is an ancestor of i."""
    n = parents.shape[0]
    idx = torch.arange(n, device=parents.device)
    up = parents.clamp(min=0)  # root points to itself
    anc = torch.zeros(n, n, dtype=torch.bool, device=parents.device)
    cur = idx
    for _ in range(max_depth + 1):  # a depth-d node has d ancestors
        anc[idx, cur] = True
        cur = up[cur]
    return anc


def node_paths(parents: torch.Tensor, depths: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(n, max_depth + 1) long: row i lists the nodes from the root to i by depth, -1 after i."""
    n = parents.shape[0]
    paths = torch.full((n, max_depth + 1), -1, dtype=torch.long, device=parents.device)
    up = parents.clamp(min=0)
    cur = torch.arange(n, device=parents.device)
    for _ in range(max_depth + 1):
        paths.scatter_(1, depths[cur].unsqueeze(1), cur.unsqueeze(1))  # root rewrites slot 0 with 0
        cur = up[cur]
    return paths


def make_tree(tokens, parents, depths, scores, max_depth: int) -> Tree:
    return Tree(
        tokens=tokens,
        parents=parents,
        depths=depths,
        scores=scores,
        ancestors=ancestor_mask(parents, max_depth),
        paths=node_paths(parents, depths, max_depth),
    )


def select_dynamic(
    root_token: torch.Tensor,  # () long
    pool_tokens: torch.Tensor,  # (m,) candidates, listed so that parents precede children
    pool_parents: torch.Tensor,  # (m,) index into the pool, -1 for children of the root
    pool_depths: torch.Tensor,  # (m,) depth >= 1
    pool_scores: torch.Tensor,  # (m,) cumulative log-prob
    total_tokens: int,
    max_depth: int,
) -> Tree:
    """EAGLE-2 rerank: keep the `total_tokens` best-scoring candidates, then index them as a tree."""
    m = pool_tokens.shape[0]
    keep_n = min(total_tokens, m)
    order = torch.sort(pool_scores, descending=True, stable=True).indices[:keep_n]  # (keep_n,)
    keep = torch.sort(order).values  # (keep_n,) back to pool order: topological
    remap = torch.full((m + 1,), -1, dtype=torch.long, device=pool_tokens.device)
    remap[keep] = torch.arange(1, keep_n + 1, device=pool_tokens.device)
    remap[m] = 0  # pool parent -1 wraps to index m: the root
    kept_parents = pool_parents[keep]
    parents = remap[torch.where(kept_parents < 0, m, kept_parents)]  # (keep_n,) tree index
    minus_one = torch.full((1,), -1, dtype=torch.long, device=pool_tokens.device)
    zero = torch.zeros(1, dtype=torch.long, device=pool_tokens.device)
    return make_tree(
        tokens=torch.cat([root_token.view(1), pool_tokens[keep]]),
        parents=torch.cat([minus_one, parents]),
        depths=torch.cat([zero, pool_depths[keep]]),
        scores=torch.cat([torch.zeros(1, dtype=pool_scores.dtype, device=pool_scores.device), pool_scores[keep]]),
        max_depth=max_depth,
    )


def root_only(root_token: torch.Tensor) -> Tree:
    """The one-node tree: verifying it is a plain decoding step."""
    device = root_token.device
    zero = torch.zeros(1, dtype=torch.long, device=device)
    return Tree(
        tokens=root_token.view(1),
        parents=zero - 1,
        depths=zero,
        scores=torch.zeros(1, device=device),
        ancestors=torch.ones(1, 1, dtype=torch.bool, device=device),
        paths=zero.view(1, 1),
    )


# The static tree of EAGLE-1 (its `mc_sim_7b_63` choices): each entry is a path of child ranks, e.g.
# [0, 1] = the 2nd most likely child of the most likely first token. 25 drafted nodes, depth 5.
EAGLE1_DEFAULT_TREE = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)  # fmt: skip


@dataclass(frozen=True)
class StaticStep:
    """One drafting step of a static tree.

    The draft runs on `fed` (nodes at depth d-1; for d == 1 nothing is fed, the root's hidden state is
    used), then node `children[i]` takes the `ranks[i]`-th best token of fed row `rows[i]`.
    """

    fed: tuple[int, ...]  # tree node indices run through the draft at this step
    fed_mask: tuple[tuple[bool, ...], ...]  # (len(fed), slots so far): draft-cache slots each may see
    children: tuple[int, ...]
    rows: tuple[int, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class StaticPlan:
    parents: tuple[int, ...]  # per tree node, root first
    depths: tuple[int, ...]
    steps: tuple[StaticStep, ...]
    top_k: int


def static_plan(choices=EAGLE1_DEFAULT_TREE, depth: int = 32, total_tokens: int = 10**6) -> StaticPlan:
    """Turn rank paths into per-depth drafting steps, cut to `depth` and the first `total_tokens` nodes."""
    paths = sorted({tuple(c) for c in choices if 0 < len(c) <= depth}, key=lambda c: (len(c), c))
    known, kept = {()}, []
    for p in paths:  # keep a node only if its parent is kept, up to the budget
        if p[:-1] in known and len(kept) < total_tokens:
            kept.append(p)
            known.add(p)
    index = {(): 0} | {p: i + 1 for i, p in enumerate(kept)}
    parents = (-1,) + tuple(index[p[:-1]] for p in kept)
    depths = (0,) + tuple(len(p) for p in kept)
    slot = {}  # node -> draft-cache slot once it has been fed
    steps = []
    max_d = max(depths)
    for d in range(1, max_d + 1):
        children = [index[p] for p in kept if len(p) == d]
        fed = sorted({parents[c] for c in children}) if d > 1 else []
        for f in fed:
            slot[f] = len(slot)
        fed_mask = []
        for f in fed:
            row = [False] * len(slot)
            node = f
            while node > 0:
                row[slot[node]] = True
                node = parents[node]
            fed_mask.append(tuple(row))
        rows = [fed.index(parents[c]) if d > 1 else 0 for c in children]
        ranks = tuple(kept[c - 1][-1] for c in children)
        steps.append(StaticStep(tuple(fed), tuple(fed_mask), tuple(children), tuple(rows), ranks))
    top_k = 1 + max((p[-1] for p in kept), default=0)
    return StaticPlan(parents, depths, tuple(steps), top_k)


def bucket(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest of `buckets` that holds `size` nodes (`size` itself past the largest)."""
    return next((b for b in sorted(buckets) if b >= size), size)


def padded(tree: Tree, size: int) -> Tree:
    """`tree` with padding nodes appended up to `size`, for a verify of fixed shape (engine/decode.py).

    A padding node repeats the root's token at the root's position (depth 0) and sees the committed
    context and itself only; no real node sees it, so the real nodes' results do not change. It is never
    accepted: acceptance keeps the deepest matching node, and a depth-0 node never beats the root."""
    n = tree.size
    if size <= n:
        return tree
    extra, dev = size - n, tree.tokens.device
    ancestors = torch.zeros(size, size, dtype=torch.bool, device=dev)
    ancestors[:n, :n] = tree.ancestors
    ancestors[n:, n:] = torch.eye(extra, dtype=torch.bool, device=dev)
    pad_paths = torch.full((extra, tree.paths.shape[1]), -1, dtype=torch.long, device=dev)
    pad_paths[:, 0] = torch.arange(n, size, device=dev)
    return Tree(
        tokens=torch.cat([tree.tokens, tree.tokens[:1].expand(extra)]),
        parents=torch.cat([tree.parents, torch.full((extra,), -1, dtype=torch.long, device=dev)]),
        depths=torch.cat([tree.depths, torch.zeros(extra, dtype=torch.long, device=dev)]),
        scores=torch.cat([tree.scores, torch.full((extra,), float("-inf"), dtype=tree.scores.dtype, device=dev)]),
        ancestors=ancestors,
        paths=torch.cat([tree.paths, pad_paths]),
    )
