"""Auto-tuning on a CPU: the backend and the draft trees together, in well under a minute.

`tune_cpu` times each candidate backend (engine/backend.py) on this machine, scores its trees with the
head's acceptance, and keeps the backend whose best method is fastest:
  1. acceptance: the head's shipped table (engine/acceptance.py), else a short greedy calibration on the
     first candidate (acceptance hardly depends on the backend);
  2. a probe of every candidate (a 1-node and a 16-node verify); candidates slower at both than another
     are dropped (bf16 without native bf16 kernels, typically);
  3. full timing of the rest (verify by tree size, draft by depth and top-k), trees ranked per backend;
  4. the choice (`choose_backend`): the backend with the most expected tokens/s, and vanilla decoding as
     the default method where no tree beats it.
The sampling tree reuses the chosen backend's timing with the head's sampled acceptance (shipped, or a
short sampled calibration on the chosen backend).

Everything is cached under `cache_dir()/backend/`, keyed by model, head, CPU (model, ISA flags, threads)
and torch: a second launch loads the chosen backend and its trees without timing anything.
"""

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.acceptance import SAMPLING, head_digest, load_shipped
from engine.autotune.cache import TuneResult, tuning_key
from engine.autotune.calibration import CALIBRATION_PROMPTS, calibrate_acceptance, reference_answers
from engine.autotune.choice import SAMPLED_GRID, rank_trees, tree_grid
from engine.autotune.costs import TIMING, measure_costs
from engine.backend import PROBE_NODES, BackendChoice, BackendRate, choose_backend, cpu_candidates, dominated, variant
from engine.checkpoint import load_head
from engine.decode import Engine
from engine.hardware import hardware_info
from engine.kernels import kernels_id
from engine.models import cache_dir

FORMAT = 2  # bump when the cached choice changes meaning
CPU_NODE_COUNTS = (1, 4, 8, 16, 24, 32, 48, 64)
CONTEXT_TOKENS = 256  # the context the forwards are timed after: a typical chat turn


@dataclass
class CpuTuning:
    choice: BackendChoice
    greedy: TuneResult
    sampling: TuneResult
    acceptance_source: str  # "shipped" or "calibrated"
    seconds: float  # how long the tuning took (0 for a cache hit)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "choice": {"backend": self.choice.backend, "method": self.choice.method,
                       "rates": [asdict(r) for r in self.choice.rates]},  # fmt: skip
            "greedy": self.greedy.to_json(),
            "sampling": self.sampling.to_json(),
            "acceptance_source": self.acceptance_source,
            "seconds": round(self.seconds, 1),
        }

    @classmethod
    def from_json(cls, data: dict) -> "CpuTuning":
        if data.get("format") != FORMAT:
            raise ValueError(f"backend cache format {data.get('format')} is not {FORMAT}")
        rates = tuple(
            BackendRate(r["backend"], r["vanilla_tokens_per_s"], r["eagle_tokens_per_s"],
                        tuple(r["tree"]) if r["tree"] else None)  # fmt: skip
            for r in data["choice"]["rates"]
        )
        choice = choose_backend(list(rates))  # the measured rates are cached; the rule that reads them is today's
        return cls(
            choice, TuneResult.from_json(data["greedy"]), TuneResult.from_json(data["sampling"]),
            data["acceptance_source"], 0.0,
        )  # fmt: skip


def backend_key(model, head_dir: Path, candidates: tuple[str, ...]) -> dict:
    hw = hardware_info(torch.device("cpu"))
    config = model.config
    return {
        "model": getattr(config, "_name_or_path", "") or config.model_type,
        "model_shape": [config.hidden_size, config.num_hidden_layers, config.vocab_size],
        "head_sha256": head_digest(head_dir),
        "cpu": hw["cpu"],
        "isa": hw["isa"],
        "threads": hw["threads"],
        "torch": hw["torch"],
        "int8_rows": kernels_id(),
        "timing": TIMING,
        "candidates": list(candidates),
    }


def backend_cache_path(key: dict, root: Path | None = None) -> Path:
    name = re.sub(r"[^A-Za-z0-9.]+", "-", Path(key["model"]).name or "model").strip("-")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return (root or cache_dir()) / "backend" / f"{name}-{digest}.json"


