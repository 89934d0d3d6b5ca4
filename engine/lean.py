"""A lean forward for Llama-family targets: the same math as transformers' modeling code, fewer ops.

On a CPU a small target's step is dominated by per-op overhead, not arithmetic: transformers runs three
projections for q, k and v, two for the MLP, appends to its KV cache by concatenation and rebuilds masks
on every call. `LeanForward` reads the weights of a loaded transformers model (Llama, Mistral without an
active sliding window, Qwen2, Qwen3) and runs
  - one fused q/k/v product and one fused gate/up product per layer,
  - a preallocated KV cache (`LeanCache`) written in place,
  - transformers' own rotary embedding module (so every RoPE scaling variant stays exact), its cos and
    sin tabulated once per position on a CPU (`RotaryTable`),
  - `scaled_dot_product_attention` with the engine's tree mask, or none for a single token; for the int8
    backend, attention whose rows do not depend on the batch: engine/kernels.c's row-by-row attention,
    or in float64 (`_exact_attention`) where the kernels are not built.
For int8 layers on a CPU the C kernels run the forward (`_forward_rows`): all layers in one call for a
small batch, the same functions layer by layer otherwise.
The fused products are exact concatenations of the separate ones for the int8 backend (weights are
quantized per output channel, engine/int8.py) and equal up to float rounding for float backends.

The forward is attached to the model (`attach_lean`) and picked up by `engine.verify.target_forward`
and `engine.kv.new_cache`; `model.generate` and everything else keep using transformers' code.
Tested against transformers' logits (tests/test_int8_lean.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.int8 import Int8Linear
from engine.kernels import row_kernels

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class LeanCache:
    """K/V for every layer in one buffer (layers, 1, kv_heads, capacity, head_dim), written in place.

    `length` entries are valid. A forward writes its n new entries after them and advances `length`;
    `crop(-n)` forgets the last n, `commit_path` keeps a tree's accepted nodes (engine/kv.py)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device, capacity: int = 512):
        self.shape = (layers, 1, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(self.shape, dtype=dtype, device=device)
        self.values = torch.zeros(self.shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, total: int) -> None:
        """Room for `total` entries: grow by doubling, keeping what is written."""
        if total <= self.capacity:
            return
        capacity = self.capacity
        while capacity < total:
            capacity *= 2
        shape = (*self.shape[:3], capacity, self.shape[4])
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, length: int) -> None:
        """transformers' convention: a negative `length` drops that many entries, else keep `length`."""
        self.length = self.length + length if length < 0 else min(length, self.length)

    def commit_path(self, past_len: int, path: torch.Tensor) -> None:
        """Keep the tree nodes `path` (root first) written after `past_len`; drop the other nodes."""
        src = past_len + path
        keep = path.shape[0]
        self.keys[:, :, :, past_len : past_len + keep] = self.keys.index_select(3, src)
        self.values[:, :, :, past_len : past_len + keep] = self.values.index_select(3, src)
        self.length = past_len + keep


class RotaryTable:
    """cos and sin of a rotary embedding module for positions 0 .. n - 1, computed once by the module and
    then indexed: on a CPU one call of the module costs about 90 us, and drafting calls it a few times per
    tree. Where the module's frequencies follow the sequence length (dynamic RoPE types), or off a CPU
    (reading the largest position would wait for the device), it is called every time."""

    def __init__(self, rotary: nn.Module):
        self.rotary = rotary
        kind = str(getattr(rotary, "rope_type", "default"))
        self.fixed = "dynamic" not in kind and "longrope" not in kind
        self.cos = self.sin = None

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, head_dim) in x's dtype for positions (n,)."""
        if not self.fixed or positions.device.type != "cpu":
            cos, sin = self.rotary(x, positions[None])
            return cos[0], sin[0]
        cos, sin = self.tables(x, int(positions.max()) + 1)
        return cos[positions], sin[positions]

    def tables(self, x: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (at least `need`, head_dim) in x's dtype, row p for position p (fixed types, CPU)."""
        if self.cos is None or need > self.cos.shape[0] or self.cos.dtype != x.dtype:
            size = max(need, 512, 2 * self.cos.shape[0] if self.cos is not None else 0)
            cos, sin = self.rotary(x[:1], torch.arange(size, device=x.device)[None])
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        return self.cos, self.sin


def _fuse(linears: list[nn.Module]) -> nn.Module:
    """One product for several linears reading the same input: outputs concatenated in order."""
    if all(isinstance(m, Int8Linear) for m in linears):  # rows scaled per output channel: concatenate them
        biases = [m.bias for m in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, linears)]
        )
        q = torch.cat([m.qweight_t.t() for m in linears])  # (N, K) row-major
        return Int8Linear.from_quantized(q, torch.cat([m.wscale for m in linears], dim=1), bias)
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=any(b is not None for b in biases))
    out = out.to(device=weight.device, dtype=weight.dtype)
    out.weight.data = weight
    if out.bias is not None:
        out.bias.data = torch.cat(
            [b.detach() if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, linears)]
        )
    return out


