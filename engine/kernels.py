"""Row-wise C kernels for the int8 backend's lean forward (engine/kernels.c), built on this machine.

The C file is compiled once per machine and compiler with `cc -O3 -march=native -ffp-contract=off` into
the cache (`cache_dir()/kernels`, well under a second) and loaded with ctypes: no torch headers, no
build tools beyond a C compiler. Where no compiler is found, or the build fails, `load_kernels()` returns
None with the reason in `kernel_status()`, and the lean forward runs the same steps as torch ops.
EAGLE_CHAT_KERNELS=0 turns them off.

Each wrapper takes contiguous CPU tensors and writes into the outputs it returns; see engine/kernels.c
for what each computes and the invariant that every output row depends on its own input row only.
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
P, L, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
SIGNATURES = {
    "rms_norm_rows": (P, P, F, L, L, P),
    "rms_quantize": (P, P, F, L, L, P, P, P),
    "quantize_rows": (P, L, L, P, P),
    "rescale_rows": (P, P, P, P, L, L, P),
    "residual_rms_quantize": (P, P, P, P, P, P, F, L, L, P, P, P),
    "qkv_rotate_store": (P, P, P, P, P, P, L, L, L, L, P, P, P, L, L, P),
    "heads_quantize": (P, L, L, L, P, P, P),
}

_loaded: dict[str, object] = {}  # "lib": the CDLL or None, "status": why, "id": the built library's key


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, out_dir: Path) -> Path:
    """The shared library for this source, compiler and CPU, compiled on first use."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    from engine.hardware import cpu_description

    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, *FLAGS, *cpu_description()[1]]).encode())
    path = out_dir / f"int8_cpu-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(
        [compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120
    )
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
            status = f"C kernels ({Path(compiler).name} -march=native)"
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


class RowKernels:
    """Typed wrappers over the CDLL; each allocates its outputs and returns them."""

    def __init__(self, lib):
        self.lib = lib

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
        """q (1, heads, n, hd) float64, rotated; k rotated and v written into `keys`/`values` (kv_heads,
        capacity, hd) at past .. past + n."""
        n = acc.shape[0]
        q = torch.empty(1, heads, n, head_dim, dtype=torch.float64)
        scratch = torch.empty(head_dim)
        self.lib.qkv_rotate_store(
            acc.data_ptr(), wscale.data_ptr(), xscale.data_ptr(), _ptr(bias), cos.data_ptr(), sin.data_ptr(), n,
            heads, kv_heads, head_dim, q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[-2], past,
            scratch.data_ptr(),
        )  # fmt: skip
        return q

    def heads_quantize(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention output (1, heads, n, hd) float64 as int8 rows (n, heads * hd) and their scales."""
        _, heads, n, hd = out.shape
        q, scale, scratch = _quantized(n, heads * hd), torch.empty(n, 1), torch.empty(heads * hd)
        self.lib.heads_quantize(out.data_ptr(), n, heads, hd, scratch.data_ptr(), q.data_ptr(), scale.data_ptr())
        return q, scale


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
