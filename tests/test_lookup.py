"""The prompt-lookup branch: chain search, grafting into a tree, and losslessness with it on."""

import pytest
import torch

from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.gate import HeadGate
from engine.lookup import UNIGRAM_TOKENS, graft, lookup_chain
from engine.tree import make_tree
from tests.test_sampling import P_MIN, VOCAB, exact_tail, gof_pvalue
from tests.tiny import oracle_head, perturbed, random_head, tiny_model, tiny_tokenizer


def test_chain_follows_latest_match_longest_ngram_first():
    history = [1, 2, 3, 9, 8, 5, 2, 3, 7, 6, 4, 1, 2, 3]
    # the 3-gram (1, 2, 3) occurred at 0; the later (2, 3) at 6 is only a 2-gram match
    assert lookup_chain(history, 4) == [9, 8, 5, 2]
    assert lookup_chain(history[1:], 3) == [7, 6, 4]  # now (2, 3) is the longest match: its latest one
    assert lookup_chain([1, 2, 3, 4], 5) == []  # no earlier occurrence
    assert lookup_chain([5, 6, 5, 6], 10) == [5, 6]  # stops at the end of the history
    assert lookup_chain([5, 6], 3) == []


def test_a_one_token_match_is_the_last_resort_and_proposes_a_short_chain():
    history = [7, 1, 2, 3, 4, 5, 6, 8, 9, 7]  # only the last token, 7, occurred before
    assert lookup_chain(history, 10) == [1, 2, 3, 4, 5, 6, 8, 9, 7][:UNIGRAM_TOKENS]
    assert lookup_chain(history, 2) == [1, 2]
    assert lookup_chain(history, 10, ngrams=(3, 2)) == []
    # any longer match wins, even an older one: (9, 7) earlier beats the latest 7
    assert lookup_chain([9, 7, 5, 7, 6, 9, 7], 10) == [5, 7, 6, 9, 7]


def tree_from(tokens, parents):
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    t = lambda xs, dtype=torch.long: torch.tensor(xs, dtype=dtype)
    scores = t([0.0] + [-0.5 * d for d in depths[1:]], torch.float32)
    return make_tree(t(tokens), t(parents), t(depths), scores, max(depths))


def test_graft_shares_existing_nodes_and_appends_the_rest():
    tree = tree_from([10, 11, 12, 13, 14], [-1, 0, 0, 1, 3])  # 10 -> {11 -> 13 -> 14, 12}
    grafted, first = graft(tree, [11, 13, 20, 21])
    assert first == 5
    assert grafted.tokens.tolist() == [10, 11, 12, 13, 14, 20, 21]
    assert grafted.parents.tolist() == [-1, 0, 0, 1, 3, 3, 5]  # 20 hangs under the shared 13
    assert grafted.depths.tolist() == [0, 1, 1, 2, 3, 3, 4]
    assert grafted.paths[6].tolist() == [0, 1, 3, 5, 6]
    assert grafted.scores[5] == grafted.scores[3] and grafted.scores[6] == grafted.scores[3]
    assert bool(grafted.ancestors[6, 1]) and not bool(grafted.ancestors[6, 4])
    # no two siblings carry the same token
    pairs = list(zip(grafted.parents.tolist(), grafted.tokens.tolist()))
    assert len(set(pairs)) == len(pairs)

    same, first = graft(tree, [11, 13, 14])  # already in the tree: nothing added
    assert same.size == tree.size and first == tree.size
    new_root_branch, first = graft(tree, [30, 31])
    assert new_root_branch.parents.tolist()[5:] == [0, 5] and first == 5


def repeating_prompt() -> list[int]:
    """Token triples (8, t, 3t mod V): after `8 t` the context suggests 3t mod V next."""
    return sum(([8, t, (3 * t) % VOCAB] for t in range(1, VOCAB)), []) + [8]


