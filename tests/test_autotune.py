"""Auto-tuning: the tree choice under fake cost models, calibration against EAGLE-2's own selection, and
the per-machine cache. Timings are measured but never asserted."""

import json
import math
import time
from dataclasses import dataclass

import pytest
import torch

from engine.autotune import cache as autotune_cache
from engine.autotune import calibration
from engine.autotune import cli as autotune_cli
from engine.autotune.choice import MAX_POOL, choose_tree, pool_size, tree_grid
from engine.autotune.costs import MeasuredCost, _interleaved_ms
from engine.bench import cli as bench_cli
from engine.config import SamplingConfig, TreeConfig
from engine.draft import Drafter
from engine.kv import new_cache
from engine.tree import select_dynamic
from engine.verify import accept, processed_probs
from tests.test_bench import saved_tiny  # noqa: F401  (a fixture: tiny model and head folders)
from tests.tiny import perturbed, tiny_engine


@dataclass
class FakeCost:
    verify_ms_per_node: float
    fixed_ms: float = 10.0
    draft_ms_per_step: float = 0.5

    def verify_ms(self, nodes):
        return self.fixed_ms + self.verify_ms_per_node * nodes

    def draft_ms(self, depth, top_k):
        return self.draft_ms_per_step * depth * (1 + top_k / 10)


class FakeAcceptance:
    """More nodes always accept more, with diminishing returns; deeper trees help up to a point."""

    def tau(self, tree):
        return 1 + 4 * (1 - math.exp(-tree.total_tokens / 24)) * (1 - 0.6**tree.depth) * (1 - 0.5 ** (tree.top_k / 2))


def test_cheap_verification_picks_the_largest_tree_and_expensive_a_small_one():
    grid = tree_grid()
    cheap = choose_tree(FakeCost(verify_ms_per_node=0.001), FakeAcceptance(), grid).tree
    expensive = choose_tree(FakeCost(verify_ms_per_node=2.0), FakeAcceptance(), grid).tree
    assert cheap.total_tokens == max(t.total_tokens for t in grid)
    assert expensive.total_tokens <= 16
    assert expensive.total_tokens < cheap.total_tokens
    with pytest.raises(ValueError, match="empty"):
        choose_tree(FakeCost(1.0), FakeAcceptance(), [])


def test_choice_maximises_expected_tokens_per_second():
    grid = tree_grid(totals=(8, 32), depths=(3, 6), top_ks=(4, 8))
    cost, acceptance = FakeCost(0.3), FakeAcceptance()
    best = choose_tree(cost, acceptance, grid)
    def rate(t):
        return acceptance.tau(t) / (cost.draft_ms(t.depth, t.top_k) + cost.verify_ms(t.total_tokens + 1))

    assert best.tree == max(grid, key=rate)
    assert best.tokens_per_s == pytest.approx(1000 * rate(best.tree))


def test_grid_skips_budgets_beyond_the_pool_and_pools_beyond_the_calibration_limit():
    grid = tree_grid(totals=(4, 8, 16), depths=(2, 8), top_ks=(2, 10))
    assert TreeConfig(4, 2, 2) in grid and TreeConfig(8, 2, 2) not in grid  # depth 2, k 2: 6 candidates
    assert all(pool_size(t.depth, t.top_k) <= MAX_POOL for t in grid)
    assert not any(t.top_k == 10 and t.depth == 8 for t in grid)  # 640 candidates


def test_measured_cost_interpolates_verify_and_fits_a_line_to_draft():
    draft = [(2, 4, 3.0), (6, 4, 7.0), (2, 8, 5.0), (2, 6, 1.0), (3, 6, 5.0), (4, 6, 3.0)]
    cost = MeasuredCost(verify=[(1, 10.0), (9, 14.0), (17, 22.0)], draft=draft)
    assert cost.verify_ms(5) == pytest.approx(12.0)
    assert cost.verify_ms(25) == pytest.approx(30.0)  # the last segment's slope
    assert cost.draft_ms(4, 4) == pytest.approx(5.0)
    assert cost.draft_ms(3, 8) == pytest.approx(5.0)  # one depth measured: constant
    assert cost.draft_ms(3, 6) == pytest.approx(3.0)  # the noisy middle point is smoothed: 1 ms per step
    assert cost.draft_ms(5, 6) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="top_k 10"):
        cost.draft_ms(3, 10)


