"""C kernels for the int8 backend's lean forward (engine/kernels.c), built on this machine.

The C file is compiled once per machine and compiler with `cc -O3 -march=native -ffp-contract=off
-fopenmp` into the cache (`cache_dir()/kernels`, about a second) and loaded with ctypes: no torch headers,
no build tools beyond a C compiler. Where no compiler is found, or the build fails, `load_kernels()`
returns None with the reason in `kernel_status()`, and the lean forward runs the same steps as torch ops.
EAGLE_CHAT_KERNELS=0 turns them off.

Each wrapper takes contiguous CPU tensors and writes into the outputs it returns; see engine/kernels.c
for what each computes and the invariant that every output row depends on its own input row only.
`RowKernels.forward` runs a whole small-batch forward in one call; `int_mm` is an exact int8 product.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
OPENMP = "-fopenmp"  # for the int8 products' threads; a compiler without it builds them single-threaded
P, L, F, N = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "gemm_pack": (P, L, L, P, P),
    "gemm_int8": (P, L, L, P, P, L, P, N),
    "rms_norm_rows": (P, P, F, L, L, P),
    "rms_quantize": (P, P, F, L, L, P, P, P),
    "quantize_rows": (P, L, L, P, P),
    "rescale_rows": (P, P, P, P, L, L, P),
    "residual_rms_quantize": (P, P, P, P, P, P, F, L, L, P, P, P),
    "qkv_rotate_store": (P, P, P, P, P, P, L, L, L, L, P, P, P, L, L, P),
    "attention_rows": (P, P, P, L, L, L, L, L, L, P, F, P, N),
    "silu_mul_quantize": (P, P, P, P, L, L, P, P, P),
    "forward_rows": (P, L, P, L, L, P, P, L, L, L, P, P, L, L, P, P, F, P, N),
    "argmax_rows": (P, L, L, P),
    "top_logsoftmax": (P, L, L, L, P, P),
    "draft_scores": (P, L, L, P, P, L, P, P, N),
    "draft_rows": (P, P, P, P, P, L, L, P, P, P, L, L, L, P, P, L, L, L, P, P, P, L, P, P, P, N),
    "accept_path": (P, P, P, P, L),
    "draft_tree": (P, P, P, L, P, P, L, L, L, P, P, L, L, P, P, P, ctypes.c_int64, L, L, L, N, P, P, P, P, P, P, P, N),
}

_loaded: dict[str, object] = {}  # "lib": the CDLL or None, "status": why, "id": the built library's key


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, out_dir: Path) -> Path:
    """The shared library for this source, compiler and CPU, compiled on first use."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    from engine.hardware import cpu_description

    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, *FLAGS, OPENMP, *cpu_description()[1]]).encode())
    path = out_dir / f"int8_cpu-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    for extra in ((OPENMP,), ()):  # libgomp: the OpenMP runtime torch has loaded, so no second thread pool
        done = subprocess.run(
            [compiler, *FLAGS, *extra, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        if done.returncode == 0:
            break
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
    partial.replace(path)  # atomic: a concurrent build never loads a half-written file
    return path


def load_kernels():
    """The kernels' CDLL, built and loaded once per process; None where they cannot be (see module doc)."""
    if "lib" in _loaded:
        return _loaded["lib"]
    lib, status = None, ""
    compiler = _compiler()
    if os.environ.get("EAGLE_CHAT_KERNELS", "1") == "0":
        status = "off (EAGLE_CHAT_KERNELS=0)"
    elif sys.platform == "win32" or compiler is None:
        status = "no C compiler found (set CC); using torch ops"
    else:
        from engine.models import cache_dir

        try:
            path = _build(compiler, cache_dir() / "kernels")
            lib = ctypes.CDLL(str(path))
            for name, args in SIGNATURES.items():
                getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
            lib.gemm_isa.restype, lib.gemm_lanes.restype = ctypes.c_int, ctypes.c_long
            lib.draft_tree.restype = lib.accept_path.restype = ctypes.c_long
            lib.attention_fits.argtypes, lib.attention_fits.restype = (L,), ctypes.c_int
            products = GEMM_NAMES.get(lib.gemm_isa(), "torch._int_mm")
            status = f"C kernels ({Path(compiler).name} -march=native; int8 products: {products})"
            _loaded["id"] = f"C {path.stem.removeprefix('int8_cpu-')}"  # source, compiler and ISA flags
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            lib, status = None, f"C kernels not built ({error}); using torch ops"
    _loaded.update(lib=lib, status=status)
    return lib


def kernel_status() -> str:
    load_kernels()
    return str(_loaded["status"])


def kernels_id() -> str:
    """Which code runs the int8 rows, for cache keys: measured speeds hold for that code only."""
    return "torch ops" if load_kernels() is None else str(_loaded["id"])


# gemm_isa() -> what runs the int8 products (negative: built without OpenMP, single-threaded)
GEMM_NAMES = {2: "AVX-512 VNNI", 1: "AVX2", -2: "AVX-512 VNNI, one thread", -1: "AVX2, one thread"}
# On a CPU with VNNI, oneDNN's torch._int_mm is exact too, and with the one-call forward's saved overhead
# counted the C products stop paying at about this many rows (docs/experiments.md).
VNNI_ROWS = 32
EVERY = 1 << 62


class LinearC(ctypes.Structure):  # engine/kernels.c linear_t
    _fields_ = [("packed", P), ("corr", P), ("wscale", P), ("bias", P), ("N", L), ("K", L)]


class LayerC(ctypes.Structure):  # engine/kernels.c layer_t
    _fields_ = [("qkv", LinearC), ("o", LinearC), ("gate_up", LinearC), ("down", LinearC), ("norm_in", P),
                ("norm_post", P), ("eps_in", F), ("eps_post", F), ("scaling", F)]  # fmt: skip


class Packed:
    """An int8 weight (N, K) in the layout of engine/kernels.c's products."""

    def __init__(self, lib, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        lanes = lib.gemm_lanes()
        blocks = -(-self.out_features // lanes)
        self.data = torch.empty(blocks * lanes * self.in_features, dtype=torch.int8)
        self.corr = torch.empty(self.out_features, dtype=torch.int32)
        w = weight.contiguous()
        lib.gemm_pack(w.data_ptr(), self.out_features, self.in_features, self.data.data_ptr(), self.corr.data_ptr())


class RowKernels:
    """Typed wrappers over the CDLL; each allocates its outputs and returns them."""

    def __init__(self, lib):
        self.lib = lib
        isa = lib.gemm_isa()
        self.isa, self.gemm_threads = abs(isa), isa > 0  # gemm_threads: built with OpenMP
        # Rows up to which the C products run; beyond, torch._int_mm. oneDNN's int8 product is exact only
        # with VNNI: without it (AVX2, AVX-512F) it sums pairs in saturating int16 and can be far off, so
        # there the C products (exact: engine/kernels.c) run every product.
        self.gemm_rows = {2: VNNI_ROWS, 1: EVERY}.get(self.isa, 0)

    def attention_fits(self, head_dim: int) -> bool:
        """Whether the C attention takes heads of this size."""
        return bool(self.lib.attention_fits(head_dim))

    def fits(self, linears) -> bool:
        """Whether the C products take these int8 layers (input sizes a multiple of 4)."""
        return self.isa > 0 and all(linear.in_features % 4 == 0 for linear in linears)

    def packed(self, layer) -> Packed:
        """The layer's weight in the C products' layout, built once per layer (not a module buffer)."""
        packed = layer.__dict__.get("_packed")
        if packed is None:
            packed = layer.__dict__["_packed"] = Packed(self.lib, layer.qweight_t.t())
        return packed

    def runs_products(self, m: int) -> bool:
        """Whether the C products run m rows (else torch._int_mm does): up to `gemm_rows`, and with VNNI
        only where they have the threads oneDNN has (AVX2 runs them regardless: exactness first)."""
        return m <= self.gemm_rows and (self.gemm_threads or self.isa == 1 or torch.get_num_threads() == 1)

    def int_mm(self, q: torch.Tensor, layer) -> torch.Tensor:
        """torch._int_mm(q, layer.qweight_t) (int32 (M, N)), bit for bit: the integer sums are exact."""
        m, k = q.shape
        if k % 4 or not self.runs_products(m):
            return torch._int_mm(q, layer.qweight_t)
        threads = torch.get_num_threads()
        packed = self.packed(layer)
        out = torch.empty(m, packed.out_features, dtype=torch.int32)
        q = q.contiguous()
        self.lib.gemm_int8(q.data_ptr(), m, k, packed.data.data_ptr(), packed.corr.data_ptr(), packed.out_features,
                           out.data_ptr(), threads)  # fmt: skip
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n, k = x.shape
        out = torch.empty_like(x)
        self.lib.rms_norm_rows(x.data_ptr(), weight.data_ptr(), eps, n, k, out.data_ptr())
        return out

    def rms_quantize(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = x.shape
        q, scale, scratch = _quantized(n, k), torch.empty(n, 1), torch.empty(k)
        self.lib.rms_quantize(x.data_ptr(), weight.data_ptr(), eps, n, k, scratch.data_ptr(), q.data_ptr(),
                              scale.data_ptr())  # fmt: skip
        return q, scale

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = x.shape
        q, scale = _quantized(n, k), torch.empty(n, 1)
        self.lib.quantize_rows(x.data_ptr(), n, k, q.data_ptr(), scale.data_ptr())
        return q, scale

    def rescale(self, acc: torch.Tensor, wscale: torch.Tensor, xscale: torch.Tensor, bias) -> torch.Tensor:
        n, width = acc.shape
        out = torch.empty(n, width)
        self.lib.rescale_rows(acc.data_ptr(), wscale.data_ptr(), xscale.data_ptr(), _ptr(bias), n, width,
                              out.data_ptr())  # fmt: skip
        return out

    def residual_rms_quantize(self, acc, wscale, xscale, bias, x, weight, eps):
        """x += rescaled acc, in place; then (q, scale) of rms_norm(x) * weight, or None without a weight."""
        n, k = x.shape
        q, scale, scratch = (_quantized(n, k), torch.empty(n, 1), torch.empty(k)) if weight is not None else (None,) * 3
        self.lib.residual_rms_quantize(
            acc.data_ptr(), wscale.data_ptr(), xscale.data_ptr(), _ptr(bias), x.data_ptr(), _ptr(weight), eps, n, k,
            _ptr(scratch), _ptr(q), _ptr(scale),
        )  # fmt: skip
        return None if weight is None else (q, scale)

    def qkv_rotate_store(self, acc, wscale, xscale, bias, cos, sin, heads, kv_heads, head_dim, keys, values, past):
        """q (heads, n, hd), rotated; k rotated and v written into `keys`/`values` (kv_heads, capacity, hd)
        at past .. past + n."""
        n = acc.shape[0]
        q = torch.empty(heads, n, head_dim)
        scratch = torch.empty(head_dim)
        self.lib.qkv_rotate_store(
            acc.data_ptr(), wscale.data_ptr(), xscale.data_ptr(), _ptr(bias), cos.data_ptr(), sin.data_ptr(), n,
            heads, kv_heads, head_dim, q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[-2], past,
            scratch.data_ptr(),
        )  # fmt: skip
        return q

    def silu_mul_quantize(self, acc, wscale, xscale, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused gate/up product's rows acc (n, 2 I), rescaled: silu(gate) * up as int8 rows (n, I)."""
        n, width = acc.shape
        q, scale, scratch = _quantized(n, width // 2), torch.empty(n, 1), torch.empty(width // 2 + 16)
        self.lib.silu_mul_quantize(acc.data_ptr(), wscale.data_ptr(), xscale.data_ptr(), _ptr(bias), n, width // 2,
                                   scratch.data_ptr(), q.data_ptr(), scale.data_ptr())  # fmt: skip
        return q, scale

    def linear(self, layer) -> LinearC:
        """The C description of an int8 layer (engine/kernels.c linear_t); it points into the layer's
        tensors, so keep it no longer than the layer."""
        packed = self.packed(layer)
        return LinearC(packed.data.data_ptr(), packed.corr.data_ptr(), layer.wscale.data_ptr(), _ptr(layer.bias),
                       packed.out_features, packed.in_features)  # fmt: skip

    def layer_table(self, layers) -> ctypes.Array:
        """The C description of lean layers (engine/lean.py LeanLayer) for `forward`; it points into the
        layers' tensors, so keep it no longer than them."""
        table = (LayerC * len(layers))()
        for entry, layer in zip(table, layers):
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(entry, name, self.linear(getattr(layer, name)))
            if layer.norm_in is not None:  # None: the input is read without a norm (a draft head's layer)
                entry.norm_in, entry.eps_in = layer.norm_in.weight.data_ptr(), layer.norm_in.variance_epsilon
            entry.norm_post, entry.eps_post = layer.norm_post.weight.data_ptr(), layer.norm_post.variance_epsilon
            entry.scaling = layer.scaling
        return table

    def forward(self, table, x, cos, sin, heads, head_dim, keys, values, past, visible, norm) -> torch.Tensor:
        """All layers in one call (engine/kernels.c forward_rows): x (n, H) updated in place; keys/values
        (layers, 1, kv_heads, capacity, hd) written at past .. past + n; returns the final norm's rows
        (`norm` None: x itself)."""
        n, hidden = x.shape
        out = torch.empty_like(x)
        self.lib.forward_rows(
            table, len(table), x.data_ptr(), n, hidden, cos.data_ptr(), sin.data_ptr(), heads, keys.shape[2],
            head_dim, keys.data_ptr(), values.data_ptr(), keys.shape[3], past, _ptr(visible),
            None if norm is None else norm.weight.data_ptr(), 0.0 if norm is None else norm.variance_epsilon,
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def draft_rows(self, table, fc, embed, tokens, features, cos, sin, positions, heads, head_dim, cache, slots,
                   lm, vocab, k: int):  # fmt: skip
        """One step of an EAGLE-1/2 head in one call (engine/kernels.c draft_rows): the head's layer
        `table` over n pairs (tokens (n,), features (n, H)) at `positions` (n,) after the draft cache's
        `used` entries, which it advances by n; slots (n, used - length + n) uint8 or None (causal). With
        lm (LinearC), also every row's top-k draft log-probs and their ids (mapped through vocab, an int64
        tensor or None). Returns (hidden (n, H), scores (n, k), ids (n, k)) (None, None without lm)."""
        n, hidden_size = features.shape
        if cache.used + n > cache.capacity:
            raise RuntimeError(f"draft cache full ({cache.used} + {n} > {cache.capacity})")
        hidden = torch.empty(n, hidden_size)
        m = n if lm is not None else 0
        scores, ids = torch.empty(m, k), torch.empty(m, k, dtype=torch.int64)
        self.lib.draft_rows(
            table, ctypes.addressof(fc), embed.data_ptr(), tokens.data_ptr(), features.data_ptr(), n, hidden_size,
            cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), heads, cache.keys.shape[1], head_dim,
            cache.keys.data_ptr(), cache.values.data_ptr(), cache.capacity, cache.length, cache.used, _ptr(slots),
            None if lm is None else ctypes.addressof(lm), _ptr(vocab), k, hidden.data_ptr(),
            scores.data_ptr(), ids.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        cache.used += n
        return (hidden, scores, ids) if lm is not None else (hidden, None, None)

    def draft_scores(self, hidden: torch.Tensor, lm, vocab, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k draft log-probs of hidden rows (m, H) over lm's rows (LinearC), and their ids mapped
        through vocab (None: the row index): (m, k) each (engine/kernels.c draft_scores)."""
        m, hidden_size = hidden.shape
        scores, ids = torch.empty(m, k), torch.empty(m, k, dtype=torch.int64)
        hidden = hidden.contiguous()
        self.lib.draft_scores(hidden.data_ptr(), m, hidden_size, ctypes.addressof(lm), _ptr(vocab), k,
                              scores.data_ptr(), ids.data_ptr(), torch.get_num_threads())  # fmt: skip
        return scores, ids

    def draft_tree(self, table, fc, embed, cos, sin, heads, head_dim, cache, lm, vocab, root_hidden, root_token: int,
                   total: int, depth: int, k: int, prune: bool):  # fmt: skip
        """An EAGLE-2 tree grown and reranked in one call (engine/kernels.c draft_tree) after the draft
        cache's committed entries; its scratch entries advance `cache.used`. Returns (tokens, parents,
        depths, scores, ancestors, paths) of its n nodes, as engine/tree.py's `Tree` holds them."""
        hidden_size = root_hidden.shape[-1]
        if cache.used != cache.length or cache.length + (depth - 1) * k > cache.capacity:
            raise RuntimeError(f"draft cache full ({cache.length} + {(depth - 1) * k} > {cache.capacity})")
        size = min(total, k + (depth - 1) * k * k) + 1
        tokens, parents, depths = (torch.empty(size, dtype=torch.int64) for _ in range(3))
        scores, ancestors = torch.empty(size), torch.empty(size * size, dtype=torch.uint8)
        paths, written = torch.empty(size * (depth + 1), dtype=torch.int64), ctypes.c_long(0)
        root_hidden = root_hidden.float().contiguous()
        n = self.lib.draft_tree(
            table, ctypes.addressof(fc), embed.data_ptr(), hidden_size, cos.data_ptr(), sin.data_ptr(), heads,
            cache.keys.shape[1], head_dim, cache.keys.data_ptr(), cache.values.data_ptr(), cache.capacity,
            cache.length, ctypes.addressof(lm), _ptr(vocab), root_hidden.data_ptr(), root_token,
            total, depth, k, int(prune), tokens.data_ptr(), parents.data_ptr(), depths.data_ptr(), scores.data_ptr(),
            ancestors.data_ptr(), paths.data_ptr(), ctypes.byref(written), torch.get_num_threads(),
        )  # fmt: skip
        cache.used += written.value
        return (
            tokens[:n], parents[:n], depths[:n], scores[:n], ancestors[: n * n].view(n, n).view(torch.bool),
            paths[: n * (depth + 1)].view(n, depth + 1),
        )  # fmt: skip

    def accept(self, tokens, parents, depths, drawn) -> int:
        """engine/verify.py `accept` over int64 tensors (n,) on the CPU (engine/kernels.c accept_path)."""
        held = [t.contiguous() for t in (tokens, parents, depths, drawn)]  # alive through the call
        return self.lib.accept_path(*(t.data_ptr() for t in held), tokens.shape[0])

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x.argmax(-1) of float32 rows (n, V): the first index of each row's largest value. (n,)"""
        n, v = x.shape
        out = torch.empty(n, dtype=torch.int64)
        self.lib.argmax_rows(x.contiguous().data_ptr(), n, v, out.data_ptr())
        return out

    def top_logsoftmax(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log_softmax(x).topk(k) of float32 rows (n, V) with V >= k: (values, indices), each (n, k)."""
        n, v = x.shape
        values, idx = torch.empty(n, k), torch.empty(n, k, dtype=torch.int64)
        self.lib.top_logsoftmax(x.contiguous().data_ptr(), n, v, k, values.data_ptr(), idx.data_ptr())
        return values, idx

    def attention(self, q, keys, values, end: int, visible: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Attention of q (heads, n, hd) over the first `end` entries of keys/values (kv_heads, capacity,
        hd); visible (n, end) uint8 or None (every entry). Returns rows (n, heads * hd); each row is
        computed alone (engine/kernels.c)."""
        heads, n, hd = q.shape
        out = torch.empty(n, heads * hd)
        self.lib.attention_rows(
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[-2], end, n, heads, keys.shape[0], hd,
            _ptr(visible), scale, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out


def row_kernels() -> RowKernels | None:
    """The kernels for this process (built on first call), or None where they cannot be built."""
    if "rows" not in _loaded:
        lib = load_kernels()
        _loaded["rows"] = None if lib is None else RowKernels(lib)
    return _loaded["rows"]


def _quantized(n: int, k: int) -> torch.Tensor:
    return torch.empty(n, k, dtype=torch.int8)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