def timing_context(engine: Engine, tokens: int = CONTEXT_TOKENS) -> list[int]:
    """A chat prompt repeated to `tokens` ids: the forwards' cost depends on the length, not the text."""
    ids = engine.chat_ids([{"role": "user", "content": " ".join(CALIBRATION_PROMPTS)}])
    return (ids * (tokens // len(ids) + 1))[:tokens]


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[eagle-chat] {message}", file=sys.stderr, flush=True)


def _result(engine: Engine, cost, acceptance, grid, sampling=None) -> TuneResult:
    ranked = rank_trees(cost, acceptance, grid)
    best = ranked[0]
    key = tuning_key(engine) if sampling is None else tuning_key(engine, sampling)
    return TuneResult(key, best.tree, best.tau, best.tokens_per_s, 1000.0 / cost.verify_ms(1), cost, acceptance,
                      ranked[:20])  # fmt: skip


def tune_cpu(
    fp32_model, tokenizer, head_dir: Path, progress: bool = True, candidates: tuple[str, ...] | None = None,
    cache: Path | None = None, retune: bool = False, repeats: int = 3,
) -> tuple[Engine, CpuTuning]:  # fmt: skip
    """The engine on the chosen backend (the head loaded on it) and the tuning behind the choice."""
    fp32_head = load_head(head_dir, fp32_model)  # a head that does not fit fails here, before any timing

    def head_for(name: str, model):
        return fp32_head if name == "fp32" else load_head(head_dir, model)  # fp32 runs fp32_model itself

    candidates = candidates or cpu_candidates()
    key = backend_key(fp32_model, head_dir, candidates)
    path = backend_cache_path(key, cache)
    if not retune and path.is_file():
        tuning = None
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                tuning = CpuTuning.from_json(data)
        except (ValueError, KeyError, TypeError) as error:
            _say(True, f"ignoring unreadable backend cache {path} ({error}); measuring again")
        if tuning is not None:
            model = variant(fp32_model, tuning.choice.backend)
            return Engine(model, tokenizer, head_for(tuning.choice.backend, model)), tuning

    start = time.perf_counter()
    engines: dict[str, Engine] = {}

    def engine_for(name: str) -> Engine:
        if name not in engines:
            model = variant(fp32_model, name)
            engines[name] = Engine(model, tokenizer, head_for(name, model))
        return engines[name]

    greedy_acceptance, sampled_acceptance = load_shipped(head_dir), load_shipped(head_dir, SAMPLING)
    source = "shipped" if greedy_acceptance is not None else "calibrated"
    if greedy_acceptance is None:
        _say(progress, "calibrating the head's acceptance (no table shipped with this head)")
        first = engine_for(candidates[0])
        answers = reference_answers(first, list(CALIBRATION_PROMPTS[:4]), 64)
        greedy_acceptance = calibrate_acceptance(first, answers, tree_grid(), 2, progress)

    context = timing_context(engine_for(candidates[0]))
    _say(progress, f"timing the backends {', '.join(candidates)} on this CPU")
    probes = {}
    for name in candidates:
        cost = measure_costs(engine_for(name), context, PROBE_NODES, [(2, 4)], repeats)
        probes[name] = [ms for _, ms in cost.verify]
    slow = dominated(probes)
    for name in slow:
        engines.pop(name, None)  # free its weights
    grid = tree_grid()
    draft_points = sorted({(t.depth, t.top_k) for t in grid + SAMPLED_GRID})
    rates, costs = [], {}
    for name in candidates:
        if name in slow:
            rates.append(BackendRate(name, 1000.0 / probes[name][0], 0.0, None))
            continue
        engine = engine_for(name)
        cost = measure_costs(engine, context, CPU_NODE_COUNTS, draft_points, repeats, progress=progress)
        best = rank_trees(cost, greedy_acceptance, grid)[0]
        t = best.tree
        tree = (t.total_tokens, t.depth, t.top_k)
        rates.append(BackendRate(name, 1000.0 / cost.verify_ms(1), best.tokens_per_s, tree))
        costs[name] = cost
    choice = choose_backend(rates)
    engine = engine_for(choice.backend)
    for name in list(engines):
        if name != choice.backend:
            del engines[name]
    greedy = _result(engine, costs[choice.backend], greedy_acceptance, grid)
    if sampled_acceptance is None:
        _say(progress, "calibrating the head's acceptance when sampling (no table shipped with this head)")
        answers = reference_answers(engine, list(CALIBRATION_PROMPTS[:2]), 48, SAMPLING)
        sampled_acceptance = calibrate_acceptance(engine, answers, SAMPLED_GRID, 4, progress, SAMPLING)
    sampling = _result(engine, costs[choice.backend], sampled_acceptance, SAMPLED_GRID, SAMPLING)
    tuning = CpuTuning(choice, greedy, sampling, source, time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"key": key, **tuning.to_json()}, indent=1) + "\n")
    os.replace(partial, path)
    return engine, tuning


@torch.no_grad()
def fastest_vanilla(fp32_model, candidates: tuple[str, ...] | None = None, repeats: int = 5):
    """Without a draft head only vanilla decoding runs: the backend with the fastest one-token step
    after a typical context. Returns (model, {backend: ms})."""
    from engine.autotune.costs import _median_ms
    from engine.kv import new_cache
    from engine.verify import target_forward

    candidates = candidates or cpu_candidates()
    timings, models = {}, {}
    context = torch.arange(CONTEXT_TOKENS) % fp32_model.config.vocab_size
    for name in candidates:
        model = variant(fp32_model, name)
        cache = new_cache(model)
        target_forward(model, context, torch.arange(CONTEXT_TOKENS), None, cache, logits=False)
        token, position = context[-1:], torch.tensor([CONTEXT_TOKENS])

        def step(model=model, cache=cache, token=token, position=position):
            target_forward(model, token, position, None, cache)
            cache.crop(-1)

        timings[name] = _median_ms(step, repeats)
        models[name] = model
    best = min(timings, key=timings.get)
    return models[best], timings
