"""Heads as people download them: EAGLE-3 and Qwen-style EAGLE-2 checkpoints in the official layouts.

The synthetic checkpoints here are written from the official key lists and shapes (SafeAILab/EAGLE
`cnets.py` and `cnets1.py`, and the `layers.0.*` renaming serving engines use), not by our exporter.
The EAGLE-3 draft is checked against a from-scratch computation of the official formulas: fc over the
inputs of target layers 2, L//2 and L-3, the midlayer over [norm(embedding), norm(feature)], norm,
lm_head over the draft vocabulary, d2t to target ids, and the head's own pre-norm output fed back at
depth 2.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.checkpoint import load_head, official_config, save_head
from engine.config import GenerationConfig, TreeConfig
from engine.decode import Engine
from engine.draft import Drafter
from engine.head import HeadMismatchError
from engine.kv import new_cache
from engine.lean import attach_lean
from engine.verify import target_forward
from tests.tiny import tiny_model, tiny_tokenizer

H, FF, V, HEADS, KV, HD = 64, 128, 64, 4, 2, 16  # the tiny targets' sizes (tests/tiny.py)
EPS = 1e-6
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def official_config_json(**extra) -> dict:
    """A head config.json as the official code writes it (transformers 4 keys: rope_theta, rope_scaling)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": H,
        "intermediate_size": FF,
        "max_position_embeddings": 512,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "num_hidden_layers": 1,
        "rms_norm_eps": EPS,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vocab_size": V,
    } | extra


def rand(generator, *shape, scale=0.2):
    return torch.randn(*shape, generator=generator) * scale