@pytest.mark.parametrize("head_kind", ["random", "perturbed"])
@pytest.mark.parametrize("method", ["eagle2", "eagle1"])
def test_greedy_with_lookup_matches_vanilla(head_kind, method, monkeypatch):
    # seeds whose greedy replies loop over several tokens, so the context has something to copy
    if head_kind == "random":
        model = tiny_model("llama", layers=2, seed=3)
        head = random_head(model, 3)
    else:
        model = tiny_model("llama", layers=1, seed=4)
        head = perturbed(oracle_head(model), 4.0, 4)
    engine = Engine(model, tiny_tokenizer(), head)
    real_draft = Engine._draft

    def head_in_step(self, state, config, drafter, plan):  # copy cycles leave pairs pending, never lose them
        assert drafter is None or drafter.cache.length + state.pairs[0].shape[0] == state.past_len
        return real_draft(self, state, config, drafter, plan)

    monkeypatch.setattr(Engine, "_draft", head_in_step)
    grafted_cycles, grafted_accepts, copy_cycles = 0, 0, 0
    for prompt in ("the cat sat on the mat and the cat sat on the", "abc abc abc abc", "hello there"):
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=48)))[-1]["output_ids"]
        cfg = GenerationConfig(method=method, max_new_tokens=48, tree=TreeConfig(8, 3, 2, lookup=6))
        events = list(engine.generate(ids, cfg))
        assert events[-1]["output_ids"] == want, prompt
        for e in events:
            if e["type"] == "cycle" and e["tree"] and e["tree"]["lookup_from"] is not None:
                grafted_cycles += 1
                grafted_accepts += max(e["accepted"]) >= e["tree"]["lookup_from"]
                copy_cycles += e["tree"]["lookup_from"] == 1  # a copy cycle: the copied chain alone
    assert grafted_cycles > 0 and grafted_accepts > 0, "the lookup branch never got through: the test checks nothing"
    if head_kind == "perturbed":  # its replies copy long runs: copy cycles (the chain without the head) happen
        assert copy_cycles > 0


@pytest.mark.parametrize("mode", ["grafted-branch", "copy-cycle", "rested-head"])
def test_lookup_sampling_matches_target(mode, monkeypatch):
    """A copied branch shares nodes with the head's tree, and a copy cycle (or a cycle in which the adaptive
    head rests, engine/gate.py) verifies the copied chain alone; sampled replies must still follow the
    target either way."""
    model = tiny_model("llama", vocab_size=VOCAB, layers=1, seed=11)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.15)
    engine = Engine(model, tiny_tokenizer(VOCAB), perturbed(oracle_head(model), 1.0, seed=1))
    if mode != "grafted-branch":  # so that cycle 1 (which draws x2 and x3) verifies the copied chain alone
        real_prefill = Engine._prefill

        def prefill_then_copy(self, *args):
            state, ms = real_prefill(self, *args)
            if mode == "copy-cycle":
                state.copying = True
            else:
                state.gate = HeadGate(wait=10**6)
            return state, ms

        monkeypatch.setattr(Engine, "_prefill", prefill_then_copy)
    prompt, sampling, n = repeating_prompt(), SamplingConfig(temperature=1.0), 4000
    counts = torch.zeros(VOCAB + 1, VOCAB + 1)
    grafted_accepts, copy_cycles = 0, 0
    for seed in range(n):
        tree = TreeConfig(6, 2, 3, lookup=3)
        cfg = GenerationConfig(method="eagle2", max_new_tokens=3, sampling=sampling, tree=tree, seed=seed)
        events = list(engine.generate(prompt, cfg))
        _, x2, x3 = (events[-1]["output_ids"] + [VOCAB, VOCAB])[:3]
        counts[x2, x3] += 1
        for e in events:
            if e["type"] == "cycle" and e["tree"] and e["tree"]["lookup_from"] is not None:
                grafted_accepts += max(e["accepted"]) >= e["tree"]["lookup_from"]
                copy_cycles += e["tree"]["lookup_from"] == 1
    assert (copy_cycles > 0.5 * n) == (mode != "grafted-branch")
    assert grafted_accepts > 0.02 * n, "copied tokens must often be accepted, or the test checks nothing"
    assert gof_pvalue(counts, exact_tail(engine, prompt, sampling)) > P_MIN
