"""The kept KV cache (engine/decode.py `PrefixCache`): a request starts from the cache the last one left and
prefills only the tokens after their shared prefix. Replies must not change: greedy token for token on
float tiny models, and on the exact int8 backend also seeded sampled replies, bit for bit."""

import pytest
import torch

from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.int8 import int8_supported, quantize_int8
from engine.lean import attach_lean
from tests.tiny import perturbed, tiny_engine

TURNS = ["the cat sat on the mat and the cat sat on the", "and then what did the dog do", "tell me more"]


def config(method: str, **kw) -> GenerationConfig:
    return GenerationConfig(method=method, max_new_tokens=24, tree=TreeConfig(8, 3, 2, lookup=4), **kw)


def conversation(engine: Engine, methods: list[str], **kw) -> list[dict]:
    """Each turn's end event; the history carries the replies, so each prompt extends the one before."""
    messages, ends = [], []
    for text, method in zip(TURNS, methods):
        messages.append({"role": "user", "content": text})
        end = list(engine.generate(engine.chat_ids(messages), config(method, **kw)))[-1]
        messages.append({"role": "assistant", "content": end["text"]})
        ends.append(end)
    return ends


def engines(lean_int8: bool = False) -> tuple[Engine, Engine]:
    base = tiny_engine("llama", head="oracle")
    model = base.model
    if lean_int8:
        model = quantize_int8(model)
        assert attach_lean(model)
    head = perturbed(base.head, 0.5)
    return Engine(model, base.tokenizer, head), Engine(model, base.tokenizer, head, reuse_prefix=False)


MIXES = [["vanilla"] * 3, ["eagle2"] * 3, ["vanilla", "eagle2", "vanilla"], ["eagle2", "eagle1", "eagle2"]]


@pytest.mark.parametrize("methods", MIXES)
def test_a_conversation_reuses_its_turns_and_keeps_every_reply(methods):
    kept, cold = engines()
    with_cache, without = conversation(kept, methods), conversation(cold, methods)
    assert [e["output_ids"] for e in with_cache] == [e["output_ids"] for e in without]
    cached = [e["totals"]["cached_tokens"] for e in with_cache]
    assert cached[0] == 0 and all(c > 10 for c in cached[1:]), cached
    assert all(e["totals"]["cached_tokens"] == 0 for e in without)
    assert cold.prefix is None and kept.prefix is not None
    assert len(kept.prefix.ids) == kept.prefix.features.shape[0]


def test_the_same_prompt_again_prefills_its_last_token_only():
    kept, _ = engines()
    ids = kept.chat_ids([{"role": "user", "content": TURNS[0]}])
    first = list(kept.generate(ids, config("vanilla")))[-1]
    again = list(kept.generate(ids, config("eagle2")))[-1]
    assert again["totals"]["cached_tokens"] == len(ids) - 1
    assert again["output_ids"] == first["output_ids"]


def test_the_kept_cache_holds_what_was_committed():
    """Its tokens are the prompt and every committed token, and its entries equal a fresh prefill's."""
    kept, _ = engines(lean_int8=int8_supported())
    ids = kept.chat_ids([{"role": "user", "content": TURNS[0]}])
    end = list(kept.generate(ids, config("eagle2")))[-1]
    prefix = kept.prefix
    assert prefix.ids[: len(ids)] == ids
    out, written = end["output_ids"], prefix.ids[len(ids) :]
    # every reply token but the last is in the cache; a path cut at max_new_tokens may have committed more
    assert len(written) >= len(out) - 1 and written[: len(out)] == out[: len(written)]
    if int8_supported():  # bit for bit against a one-shot prefill of the same tokens
        cache = kept.model.lean.new_cache()
        tokens = torch.tensor(prefix.ids)
        hidden, _ = kept.model.lean.forward(tokens, torch.arange(len(tokens)), None, cache)
        assert torch.equal(prefix.features, hidden)
        assert torch.equal(prefix.cache.keys[:, :, :, : len(tokens)], cache.keys[:, :, :, : len(tokens)])


def test_an_unrelated_prompt_starts_cold():
    kept, cold = engines()
    conversation(kept, ["eagle2"])
    ids = kept.chat_ids([{"role": "system", "content": "x y z"}, {"role": "user", "content": "dog"}])
    end = list(kept.generate(ids, config("eagle2")))[-1]
    assert end["output_ids"] == list(cold.generate(ids, config("eagle2")))[-1]["output_ids"]


def test_a_reply_stopped_early_leaves_a_usable_cache():
    kept, cold = engines()
    ids = kept.chat_ids([{"role": "user", "content": TURNS[0]}])
    stream = kept.generate(ids, config("eagle2"))
    for _ in range(4):  # start, the prefill's token, two cycles: then the consumer walks away
        next(stream)
    stream.close()
    assert kept.prefix is not None and len(kept.prefix.ids) > len(ids)
    ends = conversation(kept, ["eagle2"] * 2), conversation(cold, ["eagle2"] * 2)
    assert [e["output_ids"] for e in ends[0]] == [e["output_ids"] for e in ends[1]]


def test_a_failed_cycle_drops_the_cache(monkeypatch):
    kept, _ = engines()
    conversation(kept, ["vanilla"])
    assert kept.prefix is not None
    calls = {"n": 0}
    import engine.decode as decode

    real = decode.target_forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "target_forward", failing)
    ids = kept.chat_ids([{"role": "user", "content": TURNS[0]}])
    with pytest.raises(RuntimeError, match="boom"):
        list(kept.generate(ids, config("vanilla")))
    assert kept.prefix is None  # half-written: the next request starts cold
    monkeypatch.setattr(decode, "target_forward", real)
    assert list(kept.generate(ids, config("vanilla")))[-1]["totals"]["cached_tokens"] == 0


def test_forget_starts_the_next_request_cold():
    kept, _ = engines()
    conversation(kept, ["vanilla"])
    kept.forget()
    ids = kept.chat_ids([{"role": "user", "content": TURNS[0]}])
    assert list(kept.generate(ids, config("vanilla")))[-1]["totals"]["cached_tokens"] == 0


def test_seeded_sampling_is_unchanged_bit_for_bit_on_int8():
    if not int8_supported():
        pytest.skip("torch._int_mm is not available on this CPU build")
    kept, cold = engines(lean_int8=True)
    for seed in range(3):
        sampling = SamplingConfig(temperature=1.0)
        a = conversation(kept, ["eagle2", "vanilla", "eagle2"], sampling=sampling, seed=seed)
        b = conversation(cold, ["eagle2", "vanilla", "eagle2"], sampling=sampling, seed=seed)
        assert [e["output_ids"] for e in a] == [e["output_ids"] for e in b], seed
        assert a[1]["totals"]["cached_tokens"] > 0
