"""The choice of tree, pure: any cost and acceptance model in, the grid point with the most expected
tokens/s out. Expected tokens/s = 1000 * tau(tree) / (draft_ms(depth, top_k) + verify_ms(total_tokens + 1)).
"""

from dataclasses import dataclass
from typing import Protocol

from engine.config import TreeConfig

MAX_POOL = 512  # TreeConfig's total_tokens limit: the largest candidate pool drafted in calibration
TOTALS = (4, 8, 12, 16, 24, 32, 48, 64, 80, 96)
DEPTHS = (2, 3, 4, 5, 6, 7, 8)
TOP_KS = (4, 6, 8, 10)


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
