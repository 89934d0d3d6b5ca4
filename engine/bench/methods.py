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
BASELINES = ("hf_generate", "hf_prompt_lookup")
BENCH_METHODS = ENGINE_METHODS + BASELINES


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
    def run(self, prompt_ids: list[int], settings: BenchSettings) -> TurnOutput: ...


PHASES = ("prefill_ms", "draft_ms", "verify_ms")


class EngineMethod:
    """`vanilla`, `eagle1`, `eagle2`, `eagle2_lookup` or `eagle2_adaptive` through `Engine.generate`."""

    def __init__(self, engine: Engine, method: str):
        if method != "vanilla" and engine.head is None:
            raise ValueError(f"method {method} needs a draft head; pass --head PATH or drop {method} from --methods")
        self.engine, self.method = engine, method

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
            end["output_ids"], end["text"], wall_s, totals["cycles"], end["finish_reason"], phase_ms, totals["head_cycles"], marks
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


def build_methods(engine: Engine, names: list[str]) -> dict[str, Method]:
    methods = {}
    for name in names:
        if name in ENGINE_METHODS:
            methods[name] = EngineMethod(engine, name)
        elif name in BASELINES:
            methods[name] = HFGenerateMethod(engine, prompt_lookup=name == "hf_prompt_lookup")
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(BENCH_METHODS)}")
    return methods
