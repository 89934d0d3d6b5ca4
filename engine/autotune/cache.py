"""Tuning and its cache: `tune` measures and chooses, `TuneResult` is what it found, and `load_or_tune`
reads the cached result for this model, head, dtype, device and sampling, or tunes and caches it."""

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.autotune.calibration import (
    CALIBRATION_PROMPTS,
    MeasuredAcceptance,
    calibrate_acceptance,
    reference_answers,
)
from engine.autotune.choice import SAMPLED_GRID, Candidate, rank_trees, tree_grid
from engine.autotune.costs import NODE_COUNTS, TIMING, MeasuredCost, measure_costs
from engine.config import SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.hardware import hardware_info
from engine.head import weights_digest
from engine.kernels import kernels_id
from engine.models import cache_dir

FORMAT = 1  # bump when the cached JSON changes meaning


@dataclass
class TuneResult:
    key: dict
    tree: TreeConfig
    tau: float
    tokens_per_s: float  # expected, from the cost and acceptance models
    vanilla_tokens_per_s: float  # 1000 / verify_ms(1)
    cost: MeasuredCost
    acceptance: MeasuredAcceptance
    ranked: list[Candidate] = field(default_factory=list)  # best candidates, for reports

    @property
    def speedup(self) -> float:
        return self.tokens_per_s / self.vanilla_tokens_per_s

    def summary(self) -> str:
        t, sampling = self.tree, self.key.get("sampling")
        decoding = (
            " for greedy decoding" if sampling is None
            else f" for sampling at temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}"
            + (f", top-k {sampling['top_k']}" if sampling["top_k"] else "")
        )  # fmt: skip
        line = (
            f"auto-tuned tree{decoding}: {t.describe()} "
            f"(expected τ {self.tau:.2f}, {self.tokens_per_s:.1f} tokens/s, {self.speedup:.2f}x vanilla "
            f"on this machine; launch.py {'--tree' if sampling is None else '--sampling-tree'} "
            f"{t.total_tokens},{t.depth},{t.top_k})"
        )
        if self.speedup < 1.0:
            line += "; no tree beats vanilla here with this head, so vanilla is the faster choice"
        return line

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "tree": asdict(self.tree),
            "tau": self.tau,
            "tokens_per_s": self.tokens_per_s,
            "vanilla_tokens_per_s": self.vanilla_tokens_per_s,
            "cost": {"verify": self.cost.verify, "draft": self.cost.draft},
            "acceptance": {
                "samples": self.acceptance.samples,
                "table": [[*key, tau] for key, tau in self.acceptance.table.items()],
            },
            "ranked": [{**asdict(c.tree), "tau": c.tau, "draft_ms": c.draft_ms, "verify_ms": c.verify_ms,
                        "tokens_per_s": c.tokens_per_s} for c in self.ranked],  # fmt: skip
        }

    @classmethod
    def from_json(cls, data: dict) -> "TuneResult":
        if data.get("format") != FORMAT:
            raise ValueError(f"auto-tune cache format {data.get('format')} is not {FORMAT}")
        ranked = [
            Candidate(TreeConfig(c["total_tokens"], c["depth"], c["top_k"]), c["tau"], c["draft_ms"], c["verify_ms"])
            for c in data["ranked"]
        ]
        return cls(
            key=data["key"],
            tree=TreeConfig(**data["tree"]),
            tau=data["tau"],
            tokens_per_s=data["tokens_per_s"],
            vanilla_tokens_per_s=data["vanilla_tokens_per_s"],
            cost=MeasuredCost([tuple(p) for p in data["cost"]["verify"]], [tuple(p) for p in data["cost"]["draft"]]),
            acceptance=MeasuredAcceptance(
                {tuple(row[:3]): row[3] for row in data["acceptance"]["table"]}, data["acceptance"]["samples"]
            ),
            ranked=ranked,
        )


