"""The machine a measurement ran on: CPU model and the instruction sets that change kernel speed, GPU,
library versions, and the process's peak memory.

`hardware_info` goes into every benchmark report and, through `engine.autotune`, into the auto-tune cache
key: a tree tuned on a CPU with AMX or bf16 instructions is not the tree for one without them.
Unix-only modules (`resource`) are imported where they are used, so this module imports everywhere.
"""

import os
import platform
import sys
from pathlib import Path

import torch
import transformers

# CPU feature flags (as /proc/cpuinfo spells them) that decide which matmul kernels torch can use.
X86_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
ARM_ISA = ("asimd", "neon", "sve", "sve2", "bf16", "i8mm")


def isa_flags(cpuinfo: str) -> list[str]:
    """The relevant ISA flags in the text of /proc/cpuinfo (x86 `flags`, ARM `Features`), in table order."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            present = set(value.split())
            return [flag for flag in X86_ISA + ARM_ISA if flag in present]
    return []


def cpu_description() -> tuple[str, list[str]]:
    """(CPU model, ISA flags). Linux reads /proc/cpuinfo; elsewhere the model is platform's answer and
    the flags are what the platform guarantees (NEON on Apple silicon), else none."""
    cpu, isa = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        if sys.platform == "darwin" and platform.machine() == "arm64":
            isa = ["asimd"]
        return cpu, isa
    for line in text.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return cpu, isa_flags(text)


def hardware_info(device: torch.device) -> dict:
    cpu, isa = cpu_description()
    return {
        "cpu": cpu,
        "isa": isa,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB; None where `resource` does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB
