"""The EAGLE draft head: module, KV buffer, and checkpoints in the official EAGLE layout.

Architecture (EAGLE-1, as used by EAGLE-2): `fc` maps concat(token_embedding, target_feature) (2H) to H,
then one Llama decoder layer *without* its input layernorm, then the target's lm_head. Token embeddings
are the target's unless the checkpoint carries its own `embed_tokens.weight`.

Checkpoint layout (a folder): `config.json` with Llama-style keys (`hidden_size`, `vocab_size`,
`num_hidden_layers: 1`, `bias`, ...) and `model.safetensors` (or `pytorch_model.bin`, loaded with
`weights_only=True`) holding `fc.weight` [`fc.bias`], `layers.0.self_attn.{q,k,v,o}_proj.weight`,
`layers.0.mlp.{gate,up,down}_proj.weight`, `layers.0.post_attention_layernorm.weight` and optionally
`embed_tokens.weight`.

Invariants: the head never owns the lm_head; `DraftCache` is written in place and its committed
length only ever covers committed context (tree slots beyond it are scratch for one cycle).
"""

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from engine.int8 import is_int8, quantize_int8


class HeadMismatchError(ValueError):
    """The draft head does not fit the target model (sizes, vocabulary or architecture)."""


class DraftCache:
    """Preallocated K/V buffer for the head's single layer, batch 1, written in place.

    `length` is the committed context; draft tree nodes are written after it and forgotten by
    `truncate(length)` at the end of every cycle.
    """

    def __init__(self, capacity: int, num_kv_heads: int, head_dim: int, dtype, device):
        shape = (1, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # committed entries
        self.used = 0  # committed + scratch entries written this cycle

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        if self.used + n > self.capacity:
            raise RuntimeError(f"draft cache full ({self.used} + {n} > {self.capacity})")
        self.keys[:, :, self.used : self.used + n] = k
        self.values[:, :, self.used : self.used + n] = v
        self.used += n
        return self.keys[:, :, : self.used], self.values[:, :, : self.used]

    def commit(self) -> None:
        self.length = self.used

    def truncate(self, length: int) -> None:
        self.length = self.used = length


class DraftAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, cache: DraftCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (b, h, t, d)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, kvh, t, d)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.write(k, v)  # (1, kvh, used, d)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )  # (b, h, t, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DraftLayer(nn.Module):
    """A Llama decoder layer without input layernorm (EAGLE feeds it the fc output directly)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(x, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DraftHead(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config_dict = dict(config)
        if int(config.get("num_hidden_layers", 1)) != 1:
            raise HeadMismatchError(
                f"only 1-layer EAGLE heads are supported, config has num_hidden_layers="
                f"{config.get('num_hidden_layers')}"
            )
        self.llama_config = LlamaConfig(**{k: v for k, v in config.items() if k != "bias"})
        hidden = self.llama_config.hidden_size
        self.hidden_size = hidden
        self.vocab_size = self.llama_config.vocab_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=bool(config.get("bias", True)))
        self.layers = nn.ModuleList([DraftLayer(self.llama_config)])
        self.rotary = LlamaRotaryEmbedding(self.llama_config)
        self.embed_tokens: nn.Embedding | None = None  # set when the checkpoint carries its own
        self.draft_vocab: torch.Tensor | None = None  # target ids the draft may propose (None: all)
        attn = self.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim

    def new_cache(self, capacity: int) -> DraftCache:
        p = self.fc.weight
        return DraftCache(capacity, self.num_kv_heads, self.head_dim, p.dtype, p.device)

    def forward(
        self,
        embeds: torch.Tensor,  # (b, t, H) token embeddings
        features: torch.Tensor,  # (b, t, H) target (or predicted) features
        positions: torch.Tensor,  # (b, t)
        mask: torch.Tensor | None,  # bool (b or 1, 1, t, kv_len), True = attend; None = causal
        cache: DraftCache | None = None,
    ) -> torch.Tensor:  # (b, t, H) predicted next features
        x = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))
        cos, sin = self.rotary(x, positions)
        if mask is None and cache is None:
            t = x.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return x


def weights_digest(head: DraftHead) -> str:
    """sha256 (hex) of the head's weights and draft vocabulary, as stored (dtype included)."""
    digest = hashlib.sha256()
    tensors = sorted(head.state_dict().items())
    if head.draft_vocab is not None:  # a reduced draft vocabulary drafts differently
        tensors.append(("draft_vocab", head.draft_vocab))
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def head_config_for(model, bias: bool = True) -> dict:
    """A fresh head config (Llama keys) matching a transformers target model."""
    c = model.config
    default_rope = {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 10000.0)}
    rope = getattr(c, "rope_parameters", None) or default_rope
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "hidden_act": getattr(c, "hidden_act", "silu"),
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": dict(rope),
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "num_hidden_layers": 1,
        "attention_bias": bool(getattr(c, "attention_bias", False)),
        "bias": bias,
    }


