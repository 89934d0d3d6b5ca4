"""The decoding methods the benchmark compares, behind one `Method.run(prompt_ids, settings)`: this
engine's methods through `Engine.generate`, and transformers `generate` (plain or with prompt lookup) on
the same loaded model. Each answer carries its tokens, wall time, target forwards and the times its
tokens reached the host (for matched timing, engine/bench/stats.py)."""

import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from engine.bench.questions import BenchSettings
from engine.config import GenerationConfig
from engine.decode import Engine
from engine.detok import IncrementalDetokenizer

ENGINE_METHODS = ("vanilla", "eagle1", "eagle2", "eagle2_lookup", "eagle2_adaptive")
BASELINES = ("hf_generate", "hf_prompt_lookup", "llama_cpp")
BENCH_METHODS = ENGINE_METHODS + BASELINES
DEFAULT_METHODS = ENGINE_METHODS + ("hf_generate", "hf_prompt_lookup")  # llama_cpp needs an optional extra


@dataclass
class TurnOutput:
    output_ids: list[int]
    text: str
    wall_s: float
    cycles: int  # target forwards after the prefill
    finish_reason: str
    phase_ms: dict[str, float] | None = None  # engine methods: prefill_ms, draft_ms, verify_ms (the engine's stopwatch)
    head_cycles: int | None = None  # engine methods: cycles in which the draft head drafted
    marks: list[list] = field(default_factory=list)  # [tokens so far, seconds since the start] per forward


class Method(Protocol):
    """A decoding method. One that keeps a KV cache between calls (the engine, llama.cpp: both reuse the
    prefix a turn shares with the turns before) also has `forget()`, which starts its next answer cold."""

    def run(self, prompt_ids: list[int], settings: BenchSettings) -> TurnOutput: ...


PHASES = ("prefill_ms", "draft_ms", "verify_ms")


class EngineMethod:
    """`vanilla`, `eagle1`, `eagle2`, `eagle2_lookup` or `eagle2_adaptive` through `Engine.generate`."""

    def __init__(self, engine: Engine, method: str):
        if method != "vanilla" and engine.head is None:
            raise ValueError(f"method {method} needs a draft head; pass --head PATH or drop {method} from --methods")
        self.engine, self.method = engine, method

    def forget(self) -> None:
        self.engine.forget()

    def run(self, prompt_ids: list[int], settings: BenchSettings) -> TurnOutput:
        extended = self.method in ("eagle2_lookup", "eagle2_adaptive")
        lookup = settings.prompt_lookup_num_tokens if extended else 0
        config = GenerationConfig(
            method="eagle2" if extended else self.method,
            max_new_tokens=settings.max_new_tokens,
            sampling=settings.sampling,
            tree=replace(settings.tree, lookup=lookup, adaptive=self.method == "eagle2_adaptive"),
            seed=settings.seed,
        )
        start = time.perf_counter()
        end, marks = None, []
        for event in self.engine.generate(prompt_ids, config):
            if event["type"] == "cycle":  # its tokens are on the host: the engine syncs every cycle
                marks.append([event["totals"]["new_tokens"], round(time.perf_counter() - start, 5)])
            end = event
        wall_s = time.perf_counter() - start
        phase_ms = {k: end["totals"][k] for k in PHASES}
        totals = end["totals"]
        return TurnOutput(
            end["output_ids"], end["text"], wall_s, totals["cycles"], end["finish_reason"], phase_ms,
            totals["head_cycles"], marks,
        )


class EmitClock(BaseStreamer):
    """A streamer for `generate` that marks [tokens so far, seconds since `start`] as tokens reach the host."""

    def __init__(self, start: float):
        self.start, self.marks, self.count, self.prompt_seen = start, [], 0, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands the streamer the prompt first
            self.prompt_seen = True
            return
        self.count += value.numel()
        self.marks.append([self.count, round(time.perf_counter() - self.start, 5)])

    def end(self) -> None:
        pass


