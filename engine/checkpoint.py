"""Draft-head folders in the official layouts: reading EAGLE-1/2 and EAGLE-3 heads, writing them.

A head folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read with
`weights_only=True`). Keys may carry a `model.` prefix. The layouts read:

- EAGLE-1/2 (the official EAGLE code's `cnets1.py`): `fc.weight` [H, 2H] (`fc.bias` when config `bias`,
  default true), `layers.0.self_attn.{q,k,v,o}_proj.weight` (q/k/v biases when config `qkv_bias`, as
  Qwen-style heads set), `layers.0.mlp.{gate,up,down}_proj.weight`,
  `layers.0.post_attention_layernorm.weight`; optionally `embed_tokens.weight`, and `d2t` for a reduced
  draft vocabulary (our extension: the official EAGLE-1/2 code ignores it and drafts from every token).
- EAGLE-3 (`cnets.py`): `fc.weight` [H, 3H'] (H' = config `target_hidden_size`, default H),
  `midlayer.{self_attn.{q,k,v,o}_proj, mlp.*, hidden_norm, input_layernorm, post_attention_layernorm}`,
  `norm.weight`, `lm_head.weight` [draft_vocab_size, H], `d2t` (target id = draft id + d2t[draft id]),
  `t2d`; optionally `embed_tokens.weight`. Serving engines' renamed variant (`layers.0.*` for
  `midlayer.*`) too. Config: `draft_vocab_size`; optional `eagle_config.eagle_aux_hidden_state_layer_ids`,
  which name layer *outputs* (id i is the input of layer i + 1); without it the head reads the inputs of
  target layers 2, L//2 and L-3.

Every way a folder can fail to fit the target is a `HeadMismatchError` naming what was expected and
what was found. `save_head` writes the same layouts, with the config fields the official code reads
(`rope_theta`, `rope_scaling`, `bias`) beside transformers 5's `rope_parameters`.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.head import DraftHead, Eagle3Head, HeadMismatchError
from engine.int8 import is_int8, quantize_int8

Head = DraftHead | Eagle3Head


def read_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict with any `model.` prefix removed) of a head folder."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no draft head at {path}: expected {cfg_file} and model.safetensors")
    try:
        config = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HeadMismatchError(f"head config {cfg_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise HeadMismatchError(f"head config {cfg_file} is not a JSON object")
    weights = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"draft head {path} has config.json but no model.safetensors or pytorch_model.bin")
    try:
        if weights[0].suffix == ".safetensors":
            state = load_file(str(weights[0]))
        else:
            state = torch.load(weights[0], map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch.load raise their own error types for a bad file
        raise HeadMismatchError(f"cannot read the head weights {weights[0]}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadMismatchError(f"head weights {weights[0]} are not a flat dict of tensors")
    return config, {k.removeprefix("model."): v for k, v in state.items()}


def head_kind(config: dict, state: dict) -> str:
    """"eagle3" or "eagle1" (EAGLE-1/2), from the keys first, then the config."""
    if any(k.startswith("midlayer.") for k in state) or "layers.0.hidden_norm.weight" in state:
        return "eagle3"
    architectures = [str(a).lower() for a in config.get("architectures") or []]
    if "draft_vocab_size" in config or any("eagle3" in a for a in architectures):
        return "eagle3"
    return "eagle1"


def target_layers(config: dict, num_layers: int, where: str) -> tuple[int, ...]:
    """The target residual streams an EAGLE-3 head reads, as layer-input indices (L: the last layer's
    output before the final norm)."""
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    layers = tuple(int(i) + 1 for i in ids) if ids else (2, num_layers // 2, num_layers - 3)
    source = f"eagle_aux_hidden_state_layer_ids {list(ids)}" if ids else "the default layers 2, L//2, L-3"
    if len(layers) != 3 or len(set(layers)) != 3 or min(layers) < 0 or max(layers) > num_layers:
        raise HeadMismatchError(
            f"an EAGLE-3 head reads 3 distinct target layers; {source} give layer inputs {list(layers)} "
            f"on a target of {num_layers} layers (head: {where})"
        )
    return layers


def check_fits(config: dict, model, where: str, kind: str = "eagle1") -> None:
    """Raise HeadMismatchError naming both sides when the head cannot drive this target."""
    c = model.config
    arch = config.get("architectures") or [config.get("model_type", "?")]
    if not any("llama" in str(a).lower() for a in arch):
        raise HeadMismatchError(
            f"head architecture {arch} is not an EAGLE Llama-style head (head: {where}); "
            f"expected architectures ['LlamaForCausalLM'] or ['LlamaForCausalLMEagle3']"
        )
    target_name = getattr(c, "_name_or_path", "") or c.model_type
    hidden_key = "target_hidden_size" if kind == "eagle3" and config.get("target_hidden_size") else "hidden_size"
    sizes = (
        ("hidden size", config.get(hidden_key), c.hidden_size),
        ("vocab size", config.get("vocab_size"), model.get_output_embeddings().weight.shape[0]),
    )
    for name, head_value, target_value in sizes:
        if head_value != target_value:
            raise HeadMismatchError(
                f"head {name} {head_value} does not match target {name} {target_value} "
                f"(head: {where}, target: {target_name})"
            )


def _expected(head: Head) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in head.state_dict().items() if not k.startswith("rotary.")}


def _load_weights(head: Head, state: dict, where: str) -> None:
    label = "EAGLE-3" if head.kind == "eagle3" else "EAGLE-1/2"
    expected = _expected(head)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if unexpected and all(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in unexpected):
            hint = '; q/k/v biases need "qkv_bias": true in config.json (Qwen-style heads)'
        raise HeadMismatchError(
            f"draft head {where} does not have the {label} layout its config describes: "
            f"missing {missing}, unexpected {unexpected}{hint}"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise HeadMismatchError(
                f"head tensor {name} has shape {tuple(state[name].shape)}, expected {shape} for the "
                f"{label} head its config describes (hidden size {head.hidden_size}; head: {where})"
            )
    head.load_state_dict(state, strict=False)  # rotary buffers are computed, not stored


def _draft_vocab(d2t: torch.Tensor, rows: int | None, vocab: int, where: str) -> torch.Tensor:
    """Target ids of the draft rows (`rows` of them; None: any number up to the vocabulary)."""
    if d2t.dim() != 1 or (rows is not None and d2t.shape[0] != rows) or d2t.shape[0] > vocab:
        want = f"({rows},)" if rows is not None else f"(n,) with n <= {vocab}"
        raise HeadMismatchError(f"head d2t has shape {tuple(d2t.shape)}, expected {want} (head: {where})")
    ids = torch.arange(d2t.shape[0]) + d2t.long()
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise HeadMismatchError(f"head d2t maps outside the target vocabulary of {vocab} (head: {where})")
    return ids


def _build(config: dict, state: dict, model, where: str) -> Head:
    kind = head_kind(config, state)
    check_fits(config, model, where, kind)
    own_embed = state.pop("embed_tokens.weight", None)
    d2t = state.pop("d2t", None)
    if kind == "eagle1":
        head = DraftHead(config)
        _load_weights(head, state, where)
        if d2t is not None:
            head.draft_vocab = _draft_vocab(d2t, None, head.vocab_size, where)
    else:
        state = {("midlayer." + k[len("layers.0.") :] if k.startswith("layers.0.") else k): v for k, v in state.items()}
        state.pop("t2d", None)  # the inverse map of d2t: implied by it
        head = Eagle3Head(config)
        if "lm_head.weight" not in state and not config.get("draft_vocab_size"):
            head.lm_head = None  # no lm_head of its own: the target's scores it (as serving engines do)
        _load_weights(head, state, where)
        head.target_layers = target_layers(config, int(model.config.num_hidden_layers), where)
        rows = head.lm_head.weight.shape[0] if head.lm_head is not None else head.vocab_size
        if d2t is not None:
            head.draft_vocab = _draft_vocab(d2t, rows, head.vocab_size, where)
        elif rows != head.vocab_size:
            raise HeadMismatchError(
                f"head draft vocabulary has {rows} tokens but no d2t maps them to the target's {head.vocab_size} "
                f"(head: {where})"
            )
    if own_embed is not None:
        if tuple(own_embed.shape) != (head.vocab_size, head.hidden_size):
            raise HeadMismatchError(
                f"head embed_tokens shape {tuple(own_embed.shape)} does not fit its config: expected "
                f"({head.vocab_size}, {head.hidden_size}) (head: {where})"
            )
        head.embed_tokens = nn.Embedding.from_pretrained(own_embed, freeze=True)
    elif head.hidden_size != (target_hidden := model.get_input_embeddings().weight.shape[1]):
        raise HeadMismatchError(
            f"head hidden size {head.hidden_size} differs from the target's {target_hidden} and the head has "
            f"no embed_tokens of its own (head: {where})"
        )
    return head


def load_head(path: str | Path, model, dtype: torch.dtype | None = None) -> Head:
    """Load a head folder in an official EAGLE layout (EAGLE-1/2 or EAGLE-3) and check it against `model`."""
    path = Path(path)
    config, state = read_folder(path)
    try:
        head = _build(config, state, model, str(path))
    except HeadMismatchError:
        raise
    except Exception as err:  # a config value of the wrong type: transformers' config validation has its own errors
        message = " ".join(str(err).split())
        where = path / "config.json"
        raise HeadMismatchError(f"head config {where} is not a valid EAGLE head config: {message}") from None
    target_param = model.get_output_embeddings().weight
    dtype = dtype or (target_param.dtype if target_param.is_floating_point() else torch.float32)
    head = head.to(device=target_param.device, dtype=dtype).eval()
    if is_int8(model):  # an int8 target's head drafts with int8 products too (engine/int8.py)
        quantize_int8(head)
    return head


def official_config(head: Head) -> dict:
    """The head's config with the fields the official EAGLE code reads: `rope_theta` and a
    `rope_scaling` in transformers 4's form (None for plain RoPE), and the architecture serving engines
    dispatch on."""
    config = dict(head.config_dict)
    rope = dict(getattr(head.llama_config, "rope_parameters", None) or {})
    config["rope_theta"] = float(rope.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", "default")
    config["rope_scaling"] = None if rope_type == "default" else {**scaling, "type": rope_type}
    if head.kind == "eagle3":
        config["architectures"] = ["LlamaForCausalLMEagle3"]
        config["draft_vocab_size"] = head.lm_head.weight.shape[0] if head.lm_head is not None else head.vocab_size
        config.setdefault("bias", False)
    return config


def save_head(head: Head, path: str | Path, include_embeddings: bool = False) -> None:
    """Write `head` in its official layout: config.json and model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items() if not k.startswith("rotary.")}
    if not include_embeddings:
        state.pop("embed_tokens.weight", None)
    rows = head.vocab_size if head.lm_head is None else head.lm_head.weight.shape[0]
    vocab = head.draft_vocab.cpu().long() if head.draft_vocab is not None else None
    if head.kind == "eagle3" and vocab is None:
        vocab = torch.arange(rows)
    if vocab is not None:
        state["d2t"] = vocab - torch.arange(vocab.shape[0])
        if head.kind == "eagle3":
            t2d = torch.zeros(head.vocab_size, dtype=torch.bool)
            t2d[vocab] = True
            state["t2d"] = t2d
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(official_config(head), indent=2) + "\n")
