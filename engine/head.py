"""The EAGLE draft heads: EAGLE-1/2 and EAGLE-3 modules and their KV buffer.

EAGLE-1 (as used by EAGLE-2), `DraftHead`: `fc` maps concat(token_embedding, target_feature) (2H) to H,
then one Llama decoder layer *without* its input layernorm; the target's lm_head scores its output. The
target feature is the target's final-norm hidden state. Qwen-style heads set `qkv_bias` (q/k/v biases,
none on o_proj).

EAGLE-3, `Eagle3Head` (arXiv 2503.01840): the target feature is the concatenation of three residual
streams of the target (the inputs of layers 2, L//2 and L-3 by default, `target_layers`), which `fc`
maps from 3H to H. One decoder layer (`midlayer`) normalises the token embedding (`input_layernorm`) and
the feature (`hidden_norm`) separately and attends over their concatenation (2H); the residual stream is
the feature. The head has its own `norm` and `lm_head` over a reduced draft vocabulary (`draft_vocab`:
target id of each draft row). At deeper draft steps it is fed its own pre-norm output (H wide, so `fc`
is skipped).

Both expose the same interface to the drafter (engine/draft.py): `forward(embeds, features, positions,
mask, cache)`, `final(hidden)` (what the lm_head reads), `lm_head` (None: the target's), `embed_tokens`
(None: the target's), `draft_vocab`, `target_layers` (None: final-norm features) and `new_cache`.
Checkpoints in the official layouts are read and written by engine/checkpoint.py.

Invariants: `DraftCache` is written in place and its committed length only ever covers committed context
(tree slots beyond it are scratch for one cycle).
"""

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)


class HeadMismatchError(ValueError):
    """The draft head does not fit the target model (sizes, vocabulary, layout or architecture)."""


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
    def __init__(self, config: LlamaConfig, in_features: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)

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
    """EAGLE-1/2: a Llama decoder layer without input layernorm (it reads the fc output directly)."""

    def __init__(self, config: LlamaConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.self_attn = DraftAttention(config, config.hidden_size, qkv_bias, o_bias)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(x, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Layer(nn.Module):
    """EAGLE-3's `midlayer`: attention over [norm(embedding), norm(feature)], residual on the feature."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = DraftAttention(config, 2 * hidden, qkv_bias=False, o_bias=False)
        self.mlp = LlamaMLP(config)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=eps)
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)

    def forward(self, embeds, x, cos, sin, mask, cache):
        fused = torch.cat([self.input_layernorm(embeds), self.hidden_norm(x)], dim=-1)  # (b, t, 2H)
        x = x + self.self_attn(fused, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def _llama_config(config: dict) -> LlamaConfig:
    if int(config.get("num_hidden_layers", 1)) != 1:
        raise HeadMismatchError(
            f"only 1-layer EAGLE heads are supported, config has num_hidden_layers={config.get('num_hidden_layers')}"
        )
    keys = ("bias", "qkv_bias", "draft_vocab_size", "target_hidden_size", "eagle_config")
    return LlamaConfig(**{k: v for k, v in config.items() if k not in keys})


def _causal(mask, cache, t: int, device):
    if mask is None and cache is None:
        return torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]
    return mask


class _Head(nn.Module):
    """What both head kinds share: config, rotary embedding, own embeddings, draft vocabulary, cache."""

    kind = ""
    attention: DraftAttention  # the layer's attention (its cache shape)

    def __init__(self, config: dict):
        super().__init__()
        self.config_dict = dict(config)
        self.llama_config = _llama_config(config)
        self.hidden_size = self.llama_config.hidden_size
        self.vocab_size = self.llama_config.vocab_size
        self.rotary = LlamaRotaryEmbedding(self.llama_config)
        self.lm_head: nn.Linear | None = None  # None: the target's lm_head scores the head's output
        self.embed_tokens: nn.Embedding | None = None  # set when the checkpoint carries its own
        self.draft_vocab: torch.Tensor | None = None  # target ids the draft may propose (None: all)
        self.target_layers: tuple[int, ...] | None = None  # target residual streams it reads (None: final norm)

    def new_cache(self, capacity: int) -> DraftCache:
        attn = self.attention
        p = self.fc.weight
        return DraftCache(capacity, attn.num_kv_heads, attn.head_dim, p.dtype, p.device)

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the lm_head reads from the head's output."""
        return hidden


class DraftHead(_Head):
    """EAGLE-1/2 (see the module docstring)."""

    kind = "eagle1"

    def __init__(self, config: dict):
        super().__init__(config)
        hidden = self.hidden_size
        attention_bias = bool(getattr(self.llama_config, "attention_bias", False))
        qkv_bias = bool(config.get("qkv_bias", attention_bias))
        self.fc = nn.Linear(2 * hidden, hidden, bias=bool(config.get("bias", True)))
        self.layers = nn.ModuleList([DraftLayer(self.llama_config, qkv_bias, attention_bias)])

    @property
    def attention(self) -> DraftAttention:
        return self.layers[0].self_attn

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
        mask = _causal(mask, cache, x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return x


class Eagle3Head(_Head):
    """EAGLE-3 (see the module docstring). Its parameters carry the official names: `fc`, `midlayer.*`,
    `norm`, `lm_head`."""

    kind = "eagle3"

    def __init__(self, config: dict):
        super().__init__(config)
        hidden = self.hidden_size
        self.feature_size = 3 * int(config.get("target_hidden_size") or hidden)
        self.fc = nn.Linear(self.feature_size, hidden, bias=bool(config.get("bias", False)))
        self.midlayer = Eagle3Layer(self.llama_config)
        self.norm = LlamaRMSNorm(hidden, eps=self.llama_config.rms_norm_eps)
        draft_vocab = int(config.get("draft_vocab_size") or self.vocab_size)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)

    @property
    def attention(self) -> DraftAttention:
        return self.midlayer.self_attn

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def forward(
        self,
        embeds: torch.Tensor,  # (b, t, H) token embeddings
        features: torch.Tensor,  # (b, t, 3H') fused target features, or (b, t, H) the head's own output
        positions: torch.Tensor,  # (b, t)
        mask: torch.Tensor | None,  # bool (b or 1, 1, t, kv_len), True = attend; None = causal
        cache: DraftCache | None = None,
    ) -> torch.Tensor:  # (b, t, H) pre-norm output: fed back at the next depth, `final` for the lm_head
        x = features.to(embeds.dtype)
        if x.shape[-1] != self.hidden_size:
            x = self.fc(x)
        cos, sin = self.rotary(x, positions)
        mask = _causal(mask, cache, x.shape[1], x.device)
        return self.midlayer(embeds, x, cos, sin, mask, cache)


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


