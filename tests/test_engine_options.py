"""The engine's construction options: the drafter's early stop and the lookup branch's n-grams change how
a tree is drafted, never the greedy reply."""

import pytest

from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.draft import Drafter
from tests.tiny import perturbed, tiny_engine

PROMPT = "the cat sat on the mat and the cat sat on the"


def reply(engine: Engine, method: str, tree: TreeConfig = TreeConfig(8, 3, 2)) -> list[int]:
    ids = engine.chat_ids([{"role": "user", "content": PROMPT}])
    return list(engine.generate(ids, GenerationConfig(method=method, max_new_tokens=32, tree=tree)))[-1]["output_ids"]


def test_drafter_prunes_on_a_cpu_unless_told():
    engine = tiny_engine("llama", head="oracle")
    args = (engine.head, engine.model.get_input_embeddings(), engine.model.lm_head, 64)
    assert Drafter(*args).prune and not Drafter(*args, prune=False).prune and Drafter(*args, prune=True).prune


@pytest.mark.parametrize("prune", [False, True])
def test_early_stop_keeps_the_greedy_reply(prune):
    base = tiny_engine("llama", head="oracle")
    head = perturbed(base.head, 0.5)
    want = reply(Engine(base.model, base.tokenizer, head), "vanilla")
    assert reply(Engine(base.model, base.tokenizer, head, prune=prune), "eagle2") == want


def test_lookup_ngrams_keep_the_greedy_reply():
    base = tiny_engine("llama", head="oracle")
    head = perturbed(base.head, 4.0, 4)
    want = reply(Engine(base.model, base.tokenizer, head), "vanilla")
    for ngrams in ((3, 2, 1), (3, 2), (1,)):
        engine = Engine(base.model, base.tokenizer, head, lookup_ngrams=ngrams)
        assert reply(engine, "eagle2", TreeConfig(8, 3, 2, lookup=6)) == want, ngrams


def test_a_padded_tree_verifies_like_the_tree():
    """Padding nodes see only the context and themselves, no real node sees them, and one is never accepted."""
    import torch

    from engine.tree import bucket, make_tree, padded
    from engine.verify import accept

    parents, depths = torch.tensor([-1, 0, 0, 1]), torch.tensor([0, 1, 1, 2])
    tree = make_tree(torch.tensor([5, 6, 7, 8]), parents, depths, torch.tensor([0.0, -1, -2, -3]), max_depth=2)
    assert (bucket(4, (8, 16)), bucket(9, (8, 16)), bucket(17, (8, 16))) == (8, 16, 17)
    wide = padded(tree, 8)
    assert wide.size == 8 and torch.equal(wide.tokens[4:], torch.full((4,), 5))
    assert torch.equal(wide.ancestors[:4, :4], tree.ancestors) and not wide.ancestors[:4, 4:].any()
    assert torch.equal(wide.ancestors[4:, 4:], torch.eye(4, dtype=torch.bool)) and not wide.ancestors[4:, :4].any()
    drawn = torch.tensor([6, 8, 0, 1, 5, 5, 5, 5])
    assert int(accept(wide, drawn)) == int(accept(tree, drawn[:4])) == 3
    # the root's draw is the padding nodes' token, so they "match"; still the root is kept, not a padding node
    assert int(accept(wide, torch.tensor([5, 0, 0, 0, 5, 5, 5, 5]))) == 0
    assert padded(tree, 3) is tree


@pytest.mark.parametrize("method", ["eagle2", "eagle1"])
def test_verify_buckets_keep_the_greedy_reply(method):
    base = tiny_engine("llama", head="oracle")
    head = perturbed(base.head, 0.5)
    want = reply(Engine(base.model, base.tokenizer, head), "vanilla")
    engine = Engine(base.model, base.tokenizer, head, verify_buckets=(4, 16, 32))
    assert reply(engine, method) == want
    assert reply(engine, method, TreeConfig(8, 3, 2, lookup=6)) == want


def test_verify_buckets_keep_a_seeded_sampled_reply_on_an_exact_backend():
    """On int8 (batch-independent, bit for bit) padding changes nothing at all: the same seed gives the
    same sampled reply, so the sampled distribution is the unpadded one."""
    from engine.int8 import int8_supported, quantize_int8
    from engine.lean import attach_lean

    if not int8_supported():
        pytest.skip("torch._int_mm is not available on this CPU build")
    base = tiny_engine("llama", head="oracle")
    model = quantize_int8(base.model)
    assert attach_lean(model)
    head = perturbed(base.head, 0.5)
    ids = base.chat_ids([{"role": "user", "content": PROMPT}])
    for seed in range(4):
        config = GenerationConfig(
            method="eagle2", max_new_tokens=32, tree=TreeConfig(8, 3, 2), seed=seed,
            sampling=SamplingConfig(temperature=1.0),
        )  # fmt: skip
        plain = list(Engine(model, base.tokenizer, head).generate(ids, config))[-1]["output_ids"]
        wide = list(Engine(model, base.tokenizer, head, verify_buckets=(16,)).generate(ids, config))[-1]["output_ids"]
        assert wide == plain, seed
