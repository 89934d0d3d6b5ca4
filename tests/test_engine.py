"""The decode loop on tiny random models: losslessness, acceptance, KV commit, stopping, events."""

import json
import threading

import pytest
import torch

from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import ContextTooLong, Engine
from engine.events import load_trace, save_trace
from engine.kv import commit_path, new_cache
from engine.tree import make_tree
from engine.verify import target_forward, tree_attention_mask
from tests.tiny import model_and_head, oracle_head, perturbed, tiny_engine, tiny_model, tiny_tokenizer

PROMPTS = ["hello there", "the cat sat on", "a", "Why is the sky blue?"]


def run(engine: Engine, prompt: str, **kw) -> list[dict]:
    ids = engine.chat_ids([{"role": "user", "content": prompt}])
    return list(engine.generate(ids, GenerationConfig(**kw)))


def cycles(events):
    return [e for e in events if e["type"] == "cycle" and e["cycle"] > 0]


TREES = [TreeConfig(60, 6, 10), TreeConfig(8, 3, 2), TreeConfig(1, 1, 1), TreeConfig(30, 8, 4), TreeConfig(16, 2, 8)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("head_kind", ["random", "perturbed", "oracle"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_vanilla(arch, head_kind, seed):
    model, head = model_and_head(arch, head_kind, seed)
    engine = Engine(model, tiny_tokenizer(), head)
    for prompt in PROMPTS[seed % 2 :: 2]:
        want = run(engine, prompt, method="vanilla", max_new_tokens=40)[-1]["output_ids"]
        for tree in TREES[seed::2] + [TREES[0]]:
            for method in ("eagle2", "eagle1"):
                got = run(engine, prompt, method=method, max_new_tokens=40, tree=tree)[-1]["output_ids"]
                assert got == want, (method, tree, prompt)


def test_oracle_accepts_whole_depth():
    engine = tiny_engine("llama", head="oracle")
    for depth in (1, 3, 6):
        # the whole pool is kept
        ev = run(engine, "hello there", method="eagle2", max_new_tokens=50, tree=TreeConfig(100, depth, 4))
        full = [len(c["accepted"]) - 1 for c in cycles(ev)][:-1]  # last cycle may be cut by max_new_tokens
        assert full and all(a == depth for a in full), full
        for c in cycles(ev)[:-1]:
            tree = c["tree"]
            assert c["new_token_ids"][: len(c["accepted"]) - 1] == [tree["tokens"][i] for i in c["accepted"][1:]]


def test_perturbed_head_accepts_part():
    model = tiny_model("llama", layers=1, seed=3)
    head = perturbed(oracle_head(model), 4.0, seed=3)
    engine = Engine(model, tiny_tokenizer(), head)
    ev = run(engine, "the cat sat on", method="eagle2", max_new_tokens=120, tree=TreeConfig(20, 5, 3))
    accepted = [len(c["accepted"]) - 1 for c in cycles(ev)]
    tau = ev[-1]["totals"]["tau"]
    assert 1.2 < tau < 5.5, tau
    assert min(accepted) < 5 and max(accepted) >= 2, accepted


def test_random_head_rarely_accepts():
    engine = tiny_engine("llama", head="random", layers=2)
    ev = run(engine, "hello", method="eagle2", max_new_tokens=40)
    assert ev[-1]["totals"]["tau"] < 1.5


def test_eos_and_max_new_tokens():
    model = tiny_model("llama", layers=1, seed=5)
    head = perturbed(oracle_head(model), 4.0, seed=5)
    for prompt in PROMPTS:
        free = run(Engine(model, tiny_tokenizer(), head), prompt, method="vanilla", max_new_tokens=30)[-1]
        assert free["finish_reason"] == "max_new_tokens" and len(free["output_ids"]) == 30
        # make a token the model emits mid-reply the end-of-sequence token
        eos = free["output_ids"][7]
        model.generation_config.eos_token_id = eos
        engine = Engine(model, tiny_tokenizer(), head)
        want = run(engine, prompt, method="vanilla", max_new_tokens=30)[-1]
        assert want["finish_reason"] == "eos" and want["output_ids"][-1] == eos
        assert want["output_ids"] == free["output_ids"][: free["output_ids"].index(eos) + 1]
        for method in ("eagle2", "eagle1"):
            got = run(engine, prompt, method=method, max_new_tokens=30)[-1]
            assert got["output_ids"] == want["output_ids"] and got["finish_reason"] == "eos"
        model.generation_config.eos_token_id = 0


def test_context_length_stops_cleanly():
    model = tiny_model("llama", layers=1, seed=1, max_len=48)
    engine = Engine(model, tiny_tokenizer(), oracle_head(model))
    prompt = "hello there my friend"
    want = run(engine, prompt, method="vanilla", max_new_tokens=100)[-1]
    assert want["finish_reason"] == "context_length"
    assert "context length (48" in want["message"]
    for method in ("eagle2", "eagle1"):
        got = run(engine, prompt, method=method, max_new_tokens=100)[-1]
        assert got["output_ids"] == want["output_ids"]
        assert got["finish_reason"] == "context_length"
    with pytest.raises(ContextTooLong):
        engine.generate([5] * 48, GenerationConfig()).__next__()


def test_stop_string_trims_text():
    engine = tiny_engine("llama", head="oracle")
    full = run(engine, "hello there", method="eagle2", max_new_tokens=40)[-1]["text"]
    stop = full[10:13]
    ev = run(engine, "hello there", method="eagle2", max_new_tokens=40, stop=(stop,))
    assert ev[-1]["finish_reason"] == "stop_string"
    assert ev[-1]["text"] == full[: full.index(stop)]
    assert "".join(e["text"] for e in ev if e["type"] == "cycle") == ev[-1]["text"]


def test_cancel_stops_within_one_cycle():
    engine = tiny_engine("llama", head="oracle")
    cancel = threading.Event()
    ids = engine.chat_ids([{"role": "user", "content": "hello"}])
    seen = 0
    for event in engine.generate(ids, GenerationConfig(max_new_tokens=200), cancel=cancel):
        if event["type"] == "cycle":
            seen += 1
            if seen == 2:
                cancel.set()
    assert event["type"] == "end" and event["finish_reason"] == "cancelled" and seen == 2


def test_events_are_json_and_consistent(tmp_path):
    engine = tiny_engine("qwen2", head="oracle")
    ev = run(engine, "the cat", method="eagle2", max_new_tokens=30, tree=TreeConfig(12, 4, 3))
    assert ev[0]["type"] == "start" and ev[-1]["type"] == "end"
    save_trace(ev, tmp_path / "t.jsonl")
    assert list(load_trace(tmp_path / "t.jsonl")) == json.loads(json.dumps(ev))
    out = []
    for c in [e for e in ev if e["type"] == "cycle"]:
        out += c["new_token_ids"]
        if c["cycle"] == 0:
            continue
        t = c["tree"]
        assert t["parents"][0] == -1 and c["accepted"][0] == 0
        assert all(t["depths"][i] == t["depths"][t["parents"][i]] + 1 for i in range(1, len(t["tokens"])))
        assert all(t["parents"][b] == a for a, b in zip(c["accepted"], c["accepted"][1:]))
        assert len(t["tokens"]) <= 13
    assert out == ev[-1]["output_ids"]
    assert ev[-1]["totals"]["cycles"] == len(ev) - 3
    assert "".join(e["text"] for e in ev if e["type"] == "cycle") == ev[-1]["text"]


def test_kv_commit_equals_sequential_prefill():
    model = tiny_model("llama", layers=2, seed=7)
    prompt = torch.tensor([5, 9, 11, 3, 20, 7])
    cache = new_cache(model)
    target_forward(model, prompt, torch.arange(6), None, cache)
    # a hand-made tree: root 30, children 31 and 32, grandchild 33 under 32, 34 under 33
    tokens = torch.tensor([30, 31, 32, 33, 34])
    parents = torch.tensor([-1, 0, 0, 2, 3])
    depths = torch.tensor([0, 1, 1, 2, 3])
    tree = make_tree(tokens, parents, depths, torch.zeros(5), 3)
    mask = tree_attention_mask(tree, 6, torch.float32)
    tree_feats, tree_logits = target_forward(model, tokens, 6 + depths, mask, cache)
    commit_path(cache, 6, torch.tensor([0, 2, 3]))
    ref = new_cache(model)
    seq = torch.cat([prompt, torch.tensor([30, 32, 33])])
    ref_feats, ref_logits = target_forward(model, seq, torch.arange(9), None, ref)
    assert cache.get_seq_length() == 9
    for a, b in zip(cache.layers, ref.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    # tree logits equal sequential logits on every path
    torch.testing.assert_close(tree_logits[[0, 2, 3]], ref_logits[6:9], atol=1e-4, rtol=1e-4)
    seq2 = torch.cat([prompt, torch.tensor([30, 31])])
    _, l2 = target_forward(model, seq2, torch.arange(8), None, new_cache(model))
    torch.testing.assert_close(tree_logits[1], l2[7], atol=1e-4, rtol=1e-4)


def test_bad_requests_raise_clear_errors():
    engine = tiny_engine("llama", head="none")
    with pytest.raises(ValueError, match="needs a draft head"):
        next(engine.generate([3, 4], GenerationConfig(method="eagle2")))
    with pytest.raises(ValueError, match="empty"):
        next(engine.generate([], GenerationConfig(method="vanilla")))
    with pytest.raises(ValueError, match="unknown method"):
        next(engine.generate([3], GenerationConfig(method="medusa")))
    with pytest.raises(ValueError, match="temperature"):
        next(engine.generate([3], GenerationConfig(method="vanilla", sampling=SamplingConfig(temperature=-1))))


def test_trim_messages_drops_oldest_turns():
    model = tiny_model("llama", layers=1, max_len=64)
    engine = Engine(model, tiny_tokenizer(), None)
    msgs = [{"role": "system", "content": "be nice"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "last one"})
    kept, dropped = engine.trim_messages(msgs, reserve_tokens=16)
    assert dropped > 0 and kept[0]["role"] == "system" and kept[-1]["content"] == "last one"
    assert len(engine.chat_ids(kept)) + 16 <= 64
    with pytest.raises(ContextTooLong, match="too long"):
        engine.trim_messages([{"role": "user", "content": "x" * 100}], reserve_tokens=16)


def test_host_syncs_per_cycle(monkeypatch):
    """The hot path makes one .tolist() per cycle and no .item()."""
    engine = tiny_engine("llama", head="oracle")
    ids = engine.chat_ids([{"role": "user", "content": "hello"}])
    counts = {"tolist": 0, "item": 0}
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def tolist(self):
        counts["tolist"] += 1
        return real_tolist(self)

    def item(self):
        counts["item"] += 1
        return real_item(self)

    gen = engine.generate(ids, GenerationConfig(max_new_tokens=200, tree=TreeConfig(20, 4, 4)))
    next(gen), next(gen)  # start + prefill token
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "item", item)
    next(gen), next(gen), next(gen)
    monkeypatch.undo()
    assert counts == {"tolist": 3, "item": 0}