def reference_accepted(pool, continuation, total, depth):
    """The slow way: EAGLE-2's own selection on the depth-cut pool, then the engine's acceptance."""
    keep = pool.depths[1:] <= depth  # a prefix: the pool is ordered depth by depth
    m = int(keep.sum())
    tree = select_dynamic(pool.tokens[0], pool.tokens[1 : m + 1], pool.parents[1 : m + 1] - 1,
                          pool.depths[1 : m + 1], pool.scores[1 : m + 1], total, depth)  # fmt: skip
    drawn = torch.tensor([continuation[d] if d < len(continuation) else -1 for d in tree.depths.tolist()])
    return int(tree.depths[accept(tree, drawn)])


@pytest.mark.parametrize("seed", [0, 1])
def test_accepted_lengths_match_eagle2_selection_and_acceptance(seed):
    engine = tiny_engine("llama", head="oracle")
    engine.head = perturbed(engine.head, 0.6, seed)  # partly right: acceptance varies with the tree
    answers = calibration.reference_answers(engine, ["the cat sat on"], 40)
    prompt, out = answers[0]
    seq = prompt + out
    features = calibration.target_features(engine, seq[:-1])
    tokens = torch.tensor(seq)
    drafter = Drafter(engine.head, engine.model.get_input_embeddings(), engine.model.lm_head, len(seq) + 64)
    hidden = drafter.extend(tokens[1 : len(prompt) + 1], features[: len(prompt)])
    totals, depths = (1, 3, 6, 12, 30), (1, 2, 4)
    checked = set()
    for p in range(len(prompt), len(prompt) + 20):
        pool = drafter.dynamic_tree(tokens[p], hidden, TreeConfig(pool_size(4, 3), 4, 3))
        drafter.cache.truncate(drafter.cache.length)
        continuation = seq[p + 1 : p + 5]
        got = calibration.accepted_lengths(pool, continuation, totals, depths)
        for total in totals:
            for depth in depths:
                assert got[(total, depth)] == reference_accepted(pool, continuation, total, depth), (p, total, depth)
        checked.update(got.values())
        hidden = drafter.extend(tokens[p + 1 : p + 2], features[p : p + 1])
    assert len(checked) >= 3  # the comparison saw short and long accepted runs, not only zeros


def test_calibration_with_an_oracle_head_accepts_every_depth_of_a_full_pool():
    engine = tiny_engine("llama", head="oracle")
    grid = tree_grid(totals=(4, 6, 10, 14, 20, 36, 52), depths=(2, 3, 4), top_ks=(2, 4))
    answers = calibration.reference_answers(engine, ["hello there", "the cat"], 24)
    acceptance = calibration.calibrate_acceptance(engine, answers, grid)
    assert acceptance.samples == 2 * (24 - 4)  # roots whose next 4 tokens are known
    for tree in grid:
        tau = acceptance.tau(tree)
        assert 1.0 <= tau <= 1 + tree.depth
        if tree.total_tokens == pool_size(tree.depth, tree.top_k):
            assert tau == pytest.approx(1 + tree.depth)  # the whole pool holds the greedy chain
        same_shape = [t for t in grid if (t.depth, t.top_k) == (tree.depth, tree.top_k)]
        smaller = [t for t in same_shape if t.total_tokens < tree.total_tokens]
        assert all(acceptance.tau(t) <= tau for t in smaller)  # a bigger budget keeps a superset
    every_third = calibration.calibrate_acceptance(engine, answers, grid, stride=3)
    assert every_third.samples == 2 * 7  # roots 0, 3, ..., 18 of each answer
    assert every_third.tau(TreeConfig(52, 4, 4)) == pytest.approx(5.0)


SMALL = dict(
    prompts=["hello there", "the cat sat on"],
    new_tokens=20,
    grid=tree_grid(totals=(4, 8, 16), depths=(2, 3), top_ks=(2, 4)),
    node_counts=(1, 4, 17),
    repeats=1,
)