def tuning_key(engine: Engine, sampling: SamplingConfig = SamplingConfig()) -> dict:
    """What the tuned tree depends on: model, head weights, dtype, the hardware it was timed on (on a CPU
    with the ISA flags that pick its kernels), and the sampling settings when not greedy (they change
    acceptance)."""
    if engine.head is None:
        raise ValueError("auto-tuning picks the draft tree, so it needs a draft head; load one with --head")
    hw = hardware_info(engine.device)
    where = hw["gpu"] if hw["gpu"] else f"{hw['cpu']}, {hw['threads']} threads"
    config = engine.model.config
    key = {
        "model": getattr(config, "_name_or_path", "") or config.model_type,
        "model_shape": [config.hidden_size, config.num_hidden_layers, config.vocab_size],
        "head_sha256": weights_digest(engine.head)[:16],
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": f"{engine.device} ({where})",
        "torch": hw["torch"],
        "timing": TIMING,
    }
    if engine.device.type == "cpu":  # the same CPU model ships with and without bf16 or AMX kernels
        key["isa"] = hw["isa"]
        if engine.backend == "int8":
            key["int8_rows"] = kernels_id()
    if not sampling.greedy:  # greedy keys carry no sampling entry: greedy tunings cached before stay valid
        key["sampling"] = asdict(sampling)
    return key


def cache_path(key: dict, root: Path | None = None) -> Path:
    name = re.sub(r"[^A-Za-z0-9.]+", "-", Path(key["model"]).name or "model").strip("-")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return (root or cache_dir()) / "autotune" / f"{name}-{key['dtype']}-{digest}.json"


def tune(
    engine: Engine,
    prompts: list[str] = CALIBRATION_PROMPTS[:4],
    new_tokens: int = 64,
    stride: int = 2,
    grid: list[TreeConfig] | None = None,
    node_counts=NODE_COUNTS,
    repeats: int = 5,
    progress: bool = False,
    sampling: SamplingConfig = SamplingConfig(),
) -> TuneResult:
    """Measure costs and acceptance on this machine and choose the tree, for greedy decoding or for the
    given sampling settings (then on `SAMPLED_GRID`, the trees small enough to pay when sampling)."""
    key = tuning_key(engine, sampling)
    grid = grid or (tree_grid() if sampling.greedy else SAMPLED_GRID)
    answers = reference_answers(engine, list(prompts), new_tokens, sampling)
    acceptance = calibrate_acceptance(engine, answers, grid, stride, progress, sampling)
    longest = max(answers, key=lambda a: len(a[0]) + len(a[1]))
    draft_points = sorted({(t.depth, t.top_k) for t in grid})
    cost = measure_costs(
        engine, longest[0] + longest[1], node_counts, draft_points, repeats, progress=progress, sampling=sampling
    )
    ranked = rank_trees(cost, acceptance, grid)
    best = ranked[0]
    return TuneResult(
        key=key,
        tree=best.tree,
        tau=best.tau,
        tokens_per_s=best.tokens_per_s,
        vanilla_tokens_per_s=1000.0 / cost.verify_ms(1),
        cost=cost,
        acceptance=acceptance,
        ranked=ranked[:20],
    )


def load_or_tune_result(
    engine: Engine, cache: Path | None = None, retune: bool = False, progress: bool = False, **tune_args
) -> TuneResult:
    """The cached tuning for this model, head, dtype and device, or a fresh one (then cached)."""
    key = tuning_key(engine, tune_args.get("sampling", SamplingConfig()))
    path = cache_path(key, cache)
    if not retune and path.is_file():
        try:
            result = TuneResult.from_json(json.loads(path.read_text()))
            if result.key == key:
                return result
        except (ValueError, KeyError, TypeError) as error:
            print(f"[eagle-chat] ignoring unreadable auto-tune cache {path} ({error}); tuning again", file=sys.stderr)
    if progress:
        print(
            "[eagle-chat] auto-tuning the draft tree for this machine (once per model, head, dtype and device)",
            file=sys.stderr,
        )
    result = tune(engine, progress=progress, **tune_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    os.replace(partial, path)
    return result


def load_or_tune(
    engine: Engine, cache: Path | None = None, retune: bool = False, progress: bool = False, **tune_args
) -> TreeConfig:
    """The tree to use on this machine (see `load_or_tune_result` for the numbers behind it)."""
    return load_or_tune_result(engine, cache, retune, progress, **tune_args).tree