def check_fits(config: dict, model, where: str) -> None:
    """Raise HeadMismatchError naming both sides when the head cannot drive this target."""
    c = model.config
    arch = config.get("architectures") or [config.get("model_type", "?")]
    if not any("llama" in str(a).lower() for a in arch):
        raise HeadMismatchError(
            f"head architecture {arch} is not an EAGLE Llama-style head (head: {where}); "
            f"expected architectures ['LlamaForCausalLM']"
        )
    target_name = getattr(c, "_name_or_path", "") or c.model_type
    sizes = (
        ("hidden size", config.get("hidden_size"), c.hidden_size),
        ("vocab size", config.get("vocab_size"), model.get_output_embeddings().weight.shape[0]),
    )
    for name, head_value, target_value in sizes:
        if head_value != target_value:
            raise HeadMismatchError(
                f"head {name} {head_value} does not match target {name} {target_value} "
                f"(head: {where}, target: {target_name})"
            )


def load_head(path: str | Path, model, dtype: torch.dtype | None = None) -> DraftHead:
    """Load a head folder in the official EAGLE layout and check it against `model`."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no draft head at {path}: expected {cfg_file} and model.safetensors")
    config = json.loads(cfg_file.read_text())
    check_fits(config, model, str(path))
    if (path / "model.safetensors").is_file():
        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"draft head {path} has config.json but no model.safetensors or pytorch_model.bin")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    head = DraftHead(config)
    own_embed = state.pop("embed_tokens.weight", None)
    d2t = state.pop("d2t", None)  # EAGLE-3 convention: target id = draft id + d2t[draft id]
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("rotary.")]
    if missing or unexpected:
        raise HeadMismatchError(
            f"draft head {path} does not have the EAGLE layout: missing {missing}, unexpected {unexpected}"
        )
    if own_embed is not None:
        if tuple(own_embed.shape) != (head.vocab_size, head.hidden_size):
            raise HeadMismatchError(
                f"head embed_tokens shape {tuple(own_embed.shape)} does not fit its config (head: {path})"
            )
        head.embed_tokens = nn.Embedding.from_pretrained(own_embed, freeze=True)
    if d2t is not None:
        head.draft_vocab = torch.arange(d2t.shape[0]) + d2t.long()
        if int(head.draft_vocab.max()) >= head.vocab_size or int(head.draft_vocab.min()) < 0:
            raise HeadMismatchError(f"head d2t maps outside the target vocabulary of {head.vocab_size} (head: {path})")
    target_param = model.get_output_embeddings().weight
    dtype = dtype or (target_param.dtype if target_param.is_floating_point() else torch.float32)
    head = head.to(device=target_param.device, dtype=dtype).eval()
    if is_int8(model):  # an int8 target's head drafts with int8 products too (engine/int8.py)
        quantize_int8(head)
    return head


def save_head(head: DraftHead, path: str | Path, include_embeddings: bool = False) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items() if not k.startswith("rotary.")}
    if not include_embeddings:
        state.pop("embed_tokens.weight", None)
    if head.draft_vocab is not None:
        vocab = head.draft_vocab.cpu().long()
        state["d2t"] = vocab - torch.arange(vocab.shape[0])
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(head.config_dict, indent=2) + "\n")