def eagle3_checkpoint(draft_vocab: int = 48, prefix: str = "midlayer.", seed: int = 0, embed: bool = False) -> dict:
    """EAGLE-3 weights with the official names and shapes (`prefix` "layers.0." for the renamed variant)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "fc.weight": rand(g, H, 3 * H, scale=0.1),
        f"{prefix}self_attn.q_proj.weight": rand(g, HEADS * HD, 2 * H),
        f"{prefix}self_attn.k_proj.weight": rand(g, KV * HD, 2 * H),
        f"{prefix}self_attn.v_proj.weight": rand(g, KV * HD, 2 * H),
        f"{prefix}self_attn.o_proj.weight": rand(g, H, HEADS * HD),
        f"{prefix}mlp.gate_proj.weight": rand(g, FF, H),
        f"{prefix}mlp.up_proj.weight": rand(g, FF, H),
        f"{prefix}mlp.down_proj.weight": rand(g, H, FF),
        f"{prefix}hidden_norm.weight": 1 + rand(g, H, scale=0.1),
        f"{prefix}input_layernorm.weight": 1 + rand(g, H, scale=0.1),
        f"{prefix}post_attention_layernorm.weight": 1 + rand(g, H, scale=0.1),
        "norm.weight": 1 + rand(g, H, scale=0.1),
        "lm_head.weight": rand(g, draft_vocab, H, scale=2.0),
    }
    target_ids = torch.randperm(V, generator=g)[:draft_vocab].sort().values
    target_ids[0] = 0  # <eos> stays draftable
    state["d2t"] = target_ids - torch.arange(draft_vocab)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[target_ids] = True
    state["t2d"] = t2d
    if embed:
        state["embed_tokens.weight"] = rand(g, V, H, scale=1.0)
    return state


def write(folder, config: dict, state: dict, pickle: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if pickle:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    return folder


# ---- a from-scratch EAGLE-3 draft, following the official formulas ---------------------------------


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope(x, positions, theta=10000.0):  # x (t, heads, hd)
    inv = 1.0 / theta ** (torch.arange(0, HD, 2).float() / HD)
    freqs = positions[:, None].float() * inv  # (t, hd/2)
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    rotated = torch.cat([-x[..., HD // 2 :], x[..., : HD // 2]], dim=-1)
    return x * cos + rotated * sin


def reference_midlayer(state: dict, x: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """Official EAGLE-3 midlayer over t rows, causal, positions 0..t-1: x (t, H) fc-mapped or own outputs."""
    p = "midlayer."
    t = x.shape[0]
    fused = torch.cat([rms(embeds, state[p + "input_layernorm.weight"]), rms(x, state[p + "hidden_norm.weight"])], -1)
    q = (fused @ state[p + "self_attn.q_proj.weight"].T).view(t, HEADS, HD)
    k = (fused @ state[p + "self_attn.k_proj.weight"].T).view(t, KV, HD)
    v = (fused @ state[p + "self_attn.v_proj.weight"].T).view(t, KV, HD)
    positions = torch.arange(t)
    q, k = rope(q, positions), rope(k, positions)
    k, v = k.repeat_interleave(HEADS // KV, dim=1), v.repeat_interleave(HEADS // KV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, HEADS * HD)
    x = x + attn @ state[p + "self_attn.o_proj.weight"].T
    h = rms(x, state[p + "post_attention_layernorm.weight"])
    mlp = (F.silu(h @ state[p + "mlp.gate_proj.weight"].T) * (h @ state[p + "mlp.up_proj.weight"].T))
    return x + mlp @ state[p + "mlp.down_proj.weight"].T


def reference_top(state: dict, hidden: torch.Tensor, k: int) -> list[int]:
    """Target ids of the k best draft tokens: lm_head over norm(hidden), mapped by d2t."""
    logits = rms(hidden, state["norm.weight"]) @ state["lm_head.weight"].T
    top = logits.topk(k).indices
    return (top + state["d2t"][top]).tolist()


@pytest.mark.parametrize("lean", [False, True])
def test_eagle3_draft_follows_the_official_computation(tmp_path, lean):
    model = tiny_model("llama", layers=8, seed=1)
    if lean:
        assert attach_lean(model)
    state = eagle3_checkpoint(seed=1)
    head = load_head(write(tmp_path, official_config_json(draft_vocab_size=48), dict(state)), model)
    assert head.kind == "eagle3" and head.target_layers == (2, 4, 5)

    ids = torch.tensor([5, 9, 17, 3, 22, 40, 11, 8, 30, 14])
    with torch.no_grad():
        streams = model.model(input_ids=ids[None], output_hidden_states=True).hidden_states  # inputs of layers
        fused = torch.cat([streams[i][0] for i in (2, 4, 5)], dim=-1)  # (T, 3H)
        features, _ = target_forward(model, ids, torch.arange(10), None, new_cache(model), False, head.target_layers)
    torch.testing.assert_close(features, fused, rtol=1e-4, atol=1e-5)

    embed = model.get_input_embeddings()
    drafter = Drafter(head, embed, model.lm_head, 64)
    root_hidden = drafter.extend(ids[1:], features[:-1])  # pairs (feature_i, token_{i+1})
    with torch.no_grad():
        x = features[:-1] @ state["fc.weight"].T
        out = reference_midlayer(state, x, embed(ids[1:]))
    torch.testing.assert_close(root_hidden, out[-1], rtol=1e-4, atol=1e-4)

    k = 3
    tree = drafter.dynamic_tree(ids[-1], root_hidden, TreeConfig(total_tokens=k + k * k, depth=2, top_k=k))
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
    first = [i for i, d in enumerate(depths) if d == 1]
    assert sorted(tokens[i] for i in first) == sorted(reference_top(state, out[-1], k))
    for node in first:  # depth 2: the head's own pre-norm output fed back (no fc), one position on
        with torch.no_grad():
            own = reference_midlayer(
                state, torch.cat([x, out[-1:]]), embed(torch.cat([ids[1:], torch.tensor([tokens[node]])]))
            )
        children = [tokens[i] for i, p in enumerate(parents) if p == node]
        assert sorted(children) == sorted(reference_top(state, own[-1], k))


@pytest.mark.parametrize("arch", FAMILIES)
def test_eagle3_heads_decode_losslessly_on_every_family(tmp_path, arch):
    model = tiny_model(arch, layers=8, seed=2)
    variants = {  # official midlayer.* pickle; serving engines' layers.0.* with configured layers and embeddings
        "official": (official_config_json(draft_vocab_size=48), eagle3_checkpoint(seed=3), True),
        "renamed": (
            official_config_json(
                architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=48,
                eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 3, 6]},
            ),
            eagle3_checkpoint(seed=4, prefix="layers.0.", embed=True),
            False,
        ),
    }  # fmt: skip
    engine = Engine(model, tiny_tokenizer(), None)
    ids = engine.chat_ids([{"role": "user", "content": "tell me a story"}])
    want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=32)))[-1]["output_ids"]
    for name, (config, state, pickle) in variants.items():
        head = load_head(write(tmp_path / name, config, state, pickle), model)
        assert head.target_layers == ((2, 4, 5) if name == "official" else (1, 4, 7))
        assert (head.embed_tokens is not None) == (name == "renamed")
        engine = Engine(model, tiny_tokenizer(), head)
        assert "EAGLE-3 head loaded" in engine.describe()
        for method, tree in (("eagle2", TreeConfig(12, 3, 3)), ("eagle1", TreeConfig(10, 3, 4))):
            events = list(engine.generate(ids, GenerationConfig(method=method, max_new_tokens=32, tree=tree)))
            assert events[-1]["output_ids"] == want, (arch, name, method)
            drafted = [t for e in events if e["type"] == "cycle" and e["cycle"] > 0 for t in e["tree"]["tokens"][1:]]
            allowed = set((torch.arange(48) + state["d2t"]).tolist())
            assert drafted and set(drafted) <= allowed  # only the draft vocabulary is ever proposed


def test_eagle3_head_on_an_int8_target_is_lossless(tmp_path):
    from engine.int8 import int8_supported, quantize_int8

    if not int8_supported():
        pytest.skip("torch._int_mm is not available on this CPU build")
    model = quantize_int8(tiny_model("llama", layers=8, seed=5))
    assert attach_lean(model)
    head = load_head(write(tmp_path, official_config_json(draft_vocab_size=48), eagle3_checkpoint(seed=5)), model)
    engine = Engine(model, tiny_tokenizer(), head)
    ids = engine.chat_ids([{"role": "user", "content": "count to ten"}])
    want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=32)))[-1]["output_ids"]
    got = list(engine.generate(ids, GenerationConfig(method="eagle2", max_new_tokens=32, tree=TreeConfig(12, 3, 3))))
    assert got[-1]["output_ids"] == want


def qwen_eagle2_checkpoint(seed: int = 0) -> dict:
    """An EAGLE-2 head for a Qwen2 target: q/k/v biases (`qkv_bias`), none on o_proj, fc with a bias."""
    g = torch.Generator().manual_seed(seed)
    p = "layers.0."
    return {
        "fc.weight": rand(g, H, 2 * H),
        "fc.bias": rand(g, H),
        p + "self_attn.q_proj.weight": rand(g, HEADS * HD, H),
        p + "self_attn.q_proj.bias": rand(g, HEADS * HD),
        p + "self_attn.k_proj.weight": rand(g, KV * HD, H),
        p + "self_attn.k_proj.bias": rand(g, KV * HD),
        p + "self_attn.v_proj.weight": rand(g, KV * HD, H),
        p + "self_attn.v_proj.bias": rand(g, KV * HD),
        p + "self_attn.o_proj.weight": rand(g, H, HEADS * HD),
        p + "mlp.gate_proj.weight": rand(g, FF, H),
        p + "mlp.up_proj.weight": rand(g, FF, H),
        p + "mlp.down_proj.weight": rand(g, H, FF),
        p + "post_attention_layernorm.weight": 1 + rand(g, H, scale=0.1),
    }


@pytest.mark.parametrize("arch", FAMILIES)
def test_qwen_style_eagle2_head_loads_and_decodes_losslessly(tmp_path, arch):
    model = tiny_model(arch, layers=2, seed=6)
    state = qwen_eagle2_checkpoint(seed=6)
    head = load_head(write(tmp_path, official_config_json(qkv_bias=True, bias=True), dict(state), pickle=True), model)
    attn = head.layers[0].self_attn
    torch.testing.assert_close(attn.q_proj.bias, state["layers.0.self_attn.q_proj.bias"])
    torch.testing.assert_close(attn.v_proj.bias, state["layers.0.self_attn.v_proj.bias"])
    assert attn.o_proj.bias is None and head.kind == "eagle1" and head.target_layers is None
    engine = Engine(model, tiny_tokenizer(), None)
    ids = engine.chat_ids([{"role": "user", "content": "hello"}])
    want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=32)))[-1]["output_ids"]
    engine = Engine(model, tiny_tokenizer(), head)
    got = list(engine.generate(ids, GenerationConfig(method="eagle2", max_new_tokens=32, tree=TreeConfig(12, 3, 3))))
    assert got[-1]["output_ids"] == want


def test_eagle3_export_round_trip_in_the_official_layout(tmp_path):
    model = tiny_model("llama", layers=8, seed=7)
    state = eagle3_checkpoint(seed=7)
    head = load_head(write(tmp_path / "in", official_config_json(draft_vocab_size=48), dict(state)), model)
    save_head(head, tmp_path / "out")
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(state)  # exactly the official key list
    for name, tensor in state.items():
        torch.testing.assert_close(written[name], tensor, msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 48
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None


def test_exported_config_reads_the_same_to_the_official_loader(tmp_path):
    """The official EAGLE code reads `rope_theta` (default 10000) and `rope_scaling` {"type", "factor"}
    from config.json, and `bias` for fc; it knows nothing of transformers 5's `rope_parameters`."""
    from engine.head import DraftHead, head_config_for

    model = tiny_model("llama", layers=2)
    ropes = ({"rope_type": "default", "rope_theta": 1e5}, {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    for rope in ropes:
        config = head_config_for(model) | {"rope_parameters": rope}
        head = DraftHead(config)
        save_head(head, tmp_path)
        written = json.loads((tmp_path / "config.json").read_text())
        base = written.get("rope_theta", 10000.0)  # as cnets1.py's LlamaAttention._init_rope reads it
        scaling = written.get("rope_scaling")
        factor = 1.0 if scaling is None else scaling["factor"]
        assert scaling is None or scaling["type"] == rope["rope_type"]
        dim = written["hidden_size"] // written["num_attention_heads"]
        official_inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        positions = torch.arange(12).float() / factor  # linear scaling divides positions by the factor
        ours_cos, _ = head.rotary(torch.zeros(1, 12, 1), torch.arange(12)[None])
        official_cos = torch.cat([positions[:, None] * official_inv_freq] * 2, dim=-1).cos()
        torch.testing.assert_close(ours_cos[0], official_cos)
        assert written["bias"] is True and official_config(head)["rope_theta"] == rope["rope_theta"]


def test_bad_heads_are_one_clear_error(tmp_path):
    model = tiny_model("llama", layers=8)
    cfg = official_config_json(draft_vocab_size=48)
    cases = {
        "fc too wide for this target": (
            official_config_json(draft_vocab_size=48, target_hidden_size=128), eagle3_checkpoint(),
            "head hidden size 128 does not match target hidden size 64",
        ),
        "wrong fc shape": (
            cfg, eagle3_checkpoint() | {"fc.weight": torch.zeros(H, 2 * H)},
            r"head tensor fc.weight has shape \(64, 128\), expected \(64, 192\)",
        ),
        "no d2t for a reduced vocabulary": (
            cfg, {k: v for k, v in eagle3_checkpoint().items() if k != "d2t"},
            "draft vocabulary has 48 tokens but no d2t",
        ),
        "layer ids beyond the target": (
            official_config_json(draft_vocab_size=48, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 4, 30]}),
            eagle3_checkpoint(), "layer inputs \\[2, 5, 31\\] on a target of 8 layers",
        ),
        "missing midlayer tensor": (
            cfg, {k: v for k, v in eagle3_checkpoint().items() if "hidden_norm" not in k},
            r"EAGLE-3 layout .* missing \['midlayer.hidden_norm.weight'\]",
        ),
        "q/k/v biases the config does not declare": (
            official_config_json(), qwen_eagle2_checkpoint(),
            r"unexpected \['layers.0.self_attn.k_proj.bias', .*\]; q/k/v biases need \"qkv_bias\": true",
        ),
        "EAGLE-1 q_proj of another size": (
            official_config_json(qkv_bias=True),
            qwen_eagle2_checkpoint() | {"layers.0.self_attn.q_proj.weight": torch.zeros(32, H)},
            r"layers.0.self_attn.q_proj.weight has shape \(32, 64\), expected \(64, 64\)",
        ),
    }  # fmt: skip
    for name, (config, state, message) in cases.items():
        with pytest.raises(HeadMismatchError, match=message):
            load_head(write(tmp_path / name.replace(" ", "_"), config, state), model)
    shallow = tiny_model("llama", layers=6)  # default layers 2, 3, 3: not three distinct streams
    with pytest.raises(HeadMismatchError, match="3 distinct target layers"):
        load_head(write(tmp_path / "shallow", cfg, eagle3_checkpoint()), shallow)
    broken = write(tmp_path / "broken", cfg, eagle3_checkpoint())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadMismatchError, match="cannot read the head weights"):
        load_head(broken, model)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(HeadMismatchError, match="is not valid JSON"):
        load_head(broken, model)