def unsupported_reason(model) -> str | None:
    """Why `LeanForward` cannot run this model, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return f"model type {config.model_type!r} (supported: {', '.join(SUPPORTED)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        return f"sliding-window attention ({window} of {config.max_position_embeddings} positions)"
    for module in model.modules():  # bitsandbytes layers subclass nn.Linear: look at the module first
        if type(module).__module__.startswith("bitsandbytes"):
            return "bitsandbytes layers"
    return None


class LeanLayer:
    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = attn.o_proj
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj
        self.norm_in, self.norm_post = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.scaling = attn.scaling


def _exact_attention(q, keys, values, mask, scale: float) -> torch.Tensor:
    """Attention in float64 over a float64 cache: (1, heads, n, hd) float64.

    A float32 kernel sums in an order that depends on how many queries and keys it is given, so a token
    verified in a tree would get slightly different values than the same token decoded alone, and the
    int8 rounding of the next layer's input turns such a difference into a different token now and then.
    In float64 the order's effect stays far below float32 resolution, so every query row comes out the
    same, bit for bit, whatever else is in the batch (tests/test_int8_lean.py checks the real model)."""
    _, heads, n, hd = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads  # query heads g*group .. g*group+group-1 read kv head g (transformers' order)
    scores = (q.double().reshape(1, kv_heads, group * n, hd) @ keys.transpose(-1, -2)) * scale
    scores = scores.view(1, kv_heads, group, n, length)
    if mask is not None:
        mask = mask[:, :, None]  # (1, 1, 1, n, length)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1).view(1, kv_heads, group * n, length)
    return (probs @ values).view(1, heads, n, hd)


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LeanForward:
    """`forward(tokens, positions, mask, cache, capture)` -> (final-norm hidden states (n, H), the residual
    streams entering the layers in `capture`); see module doc."""

    def __init__(self, model, exact: bool | None = None, kernels: bool = True):
        """`exact`: results that do not depend on the batch (default: for the int8 backend, whose promise
        is token-for-token equality), through the C kernels where they apply (`kernels`), else through
        torch ops with attention in float64."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not support this model: {reason}")
        base = getattr(model, model.base_model_prefix)
        config = model.config
        self.embed, self.norm, self.rotary = base.embed_tokens, base.norm, RotaryTable(base.rotary_emb)
        self.layers = [LeanLayer(layer) for layer in base.layers]
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.exact = any(isinstance(m, Int8Linear) for m in model.modules()) if exact is None else exact
        self.device = self.embed.weight.device
        # The C kernels run the int8 layers' products, norms, quantization, rotary embedding and attention.
        self.kernels = row_kernels() if kernels and self.exact and self._kernels_apply() else None
        # ... and all layers in one call where their products are the C ones too
        self._one_call = self.kernels is not None and self.kernels.fits(self._linears())
        self._table = None  # the layers as the kernels' one-call forward reads them, built on first use
        # The KV cache: float32 for the kernels' row-by-row attention, float64 for the torch path's.
        self.dtype = torch.float64 if self.exact and self.kernels is None else self.embed.weight.dtype

    def _kernels_apply(self) -> bool:
        """Whether every layer is one the C kernels cover: int8 products, no q/k norms, heads the C
        attention takes, on a CPU."""
        plain = all(layer.q_norm is None for layer in self.layers)
        if self.device.type != "cpu" or not plain or not all(isinstance(m, Int8Linear) for m in self._linears()):
            return False
        rows = row_kernels()
        return rows is not None and rows.attention_fits(self.head_dim)

    def _linears(self) -> list:
        return [getattr(layer, name) for layer in self.layers for name in ("qkv", "o", "gate_up", "down")]

    def new_cache(self, capacity: int = 512) -> LeanCache:
        return LeanCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device, capacity)

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask, cache: LeanCache, capture: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n, past = tokens.shape[0], cache.length
        cache.reserve(past + n)
        end = past + n
        x = self.embed(tokens)  # (n, H)
        cos, sin = (c[None] for c in self.rotary(x, positions))  # (1, n, hd) each
        if mask is None and n > 1:  # plain causal over the cache and the new tokens
            causal = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(diagonal=past)
            mask = causal[None, None]
        if self.kernels is not None:
            return self._forward_rows(x, cos[0].contiguous(), sin[0].contiguous(), mask, cache, capture)
        if self.exact and mask is not None and mask.is_floating_point():
            mask = mask.double()  # once per forward, not once per layer
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, n, hd)
        hd, qn, kvn = self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        streams = {}
        for i, layer in enumerate(self.layers):
            if i in capture:
                streams[i] = x
            h = _rms(layer.norm_in, x)
            qkv = layer.qkv(h)  # (n, qn + 2 kvn)
            v = qkv[:, qn + kvn :].view(n, self.kv_heads, hd)
            if layer.q_norm is None:  # rotate q and k in one go: (1, heads + kv_heads, n, hd)
                qk = _rotate(qkv[:, : qn + kvn].view(n, self.heads + self.kv_heads, hd).transpose(0, 1)[None], cos, sin)
                q, k = qk[:, : self.heads], qk[:, self.heads :]
            else:
                q = _rms(layer.q_norm, qkv[:, :qn].view(n, self.heads, hd))
                k = _rms(layer.k_norm, qkv[:, qn : qn + kvn].view(n, self.kv_heads, hd))
                q = _rotate(q.transpose(0, 1)[None], cos, sin)  # (1, heads, n, hd)
                k = _rotate(k.transpose(0, 1)[None], cos, sin)
            cache.keys[i, :, :, past:end] = k
            cache.values[i, :, :, past:end] = v.transpose(0, 1)[None]
            keys, values = cache.keys[i, :, :, :end], cache.values[i, :, :, :end]
            if self.exact:
                out = _exact_attention(q, keys, values, mask, layer.scaling).float()
            else:
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=layer.scaling, enable_gqa=self.kv_heads != self.heads
                )  # (1, heads, n, hd)
            x = x + layer.o(out[0].transpose(0, 1).reshape(n, qn))
            gate, up = layer.gate_up(_rms(layer.norm_post, x)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        cache.length = end
        if len(self.layers) in capture:
            streams[len(self.layers)] = x  # the last layer's output (an aux id of L - 1)
        return _rms(self.norm, x), [streams[i] for i in capture]

    def _forward_rows(self, x, cos, sin, mask, cache: LeanCache, capture) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward` for int8 layers through the C kernels (engine/kernels.c): per layer four integer
        products, six other kernel calls and the MLP's silu in torch; attention row by row in float32
        over a float32 cache. x (n, H) is the residual stream, updated in place; cos, sin (n, hd)."""
        rows, layers = self.kernels, self.layers
        n = x.shape[0]
        past, end = cache.length, cache.length + n
        visible = None if mask is None else _visible(mask, n, end)
        if not capture and self._one_call and rows.runs_products(n):  # the same steps in one C call
            if self._table is None:
                self._table = rows.layer_table(layers)
            out = rows.forward(self._table, x, cos, sin, self.heads, self.head_dim, cache.keys, cache.values, past,
                               visible, self.norm)  # fmt: skip
            cache.length = end
            return out, []
        streams = {}
        norm = layers[0].norm_in
        q, scale = rows.rms_quantize(x, norm.weight, norm.variance_epsilon)  # (n, H) int8, (n, 1)
        for i, layer in enumerate(layers):
            if i in capture:
                streams[i] = x.clone()
            qkv, o, gate_up, down = layer.qkv, layer.o, layer.gate_up, layer.down
            acc = rows.int_mm(q, qkv)  # (n, qn + 2 kvn) int32
            keys, values = cache.keys[i, 0], cache.values[i, 0]  # (kv_heads, capacity, hd) float32
            qf = rows.qkv_rotate_store(
                acc, qkv.wscale, scale, qkv.bias, cos, sin, self.heads, self.kv_heads, self.head_dim, keys, values, past
            )  # (heads, n, hd)
            q, scale = rows.quantize(rows.attention(qf, keys, values, end, visible, layer.scaling))  # (n, qn)
            post = layer.norm_post
            acc = rows.int_mm(q, o)  # (n, H)
            eps = post.variance_epsilon
            q, scale = rows.residual_rms_quantize(acc, o.wscale, scale, o.bias, x, post.weight, eps)
            acc = rows.int_mm(q, gate_up)  # (n, 2 I)
            q, scale = rows.silu_mul_quantize(acc, gate_up.wscale, scale, gate_up.bias)  # (n, I)
            acc = rows.int_mm(q, down)  # (n, H)
            norm = layers[i + 1].norm_in if i + 1 < len(layers) else None
            weight, eps = (norm.weight, norm.variance_epsilon) if norm is not None else (None, 0.0)
            quantized = rows.residual_rms_quantize(acc, down.wscale, scale, down.bias, x, weight, eps)
            if quantized is not None:  # the next layer's input
                q, scale = quantized
        cache.length = end
        if len(layers) in capture:
            streams[len(layers)] = x
        return rows.rms_norm(x, self.norm.weight, self.norm.variance_epsilon), [streams[i] for i in capture]


def _visible(mask: torch.Tensor, n: int, end: int) -> torch.Tensor:
    """A (1, 1, n, end) mask, boolean or additive (0 where allowed), as (n, end) bytes: 1 where allowed."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return allowed.reshape(n, end).to(torch.uint8).contiguous()


def attach_lean(model) -> bool:
    """Give `model` a lean forward when it supports one (`model.lean`); returns whether it did."""
    if unsupported_reason(model) is not None:
        model.lean = None
        return False
    model.lean = LeanForward(model)
    return True
