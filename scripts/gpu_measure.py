"""What the GPU check (scripts/gpu_check.py) runs and times: random-weight models and heads, one timed
generation with its per-cycle split, the verify-cost curve, transformers' static-cache `generate`, a
bitsandbytes nf4 swap, the machine's description, and the subject the model steps run on (`load_subject`,
given the run's `Check`)."""

import argparse
import gc
import sys
import time
from dataclasses import dataclass, replace

import torch

from engine.config import DEFAULT_LOOKUP as LOOKUP  # the app's prompt-lookup branch

SHAPES = {  # random-weight Llama configs: the probe's and the stand-in's
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}  # fmt: skip


class IdsTokenizer:
    """What the engine needs of a tokenizer for a random-weight model: no end-of-sequence, no text."""

    eos_token_id = None

    def decode(self, ids, **kwargs) -> str:
        return ""


def synthetic_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random-weight Llama of SHAPES[shape], built directly on `device` (an 8B model never touches the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.lean import attach_lean

    dims = dict(SHAPES[shape])
    theta = dims.pop("rope_theta")
    config = LlamaConfig(
        **dims, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
        "rope_theta": theta}, bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # speed-only: every reply runs its full length
    model.generation_config.pad_token_id = 0
    if device.type == "cpu":  # what load_target does on a CPU
        attach_lean(model)
    return model


def random_head(model):
    from engine.head import DraftHead, head_config_for

    weight = model.get_output_embeddings().weight
    return DraftHead(head_config_for(model)).to(device=weight.device, dtype=torch.bfloat16 if not
                                                weight.is_floating_point() else weight.dtype).eval()  # fmt: skip


def default_model_cached() -> bool:
    """Whether the default model is converted in this machine's cache (a GPU machine cannot fetch it)."""
    from engine.models import DEFAULT_MODEL_NAME, MARKER, cache_dir

    return (cache_dir() / "models" / DEFAULT_MODEL_NAME / MARKER).is_file()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generation(engine, ids: list[int], method: str, tokens: int, tree) -> dict:
    """One greedy generation: output ids and the per-cycle split of its time (ms)."""
    from engine.config import GenerationConfig

    lookup = method == "eagle2_lookup"
    config = GenerationConfig(method="eagle2" if lookup else method, max_new_tokens=tokens,
                              tree=replace(tree, lookup=LOOKUP if lookup else 0))  # fmt: skip
    engine.forget()  # each timed run prefills its whole prompt, not another run's kept cache
    start = time.perf_counter()
    marks = []
    for event in engine.generate(ids, config):
        if event["type"] == "cycle":
            marks.append((event["totals"]["new_tokens"], time.perf_counter() - start))
        end = event
    wall_ms = (time.perf_counter() - start) * 1000.0
    t = end["totals"]
    cycles = max(t["cycles"], 1)
    decode_ms = (marks[-1][1] - marks[0][1]) * 1000.0 if len(marks) > 1 else 0.0
    return {
        "output_ids": end["output_ids"],
        "new_tokens": t["new_tokens"],
        "cycles": t["cycles"],
        "head_cycles": t["head_cycles"],
        "tau": t["tau"],
        "wall_ms": wall_ms,
        "prefill_ms": t["prefill_ms"],
        "ms_per_cycle": (wall_ms - t["prefill_ms"]) / cycles,
        "draft_ms_per_cycle": t["draft_ms"] / cycles,
        "draft_ms_per_head_cycle": t["draft_ms"] / t["head_cycles"] if t["head_cycles"] else 0.0,
        "verify_ms_per_cycle": t["verify_ms"] / cycles,
        "host_ms_per_cycle": (wall_ms - t["prefill_ms"] - t["draft_ms"] - t["verify_ms"]) / cycles,
        "decode_ms_per_token": decode_ms / max(marks[-1][0] - marks[0][0], 1) if marks else 0.0,
        "tokens_per_s": t["new_tokens"] / wall_ms * 1000.0,
    }


def split_of(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "output_ids"}


def verify_curve(engine, context: list[int], sizes, repeats: int, tree) -> dict:
    """ms per target forward by tree size, and the head's draft ms for the tree's depth and top-k."""
    from engine.autotune.costs import measure_costs

    cost = measure_costs(engine, context, node_counts=sizes, draft_points=[(tree.depth, tree.top_k)],
                         repeats=repeats)  # fmt: skip
    verify = {str(n): ms for n, ms in cost.verify}
    return {"context": len(context), "verify_ms": verify, "draft_ms": cost.draft[0][2],
            "ratio_64_to_1": verify["64"] / verify["1"] if "64" in verify else None}  # fmt: skip


def quantize_nf4(model) -> None:
    """Replace the decoder layers' linears by bitsandbytes nf4 ones (quantized on their device, in place);
    embeddings, norms and lm_head stay bf16, as transformers' own 4-bit loading leaves lm_head."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=torch.bfloat16, quant_type="nf4", device="meta",
                )  # fmt: skip
                quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
                if linear.bias is not None:
                    quantized.bias = linear.bias
                setattr(parent, name, quantized.to(linear.weight.device))  # .to quantizes the weight


def hf_static(model, ids: list[int], tokens: int, compiled: bool) -> dict:
    """transformers `generate` with a static cache: wall time (prefill included) and decode ms per token."""
    from engine.bench.methods import EmitClock

    prompt = torch.tensor([ids], dtype=torch.long, device=model.device)  # (1, T)
    start = time.perf_counter()
    clock = EmitClock(start)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, cache_implementation="static",
                             disable_compile=not compiled, pad_token_id=0, streamer=clock)  # fmt: skip
    new = out.shape[1] - prompt.shape[1]  # the host read ends the timed region
    wall_ms = (time.perf_counter() - start) * 1000.0
    marks = clock.marks
    decode = (marks[-1][1] - marks[0][1]) * 1000.0 / max(marks[-1][0] - marks[0][0], 1) if len(marks) > 1 else 0.0
    return {"new_tokens": new, "wall_ms": wall_ms, "tokens_per_s": new / wall_ms * 1000.0,
            "decode_ms_per_token": decode}  # fmt: skip


def environment(device: torch.device) -> dict:
    import transformers

    from engine.bench.cli import git_commit

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "commit": git_commit(), "python": sys.version.split()[0]}  # fmt: skip
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    return env


@dataclass
class Subject:
    """A loaded engine and what to feed it: real chat prompts, or random ids for a stand-in."""

    engine: object
    prompts: list[list[int]]
    context: list[int]  # about `Sizes.context` tokens before a verify-cost curve
    label: str



def model_argument(check) -> str | None:
    """--model for engine.bench: the default model's folder by path, so the bench never looks for its GGUF."""
    if check.model is not None:
        return check.model
    from engine.models import DEFAULT_MODEL_NAME, cache_dir

    return str(cache_dir() / "models" / DEFAULT_MODEL_NAME)



def load_subject(check, dtype: str) -> "Subject":
    """The target (and head) the model steps run: the real model, or the stand-in."""
    from engine.decode import Engine

    sizes = check.sizes
    if check.stand_in:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        model = synthetic_model(check.stand_in, torch_dtype, check.device)
        engine = Engine(model, IdsTokenizer(), random_head(model))
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        prompts = [torch.randint(vocab, (40,), generator=g).tolist() for _ in range(sizes.prompts)]
        context = torch.randint(vocab, (sizes.context,), generator=g).tolist()
        return Subject(engine, prompts, context, f"stand-in: random {check.stand_in}-shaped model and head")
    from engine.autotune.calibration import CALIBRATION_PROMPTS
    from engine.cli import engine_from_args

    args = argparse.Namespace(model=model_argument(check), head=check.head, dtype=dtype, device=str(check.device),
                              load_in_4bit=False, load_in_8bit=False, threads=None, backend=None)  # fmt: skip
    engine, _ = engine_from_args(args, need_head=True)
    prompts = [engine.chat_ids([{"role": "user", "content": p}]) for p in CALIBRATION_PROMPTS[: sizes.prompts]]
    text = " ".join(CALIBRATION_PROMPTS)
    context = engine.chat_ids([{"role": "user", "content": text}])
    while len(context) < sizes.context:
        context = context + context
    return Subject(engine, prompts, context[: sizes.context], check.model or "the default model and shipped head")