def test_load_or_tune_caches_per_head_and_dtype(tmp_path, monkeypatch):
    engine = tiny_engine("llama", head="oracle")
    first = autotune_cache.load_or_tune_result(engine, cache=tmp_path, **SMALL)
    files = list((tmp_path / "autotune").glob("*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["key"] == autotune_cache.tuning_key(engine)
    assert first.tree in SMALL["grid"] and first.tokens_per_s > 0 and first.vanilla_tokens_per_s > 0
    assert [c.tree for c in first.ranked][0] == first.tree
    assert first.cost.verify_ms(1) > 0 and len(first.cost.verify) == 3

    def no_tuning(*args, **kwargs):
        raise AssertionError("the cached result should have been used")

    monkeypatch.setattr(autotune_cache, "tune", no_tuning)
    cached = autotune_cache.load_or_tune_result(engine, cache=tmp_path)
    assert cached.tree == first.tree and cached.to_json() == first.to_json()
    assert autotune_cache.load_or_tune(engine, cache=tmp_path) == first.tree
    assert "auto-tuned tree" in cached.summary()

    engine.head.draft_vocab = torch.arange(engine.model.config.vocab_size - 1)  # a reduced draft vocabulary
    with pytest.raises(AssertionError, match="cached result"):
        autotune_cache.load_or_tune(engine, cache=tmp_path)
    engine.head.draft_vocab = None
    engine.head = perturbed(engine.head, 0.1)  # other head weights: another cache entry, so a new tuning
    with pytest.raises(AssertionError, match="cached result"):
        autotune_cache.load_or_tune(engine, cache=tmp_path)
    with pytest.raises(ValueError, match="needs a draft head"):
        autotune_cache.tuning_key(tiny_engine("llama", head="none"))


def test_commands_tune_once_and_the_benchmark_uses_the_tuned_tree(saved_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EAGLE_CHAT_CACHE", str(tmp_path / "cache"))
    real_tune, calls = autotune_cache.tune, []

    def small_tune(engine, progress=False, **kwargs):  # the commands' settings, on a small grid
        calls.append(kwargs)
        return real_tune(engine, progress=progress, **{**kwargs, **{k: v for k, v in SMALL.items() if k != "prompts"}})

    monkeypatch.setattr(autotune_cache, "tune", small_tune)
    model_args = ["--model", str(saved_tiny / "model"), "--head", str(saved_tiny / "head"), "--dtype", "float32",
                  "--device", "cpu", "--threads", "1", "--no-progress"]  # fmt: skip
    assert autotune_cli.main(model_args + ["--calibration-prompts", "2", "--calibration-tokens", "20"]) == 0
    printed = capsys.readouterr().out
    assert "auto-tuned tree" in printed and "verify cost" in printed and "best trees" in printed
    assert len(calls) == 1 and calls[0]["prompts"] == list(calibration.CALIBRATION_PROMPTS[:2])
    [cached] = (tmp_path / "cache" / "autotune").glob("*.json")
    tuned = json.loads(cached.read_text())["tree"]

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["hello there"]}) + "\n")
    out = tmp_path / "r.json"
    argv = ["--questions", str(questions), "--methods", "vanilla,eagle2", "--out", str(out), "--max-new-tokens", "8",
            "--autotune"] + model_args  # fmt: skip
    assert bench_cli.main(argv) == 0
    assert json.loads(out.read_text())["config"]["tree"] == tuned
    assert len(calls) == 1  # the benchmark read the cache


def test_sampled_reach_is_the_product_of_target_probabilities_along_each_path():
    """One masked forward over the pool (after a longer cache) gives, for every node, the probability that
    sampled verification accepts it; compared with plain causal forwards of each node's own sequence."""
    engine = tiny_engine("llama", head="oracle")
    engine.head = perturbed(engine.head, 0.6, 2)
    sampling = SamplingConfig(temperature=0.8, top_p=0.9)
    prompt, out = calibration.reference_answers(engine, ["the cat sat on"], 12, sampling)[0]
    seq = prompt + out
    cache = new_cache(engine.model)
    features = calibration.target_features(engine, seq[:-1], cache)  # the cache holds all of seq[:-1]
    tokens = torch.tensor(seq)
    p = len(prompt) + 3  # a root in the middle: later cache entries must be masked out
    drafter = Drafter(engine.head, engine.model.get_input_embeddings(), engine.model.lm_head, len(seq) + 64)
    hidden = drafter.extend(tokens[1 : p + 1], features[:p])
    pool = drafter.dynamic_tree(tokens[p], hidden, TreeConfig(pool_size(3, 3), 3, 3))
    reach = calibration.sampled_reach(engine, cache, p, pool, sampling)
    assert cache.get_seq_length() == len(seq) - 1  # the pool's entries were dropped again
    paths = pool.paths.tolist()
    node_tokens = pool.tokens.tolist()
    with torch.no_grad():
        for i, path in enumerate(paths):
            path = [j for j in path if j >= 0]
            context = seq[: p + 1] + [node_tokens[j] for j in path[1:]]
            probs = processed_probs(engine.model(torch.tensor([context])).logits[0].float(), sampling)  # (len, V)
            expected = 1.0
            for depth, j in enumerate(path[1:], start=1):  # node j is drawn at position p + depth - 1
                expected *= float(probs[p + depth - 1, node_tokens[j]])
            assert reach[i] == pytest.approx(expected, rel=1e-3, abs=1e-6), i
    assert reach[0] == 1.0 and 0.0 < sum(reach[1:]) < len(reach) - 1