class HFGenerateMethod:
    """transformers `generate` on the engine's model: plain, or with prompt lookup decoding."""

    def __init__(self, engine: Engine, prompt_lookup: bool):
        self.engine, self.prompt_lookup = engine, prompt_lookup

    def generation_config(self, settings: BenchSettings) -> transformers.GenerationConfig:
        sampling = settings.sampling
        eos = sorted(self.engine.eos_ids)
        kwargs = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
        if sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if self.prompt_lookup:
            kwargs.update(prompt_lookup_num_tokens=settings.prompt_lookup_num_tokens)
        return transformers.GenerationConfig(**kwargs)

    @torch.no_grad()
    def run(self, prompt_ids: list[int], settings: BenchSettings) -> TurnOutput:
        model = self.engine.model
        config = self.generation_config(settings)
        forwards = [0]
        hook = model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
        try:
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.engine.device)  # (1, T)
            if not settings.sampling.greedy:
                torch.manual_seed(settings.seed)
            start = time.perf_counter()
            clock = EmitClock(start)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=clock)
            new_ids = out[0, len(prompt_ids) :].tolist()  # the host sync ends the timed region
            wall_s = time.perf_counter() - start
        finally:
            hook.remove()
        eos = self.engine.eos_ids
        detok = IncrementalDetokenizer(self.engine.tokenizer)
        detok.add([t for t in new_ids if t not in eos])
        reason = "eos" if new_ids and new_ids[-1] in eos else "max_new_tokens"
        return TurnOutput(new_ids, detok.text, wall_s, max(forwards[0] - 1, 0), reason, marks=clock.marks)


class LlamaCppMethod:
    """llama.cpp (llama-cpp-python, an optional extra) decoding the GGUF file the target was converted
    from, with the same prompt token ids and CPU threads: what a CPU user would run instead. Greedy is
    llama.cpp's temperature 0; sampling uses its own samplers (temperature, top-p, top-k, no min-p), so
    only greedy runs compare token for token. Tokens/s includes prefill, like every method here."""

    def __init__(self, engine: Engine, gguf: str | None, context: int = 4096):
        try:
            import llama_cpp
        except ImportError as error:
            raise ValueError(
                "llama_cpp needs llama-cpp-python, an optional extra: "
                'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python (builds from source, ~15 min on 2 cores)'
            ) from error
        if gguf is None:
            raise ValueError("llama_cpp runs a GGUF file: use the default model or pass --model FILE.gguf")
        self.engine = engine
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=context, n_threads=torch.get_num_threads(),
            n_threads_batch=torch.get_num_threads(), verbose=False,
        )  # fmt: skip
        self.version = llama_cpp.__version__

    def forget(self) -> None:
        self.llm.reset()  # `generate` matches its prompt against the tokens evaluated since the last reset

    def run(self, prompt_ids: list[int], settings: BenchSettings) -> TurnOutput:
        sampling, eos = settings.sampling, self.engine.eos_ids
        if sampling.greedy:
            options = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0)
        else:
            options = dict(temp=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, min_p=0.0)
            self.llm.set_seed(settings.seed)
        start = time.perf_counter()
        new_ids, marks = [], []
        for token in self.llm.generate(prompt_ids, repeat_penalty=1.0, reset=True, **options):
            new_ids.append(int(token))
            marks.append([len(new_ids), round(time.perf_counter() - start, 5)])
            if token in eos or len(new_ids) >= settings.max_new_tokens:
                break
        wall_s = time.perf_counter() - start
        detok = IncrementalDetokenizer(self.engine.tokenizer)
        detok.add([t for t in new_ids if t not in eos])
        reason = "eos" if new_ids and new_ids[-1] in eos else "max_new_tokens"
        return TurnOutput(new_ids, detok.text, wall_s, max(len(new_ids) - 1, 0), reason, marks=marks)


def build_methods(engine: Engine, names: list[str], gguf: str | None = None) -> dict[str, Method]:
    """The methods by name; `gguf` is the file llama_cpp runs (the target's source)."""
    methods = {}
    for name in names:
        if name in ENGINE_METHODS:
            methods[name] = EngineMethod(engine, name)
        elif name == "llama_cpp":
            methods[name] = LlamaCppMethod(engine, gguf)
        elif name in BASELINES:
            methods[name] = HFGenerateMethod(engine, prompt_lookup=name == "hf_prompt_lookup")
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(BENCH_METHODS)}")
    return methods
