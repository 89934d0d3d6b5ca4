"""The llama_cpp benchmark method: llama-cpp-python (an optional extra) on the default model's GGUF."""

import sys

import pytest

from engine.bench.methods import LlamaCppMethod, build_methods
from engine.bench.questions import BenchSettings
from tests.tiny import tiny_engine


def test_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as when it is not installed
    with pytest.raises(ValueError, match="pip install llama-cpp-python"):
        build_methods(tiny_engine("llama", head="none"), ["llama_cpp"], gguf="model.gguf")


def test_llama_cpp_needs_a_gguf():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra")
    with pytest.raises(ValueError, match="GGUF"):
        LlamaCppMethod(tiny_engine("llama", head="none"), None)


@pytest.mark.slow
def test_llama_cpp_answers_the_default_model(default_model_dir):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra")
    from engine.decode import Engine
    from engine.models import ModelSpec, default_gguf, load_target

    model, tokenizer = load_target(ModelSpec(model=str(default_model_dir), dtype="fp32", device="cpu"), progress=False)
    engine = Engine(model, tokenizer)
    method = LlamaCppMethod(engine, str(default_gguf(progress=False)))
    ids = engine.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    out = method.run(ids, BenchSettings(max_new_tokens=12))
    assert 1 <= len(out.output_ids) <= 12 and out.text.strip()
    assert out.text == tokenizer.decode([t for t in out.output_ids if t not in engine.eos_ids])
    assert [m[0] for m in out.marks] == list(range(1, len(out.output_ids) + 1))
    again = method.run(ids, BenchSettings(max_new_tokens=12))
    assert again.output_ids == out.output_ids  # greedy: repeatable
