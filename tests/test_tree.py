"""Tree building against slow, obvious references on hand-made log-probabilities."""

import itertools

import pytest
import torch

from engine.config import TreeConfig
from engine.draft import Drafter
from engine.tree import EAGLE1_DEFAULT_TREE, ancestor_mask, node_paths, select_dynamic, static_plan

V = 12


def path_logp(path: tuple[int, ...]) -> torch.Tensor:
    """Hand-made draft log-probs for the node reached by `path` (deterministic per path)."""
    g = torch.Generator().manual_seed(hash(path) % (2**31))
    logits = torch.randn(V, generator=g) * 2.0
    return torch.log_softmax(logits, -1)


class FakeDrafter(Drafter):
    """Drafter whose 'hidden state' is a path id and whose log-probs come from `path_logp`."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.paths: list[tuple[int, ...]] = [()]  # id -> path; id 0 is the root
        self._static = {}
        self.vocab_ids = None
        self.rows_head = None  # log-probs come from `_logprobs` below
        self.prune = True
        self.runs = 0  # draft steps run

        class Cache:
            length = 5

            def truncate(self, length):
                assert length == 5

        self.cache = Cache()

    def _run(self, tokens, features, positions, scratch_mask, top_k=0):
        self.runs += 1
        ids = []
        for tok, parent in zip(tokens.tolist(), features[:, 0].long().tolist()):
            self.paths.append(self.paths[parent] + (tok,))
            ids.append(len(self.paths) - 1)
        hidden = torch.tensor(ids, dtype=torch.float32)[:, None].expand(-1, 2).clone()
        return hidden, self._top(hidden, top_k) if top_k else None

    def _logprobs(self, hidden):
        return torch.stack([path_logp(self.paths[int(i)]) for i in hidden[:, 0]])


def reference_dynamic(cfg: TreeConfig):
    """EAGLE-2 as written in the paper, one node at a time."""
    k = cfg.top_k
    root = path_logp(())
    s, t = root.topk(k)
    pool = [((tok,), sc) for tok, sc in zip(t.tolist(), s.tolist())]  # (path, score) in creation order
    frontier = list(pool)
    for _ in range(2, cfg.depth + 1):
        cands = []
        for path, score in frontier:
            s, t = path_logp(path).topk(k)
            cands += [(path + (tok,), score + sc) for tok, sc in zip(t.tolist(), s.tolist())]
        pool += cands
        frontier = sorted(cands, key=lambda c: -c[1])[:k]
    ranked = sorted(range(len(pool)), key=lambda i: -pool[i][1])[: cfg.total_tokens]
    return {pool[i][0]: pool[i][1] for i in ranked}


def tree_paths(tree) -> dict[tuple[int, ...], float]:
    tokens, parents, scores = tree.tokens.tolist(), tree.parents.tolist(), tree.scores.tolist()
    out = {}
    for i in range(1, len(tokens)):
        path, j = [], i
        while j > 0:
            path.append(tokens[j])
            j = parents[j]
        out[tuple(reversed(path))] = scores[i]
    return out


@pytest.mark.parametrize("total,depth,k", [(10, 3, 3), (25, 4, 4), (60, 6, 10), (5, 5, 2), (100, 3, 5)])
def test_dynamic_tree_matches_reference(total, depth, k):
    cfg = TreeConfig(total_tokens=total, depth=depth, top_k=k)
    drafter = FakeDrafter()
    root_hidden = torch.zeros(2)  # path id 0
    tree = drafter.dynamic_tree(torch.tensor(7), root_hidden, cfg)
    want = reference_dynamic(cfg)
    got = tree_paths(tree)
    assert set(got) == set(want)
    for path, score in want.items():
        assert got[path] == pytest.approx(score, abs=1e-5)
    assert tree.tokens[0].item() == 7 and tree.parents[0].item() == -1
    # topological order and depth consistency
    parents, depths = tree.parents.tolist(), tree.depths.tolist()
    for i in range(1, tree.size):
        assert parents[i] < i and depths[i] == depths[parents[i]] + 1


def full_and_pruned(drafter_class, cfg: TreeConfig) -> int:
    """Grow the tree with and without the early stop; assert they are the same tree, return steps saved."""
    trees, runs = [], []
    for prune in (False, True):
        drafter = drafter_class()
        drafter.prune = prune
        trees.append(drafter.dynamic_tree(torch.tensor(7), torch.zeros(2), cfg))
        runs.append(drafter.runs)
    for name in ("tokens", "parents", "depths", "scores"):
        assert torch.equal(getattr(trees[0], name), getattr(trees[1], name)), (cfg, name)
    assert runs[0] == cfg.depth - 1 and runs[1] <= runs[0]
    return runs[0] - runs[1]


def test_pruning_stops_early_without_changing_the_tree():
    """Once no frontier node beats the budget's last score, deeper levels cannot enter the tree: the
    pruned drafter stops there and still returns the very tree of the full expansion."""
    shapes = itertools.product((2, 4, 8, 20), (3, 5, 8), (2, 3, 4))
    saved = sum(full_and_pruned(FakeDrafter, TreeConfig(total, depth, k)) for total, depth, k in shapes)
    assert saved > 0, "pruning never stopped early: the test checks nothing"


class TiedDrafter(FakeDrafter):
    """Every node's log-probs are -1, -2, -3, ...: whole numbers, so scores tie exactly across depths (a
    depth-2 node at -1 - 1 ties a depth-1 node at -2), which only the rerank's stable order settles."""

    def _logprobs(self, hidden):
        return -torch.arange(1.0, V + 1).expand(hidden.shape[0], V)