def bigram_target(arch: str, seed: int):
    """A tiny target whose layers add nothing (o_proj and down_proj zero): its next token is a function of
    the current token alone, so a head that reads the current token's embedding can predict it."""
    model = tiny_model(arch, layers=8, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def bigram_eagle3_head(model) -> dict:
    """EAGLE-3 weights (official names) that draft a bigram target's next token: every head attends to
    its own row (q = k = a slice of norm(embedding), so RoPE cancels), v carries norm(embedding), o_proj
    scales it up, and `norm` + `lm_head` are the target's. Depth 1 is right; deeper steps mix in the
    fed-back output, so they are right only sometimes."""
    state = eagle3_checkpoint(draft_vocab=V)
    p = "midlayer."
    eye = torch.eye(H)
    pick = torch.cat([eye, torch.zeros(H, H)], dim=1)  # (H, 2H): the normalised-embedding half
    state |= {
        "fc.weight": torch.zeros(H, 3 * H),
        p + "self_attn.q_proj.weight": 3.0 * pick,
        p + "self_attn.k_proj.weight": 3.0 * pick,
        p + "self_attn.v_proj.weight": pick,
        p + "self_attn.o_proj.weight": 10.0 * eye,
        p + "mlp.down_proj.weight": torch.zeros(H, FF),
        p + "input_layernorm.weight": torch.ones(H),
        "norm.weight": model.model.norm.weight.detach().clone(),
        "lm_head.weight": model.lm_head.weight.detach().clone(),
        "d2t": torch.zeros(V, dtype=torch.long),
        "t2d": torch.ones(V, dtype=torch.bool),
    }
    return state


@pytest.mark.parametrize("arch", FAMILIES)
def test_an_accepting_eagle3_head_is_lossless_with_long_accepted_paths(tmp_path, arch):
    model = bigram_target(arch, seed=8)
    config = official_config_json(draft_vocab_size=V, num_key_value_heads=HEADS)  # MHA head: v carries all of H
    head = load_head(write(tmp_path, config, bigram_eagle3_head(model)), model)
    engine = Engine(model, tiny_tokenizer(), head)
    ids = engine.chat_ids([{"role": "user", "content": "the quick brown fox"}])
    want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=48)))[-1]["output_ids"]
    for method, tree in (("eagle2", TreeConfig(16, 4, 3)), ("eagle1", TreeConfig(10, 3, 4))):
        events = list(engine.generate(ids, GenerationConfig(method=method, max_new_tokens=48, tree=tree)))
        assert events[-1]["output_ids"] == want, (arch, method)
        assert events[-1]["totals"]["tau"] > 1.8, (arch, method)  # drafted tokens are accepted, not just the bonus


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "fp32"])
def test_launch_refuses_a_head_for_another_model_in_one_line(tmp_path, capsys, backend):
    """The real default model with an EAGLE-3 head of the tiny sizes: one error line, no traceback,
    before any timing or serving."""
    import launch

    head = write(tmp_path / "head", official_config_json(draft_vocab_size=48), eagle3_checkpoint())
    assert launch.main(["--head", str(head), "--backend", backend, "--no-browser"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    want = "error: could not load the draft head: head hidden size 64 does not match target hidden size 576 "
    assert errors[0].startswith(f"{want}(head: {head}, target: "), err
    assert "Traceback" not in err