def test_sampled_calibration_and_its_own_cache_entry(tmp_path):
    """Tuning for sampling scores the sampled grid with expected acceptance (below greedy's for the same
    tree), and caches apart from the greedy tuning."""
    engine = tiny_engine("llama", head="oracle")
    sampling = SamplingConfig(temperature=1.0)
    small = {**SMALL, "grid": tree_grid(totals=(2, 4, 8), depths=(1, 2), top_ks=(2, 4))}
    greedy = autotune_cache.load_or_tune_result(engine, cache=tmp_path, **small)
    sampled = autotune_cache.load_or_tune_result(engine, cache=tmp_path, sampling=sampling, **small)
    assert len(list((tmp_path / "autotune").glob("*.json"))) == 2
    assert sampled.key == autotune_cache.tuning_key(engine, sampling) and sampled.key["sampling"]["temperature"] == 1.0
    assert "greedy decoding" in greedy.summary() and "sampling at temperature 1," in sampled.summary()
    for tree in small["grid"]:
        assert 1.0 <= sampled.acceptance.tau(tree) < greedy.acceptance.tau(tree)  # an oracle head: greedy accepts all


def test_sampled_tau_is_the_mean_expected_accepted_length_of_the_drafted_trees():
    """calibrate_acceptance at T > 0 against a slow reference: draft the tree itself at every root and
    sum, over its nodes, the product of target probabilities along the path (plain causal forwards)."""
    engine = tiny_engine("llama", head="oracle")
    engine.head = perturbed(engine.head, 0.8, 5)
    sampling = SamplingConfig(temperature=1.0)
    tree_cfg = TreeConfig(4, 2, 2)
    answers = calibration.reference_answers(engine, ["hello there"], 10, sampling)
    got = calibration.calibrate_acceptance(engine, answers, [tree_cfg], stride=1, sampling=sampling)
    prompt, out = answers[0]
    seq = prompt + out
    features = calibration.target_features(engine, seq[:-1])
    tokens = torch.tensor(seq)
    expected = []
    with torch.no_grad():
        for p in range(len(prompt), len(seq) - tree_cfg.depth):
            drafter = Drafter(engine.head, engine.model.get_input_embeddings(), engine.model.lm_head, len(seq) + 16)
            tree = drafter.dynamic_tree(tokens[p], drafter.extend(tokens[1 : p + 1], features[:p]), tree_cfg)
            total = 0.0
            for path in tree.paths.tolist()[1:]:
                path = [j for j in path if j >= 0]
                reach = 1.0
                for depth, node in enumerate(path[1:], start=1):
                    context = seq[: p + 1] + [int(tree.tokens[j]) for j in path[1:depth]]
                    probs = processed_probs(engine.model(torch.tensor([context])).logits[0, -1:].float(), sampling)[0]
                    reach *= float(probs[int(tree.tokens[node])])
                total += reach
            expected.append(total)
    assert got.samples == len(expected) > 0
    assert got.tau(tree_cfg) == pytest.approx(1.0 + sum(expected) / len(expected), rel=1e-4)


def test_timing_rounds_interleave_the_stages_and_skip_the_warm_up():
    calls = []

    def stage(name: str, first_ms: float, ms: float):
        def fn():
            calls.append(name)
            time.sleep((first_ms if calls.count(name) == 1 else ms) / 1000)

        return fn

    def evict():
        calls.append("target")

    stages = [(stage("verify", 0, 1), None), (stage("draft", 80, 3), evict)]
    verify_ms, draft_ms = _interleaved_ms(stages, repeats=3)
    assert calls == ["verify", "target", "draft"] * 4  # a warm-up round, then 3, each stage once a round
    assert 1 <= verify_ms < 20 and 3 <= draft_ms < 40  # the slow first call is the warm-up, not counted
