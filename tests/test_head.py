"""Draft-head checkpoints in the official EAGLE layout, and every mismatch error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import load_head, save_head
from engine.config import GenerationConfig, TreeConfig
from engine.decode import Engine
from engine.head import DraftHead, HeadMismatchError, head_config_for
from tests.tiny import oracle_head, random_head, tiny_model, tiny_tokenizer

EAGLE_KEYS = {
    "fc.weight",
    "fc.bias",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
}


def test_save_load_round_trip(tmp_path):
    model = tiny_model("llama", layers=2)
    head = random_head(model, seed=3)
    save_head(head, tmp_path)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == EAGLE_KEYS
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["bias"] is True and config["hidden_size"] == 64
    loaded = load_head(tmp_path, model)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    x = torch.randn(1, 5, 64)
    pos = torch.arange(5)[None]
    torch.testing.assert_close(loaded(x, x, pos, None), head(x, x, pos, None))


def test_official_variants_load(tmp_path):
    """`model.` prefixed keys, a pickle checkpoint (weights_only) and the head's own embeddings."""
    model = tiny_model("llama", layers=2)
    head = random_head(model, seed=4)
    state = {
        f"model.{k}" if k.startswith("layers") else k: v
        for k, v in head.state_dict().items()
        if not k.startswith("rotary")
    }
    emb = torch.randn(64, 64)
    state["embed_tokens.weight"] = emb
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(head.config_dict))
    loaded = load_head(tmp_path, model)
    torch.testing.assert_close(loaded.embed_tokens.weight, emb)
    torch.testing.assert_close(loaded.fc.weight, head.fc.weight)


def test_no_bias_head(tmp_path):
    model = tiny_model("llama", layers=2)
    head = DraftHead(head_config_for(model, bias=False))
    save_head(head, tmp_path)
    assert "fc.bias" not in load_file(str(tmp_path / "model.safetensors"))
    assert load_head(tmp_path, model).fc.bias is None


def write_head(tmp_path, model, **overrides):
    head = random_head(model)
    save_head(head, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | overrides
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_hidden_size_mismatch_names_both_sides(tmp_path):
    model = tiny_model("llama", layers=2)
    path = write_head(tmp_path, model, hidden_size=4096)
    wrong_size = r"head hidden size 4096 does not match target hidden size 64 \(head: .*"
    with pytest.raises(HeadMismatchError, match=wrong_size):
        load_head(path, model)


def test_vocab_mismatch(tmp_path):
    model = tiny_model("llama", layers=2)
    path = write_head(tmp_path, model, vocab_size=32000)
    with pytest.raises(HeadMismatchError, match="head vocab size 32000 does not match target vocab size 64"):
        load_head(path, model)


def test_architecture_and_layers_mismatch(tmp_path):
    model = tiny_model("llama", layers=2)
    with pytest.raises(HeadMismatchError, match="not an EAGLE Llama-style head"):
        load_head(write_head(tmp_path / "a", model, architectures=["MixtralForCausalLM"], model_type="mixtral"), model)
    with pytest.raises(HeadMismatchError, match="only 1-layer"):
        load_head(write_head(tmp_path / "b", model, num_hidden_layers=2), model)


def test_missing_files_and_bad_layout(tmp_path):
    model = tiny_model("llama", layers=2)
    with pytest.raises(FileNotFoundError, match="no draft head"):
        load_head(tmp_path / "nowhere", model)
    path = write_head(tmp_path / "c", model)
    state = load_file(str(path / "model.safetensors"))
    state.pop("fc.weight")
    state["medusa_head.0.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(HeadMismatchError, match="missing.*fc.weight.*unexpected.*medusa"):
        load_head(path, model)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_head(path, model)


def test_reduced_draft_vocab_round_trip_and_lossless(tmp_path):
    model = tiny_model("llama", layers=1, seed=2)
    head = oracle_head(model)
    head.draft_vocab = torch.arange(0, 64, 2)  # even ids only: odd tokens can never be drafted
    save_head(head, tmp_path)
    assert "d2t" in load_file(str(tmp_path / "model.safetensors"))
    loaded = load_head(tmp_path, model)
    assert loaded.draft_vocab.tolist() == list(range(0, 64, 2))
    engine = Engine(model, tiny_tokenizer(), loaded)
    ids = engine.chat_ids([{"role": "user", "content": "hello there"}])
    want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=40)))[-1]["output_ids"]
    events = list(engine.generate(ids, GenerationConfig(method="eagle2", max_new_tokens=40, tree=TreeConfig(20, 4, 4))))
    assert events[-1]["output_ids"] == want
    for e in events:
        if e["type"] == "cycle" and e["cycle"] > 0:
            assert all(t % 2 == 0 for t in e["tree"]["tokens"][1:])
