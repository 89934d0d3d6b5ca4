"""Execution backends for the target, and choosing one by measurement on this machine.

A backend is how the target's weights are stored and multiplied:
  int8      int8 weights and per-row int8 activations, integer accumulation (CPU; engine/int8.py)
  fp32      float32
  bf16      bfloat16: fast only where the CPU has native bf16 (AVX-512 BF16, AMX) or on a GPU
  fp16      float16 (GPUs)
  bnb-8bit, bnb-4bit   bitsandbytes (mainly CUDA; slow on a CPU)
Each is lossless in the engine's sense: EAGLE-2 reproduces vanilla decoding *of that backend's model*.
int8 is a different model from the float ones (its replies can differ from fp32's), so the UI names it.

What "best" means: not the fastest single step but the most EAGLE-2 tokens/s, which needs cheap
verification of many tokens at once. `choose_backend` (pure) ranks backends by the expected tokens/s of
their best tree, or of vanilla decoding where no tree pays; the measured costs come from
engine.autotune's timing, the acceptance from a calibration or from the head's shipped table.

On a CPU, `--backend auto` measures the candidates (`CPU_CANDIDATES`); on CUDA it keeps bf16 (fp16 where
bf16 is unsupported) without measuring.
"""

import copy
from dataclasses import dataclass, replace

import torch

from engine.int8 import int8_supported, quantize_int8
from engine.lean import attach_lean
from engine.models import ModelSpec

# backend name -> (ModelSpec.dtype, ModelSpec.quantization)
BACKENDS = {
    "int8": ("float32", "int8"),
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "fp16": ("float16", None),
    "bnb-8bit": ("auto", "8bit"),
    "bnb-4bit": ("auto", "4bit"),
}
CPU_CANDIDATES = ("int8", "fp32", "bf16")
PROBE_NODES = (1, 16)  # a first look at every candidate; a candidate slower at both is not measured further
DOMINATED = 1.25  # ... when it is at least this much slower than another candidate at each probe
# EAGLE-2 is the default method where plain EAGLE-2 (no prompt-lookup branch) is expected at least at this
# share of vanilla decoding's speed. The estimate leaves out the app's lookup branch, which comes on top:
# on int8 plain EAGLE-2 was expected at 0.98x vanilla on one Xeon and measured 1.06x, 1.62x with the
# branch; with the C forward on another it was expected at 1.09x and measured 0.98x, 1.31x with the
# branch (docs/performance.md).
MARGIN = 0.9
# At temperature > 0 the app drafts by default only where the tuned sampling tree is expected to beat vanilla
# by this much: the expectation leaves out the prompt-lookup branch's nodes, which rarely match when sampling.
SAMPLED_MARGIN = 1.2


def spec_for(backend: str, spec: ModelSpec) -> ModelSpec:
    """`spec` with the dtype and quantization of `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    dtype, quantization = BACKENDS[backend]
    return replace(spec, dtype=dtype, quantization=quantization)


def cpu_candidates() -> tuple[str, ...]:
    return CPU_CANDIDATES if int8_supported() else tuple(b for b in CPU_CANDIDATES if b != "int8")


def variant(fp32_model, backend: str):
    """A copy of a float32 CPU model in another backend (int8, bf16, fp32), with its lean forward."""
    if backend == "fp32":
        model = fp32_model
    elif backend == "int8":
        model = quantize_int8(copy.deepcopy(fp32_model))
    elif backend in ("bf16", "fp16"):
        model = copy.deepcopy(fp32_model).to(torch.bfloat16 if backend == "bf16" else torch.float16)
    else:
        raise ValueError(f"backend {backend!r} cannot be derived from a float32 model")
    attach_lean(model)
    return model


def dominated(probes: dict[str, list[float]]) -> set[str]:
    """Candidates at least DOMINATED times slower than some other candidate at every probe point.
    `probes`: backend -> ms at PROBE_NODES."""
    out = set()
    for name, times in probes.items():
        for other, other_times in probes.items():
            if other != name and all(t >= DOMINATED * o for t, o in zip(times, other_times)):
                out.add(name)
                break
    return out


@dataclass(frozen=True)
class BackendRate:
    backend: str
    vanilla_tokens_per_s: float
    eagle_tokens_per_s: float  # of its best tree; 0 when not measured (dominated at the probe)
    tree: tuple[int, int, int] | None  # (total_tokens, depth, top_k) of that tree

    @property
    def best(self) -> float:
        return max(self.vanilla_tokens_per_s, self.eagle_tokens_per_s)


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    method: str  # "eagle2", or "vanilla" when no tree beats vanilla decoding on any backend
    rates: tuple[BackendRate, ...]  # every candidate, best first

    def reason(self) -> str:
        best = self.rates[0]
        others = ", ".join(
            f"{r.backend} {r.best:.0f}" + ("" if r.eagle_tokens_per_s else " (slower at the probe)")
            for r in self.rates[1:]
        )
        if self.method == "vanilla":
            what = "vanilla decoding (no draft tree pays here)"
            line = f"{self.backend} backend: {what} expected at {best.best:.0f} tokens/s"
        else:
            line = f"{self.backend} backend: EAGLE-2 expected at {best.eagle_tokens_per_s:.0f} tokens/s"
            if best.eagle_tokens_per_s < best.vanilla_tokens_per_s:
                line += f" before its prompt-lookup branch (vanilla {best.vanilla_tokens_per_s:.0f})"
        return line + (f"; against {others} tokens/s" if others else "")


def choose_backend(rates: list[BackendRate]) -> BackendChoice:
    """The backend whose best method is fastest (ties: the order given); the method is EAGLE-2 where it
    is expected at MARGIN of vanilla decoding's speed there or more, else vanilla."""
    if not rates:
        raise ValueError("no backend was measured")
    ranked = sorted(rates, key=lambda r: -r.best)  # stable: ties keep the given order
    top = ranked[0]
    method = "eagle2" if top.eagle_tokens_per_s >= MARGIN * top.vanilla_tokens_per_s else "vanilla"
    return BackendChoice(top.backend, method, tuple(ranked))