@pytest.mark.parametrize("total,depth,k", [(2, 4, 2), (3, 4, 2), (4, 5, 3), (6, 5, 3), (7, 6, 4), (12, 6, 4)])
def test_pruning_under_exact_ties_keeps_the_tree(total, depth, k):
    # the frontier ties the cut from depth 2 on: the pruned drafter stops early
    assert full_and_pruned(TiedDrafter, TreeConfig(total, depth, k)) > 0


def test_select_keeps_ancestors_under_ties():
    # all scores equal: stable order must still keep every kept node's parent
    m = 30
    parents = torch.tensor([-1] * 3 + [i // 3 for i in range(27)])
    depths = torch.tensor([1] * 3 + [2] * 27)
    tree = select_dynamic(torch.tensor(0), torch.arange(m), parents, depths, torch.zeros(m), 7, 2)
    kept = tree.parents.tolist()
    assert all(0 <= p < i for i, p in enumerate(kept) if i > 0)


def slow_ancestors(parents):
    n = len(parents)
    anc = [[False] * n for _ in range(n)]
    for i in range(n):
        j = i
        while j >= 0:
            anc[i][j] = True
            j = parents[j]
    return anc


@pytest.mark.parametrize("seed", range(5))
def test_mask_and_paths_against_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    depths = [0] * n
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    p, d = torch.tensor(parents), torch.tensor(depths)
    assert ancestor_mask(p, max(depths)).tolist() == slow_ancestors(parents)
    paths = node_paths(p, d, max(depths)).tolist()
    for i in range(n):
        chain, j = [], i
        while j >= 0:
            chain.append(j)
            j = parents[j]
        assert paths[i] == list(reversed(chain)) + [-1] * (max(depths) + 1 - len(chain))


def test_static_plan_eagle1_default():
    plan = static_plan(EAGLE1_DEFAULT_TREE)
    assert len(plan.parents) == 26 and max(plan.depths) == 5 and plan.top_k == 4
    # each choice path maps to a node whose ancestors follow the path
    cut = static_plan(EAGLE1_DEFAULT_TREE, depth=2, total_tokens=6)
    assert len(cut.parents) == 7 and max(cut.depths) == 2
    assert all(p < i for i, p in enumerate(cut.parents) if i)


def test_static_tree_fills_ranks():
    drafter = FakeDrafter()
    plan = static_plan(EAGLE1_DEFAULT_TREE)
    tree = drafter.static_tree(torch.tensor(3), torch.zeros(2), plan)
    got = tree_paths(tree)
    # reference: follow each rank path through the hand-made log-probs
    for choice in EAGLE1_DEFAULT_TREE:
        path, score = (), 0.0
        for rank in choice:
            s, t = path_logp(path).topk(plan.top_k)
            path, score = path + (t[rank].item(),), score + s[rank].item()
        assert got[path] == pytest.approx(score, abs=1e-5)
    assert len(got) == len(EAGLE1_DEFAULT_TREE)


def test_leaf_paths():
    parents = torch.tensor([-1, 0, 0, 1, 3])
    depths = torch.tensor([0, 1, 1, 2, 3])
    from engine.tree import make_tree

    tree = make_tree(torch.arange(5), parents, depths, torch.zeros(5), 3)
    assert sorted(tree.leaf_paths()) == [[0, 1, 3, 4], [0, 2]]
    assert list(itertools.chain(*tree.leaf_paths())).count(0) == 2
