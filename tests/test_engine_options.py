"""The engine's construction options: the drafter's early stop and the lookup branch's n-grams change how
a tree is drafted, never the greedy reply."""

import pytest

from engine.config import GenerationConfig, TreeConfig
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
