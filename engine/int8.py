"""The int8 CPU backend: linear layers with int8 weights and int8 activations, integer accumulation.

`Int8Linear` replaces an `nn.Linear`. Weights are quantized once, symmetrically per output channel
(scale = max |w| / 127). Activations are quantized on every call, symmetrically *per row*: each token's
input vector gets its own scale. The product (int8 x int8 -> int32) runs in engine/kernels.c's AVX-512
VNNI or AVX2 code where it is built, else in `torch._int_mm` (oneDNN; exact only with VNNI, see
`int_mm_exact`), then is rescaled to float32.

Why per-row scales: a tree verify runs n tokens through the target in one call. With one scale per call
(what `torch.ao.quantization.quantize_dynamic` does), a token's rounding would depend on the largest value
among its siblings, so the same token could get different logits in a tree than in a one-token step, and
EAGLE-2 would no longer reproduce vanilla decoding of the quantized model. With a scale per row and exact
integer sums, every row of the output depends on that row's input alone, bit for bit.

`quantize_int8(model)` swaps every `nn.Linear` of the decoder layers and the lm_head in place; embeddings,
norms and attention stay float32. The lm_head keeps a reference to its float weight (tied to the
embeddings in most small models, so no extra memory) for code that reads `lm_head.weight`.
"""

import functools

import torch
from torch import nn

from engine.kernels import row_kernels

QMAX = 127  # symmetric range [-127, 127]: no -128, so negating a row never overflows


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of x (M, K): (q (M, K) int8, scale (M, 1) float32)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12) / QMAX
    return torch.round(x / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x int8 per row; float32 in and out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight.detach().float())  # (N, K), (N, 1)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._set(q, scale.view(1, -1), bias)
        self.weight = linear.weight  # the float weight, for readers of lm_head.weight (not used here)

    def _set(self, q: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("qweight_t", q.t(), persistent=False)  # (K, N), a column-major view: the faster layout
        self.register_buffer("wscale", wscale, persistent=False)  # (1, N)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        """A layer from int8 rows q (N, K), their scales (1, N) and a float bias (N,) or None."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set(q, wscale, bias)
        layer.weight = None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        rows = row_kernels() if x.device.type == "cpu" else None
        if rows is not None:  # the same steps in two calls (engine/kernels.c), bit for bit
            q, scale = rows.quantize(x.contiguous())
            return rows.rescale(rows.int_mm(q, self), self.wscale, scale, self.bias).view(
                *shape[:-1], self.out_features
            )
        q, scale = quantize_rows(x)
        y = torch._int_mm(q, self.qweight_t).float().mul_(self.wscale).mul_(scale)  # (M, N)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> "Int8Linear":
        """The layer restricted to output channels `ids` (e.g. a draft vocabulary), built once per `ids`."""
        key = (ids.data_ptr(), ids.shape[0])
        cached = getattr(self, "_rows", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        bias = None if self.bias is None else self.bias[ids]
        sub = Int8Linear.from_quantized(self.qweight_t.t()[ids], self.wscale[:, ids], bias)
        object.__setattr__(self, "_rows", (key, sub))  # a cache, not a submodule
        return sub

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row x per-channel"


@functools.cache
def int_mm_exact() -> bool:
    """Whether torch._int_mm sums exactly on this CPU. oneDNN's int8 product does with VNNI; without it
    (AVX2, AVX-512F) it adds byte products in pairs in saturating int16, which 2 * 127 * 127 overflows.
    The C products (engine/kernels.c) are exact everywhere."""
    a, w = torch.full((1, 64), 127, dtype=torch.int8), torch.full((64, 16), 127, dtype=torch.int8)
    return bool((torch._int_mm(a, w) == 64 * 127 * 127).all())


def int8_supported() -> bool:
    """Whether this torch build runs `torch._int_mm` on the CPU."""
    try:
        a = torch.ones(2, 8, dtype=torch.int8)
        return bool(torch._int_mm(a, torch.ones(8, 8, dtype=torch.int8))[0, 0] == 8)
    except (RuntimeError, NotImplementedError):
        return False


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap the decoder's linear layers and the lm_head for `Int8Linear`, in place. The model must be a
    float32 CPU model (the activations stay float32 between the int8 products)."""
    if not int8_supported():
        raise RuntimeError(f"torch {torch.__version__} has no int8 matmul on this CPU (torch._int_mm)")
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module))
    return model


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
