"""The hardware description: ISA flags from /proc/cpuinfo, the auto-tune key that carries them, and a
launch path that needs neither the benchmark nor the Unix-only `resource` module."""

import subprocess
import sys
from pathlib import Path

from engine import hardware
from engine.autotune import cache as autotune_cache
from engine.hardware import isa_flags
from tests.tiny import tiny_engine

ROOT = Path(__file__).resolve().parent.parent

X86 = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile
processor\t: 1
flags\t\t: fpu sse sse2
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes sve sve2 i8mm bf16 sb
CPU implementer\t: 0x41
"""


def test_isa_flags_keep_the_relevant_ones_in_a_fixed_order():
    assert isa_flags(X86) == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]
    assert isa_flags(ARM) == ["asimd", "sve", "sve2", "bf16", "i8mm"]
    assert isa_flags("processor\t: 0\nflags\t\t: fpu sse2\n") == []
    assert isa_flags("") == []


def test_the_same_cpu_with_and_without_bf16_tunes_apart(monkeypatch):
    engine = tiny_engine("llama", head="oracle")
    monkeypatch.setattr(hardware, "cpu_description", lambda: ("AMD EPYC 9654", ["avx2", "avx512f"]))
    plain = autotune_cache.tuning_key(engine)
    monkeypatch.setattr(hardware, "cpu_description", lambda: ("AMD EPYC 9654", ["avx2", "avx512f", "avx512_bf16"]))
    with_bf16 = autotune_cache.tuning_key(engine)
    assert plain["device"] == with_bf16["device"] and plain != with_bf16
    assert with_bf16["isa"] == ["avx2", "avx512f", "avx512_bf16"]
    assert autotune_cache.cache_path(plain) != autotune_cache.cache_path(with_bf16)


def test_launch_path_imports_neither_the_benchmark_nor_resource():
    # torch and gradio may import `resource` themselves on Linux; this project's modules must not need it
    code = """
import sys
import gradio, torch, transformers
sys.modules["resource"] = None  # as on Windows: `import resource` fails from here on
import launch, app, engine.autotune.cache, engine.cli
from engine.hardware import hardware_info, peak_rss_mb
assert not [m for m in sys.modules if m.startswith("engine.bench")], "the app's launch path imports the benchmark"
assert peak_rss_mb() is None and hardware_info(torch.device("cpu"))["cpu"]
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
