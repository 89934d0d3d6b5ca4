"""Configuration dataclasses for one generation request.

Everything here is frozen: a request's settings cannot change while it runs. `launch.py`, the benchmark
and the training commands parse arguments and build these; the engine only reads them.
"""

from dataclasses import asdict, dataclass, field
from enum import StrEnum


class Method(StrEnum):
    """How the engine decodes: the target alone, or with an EAGLE head drafting a static or dynamic tree.
    A str, so "eagle2" and Method.EAGLE2 compare equal and serialise the same."""

    VANILLA = "vanilla"
    EAGLE1 = "eagle1"  # static tree
    EAGLE2 = "eagle2"  # dynamic tree


METHODS = tuple(m.value for m in Method)

# The app's prompt-lookup branch: up to this many copied tokens in every tree. On a CPU each verified node
# costs 0.7-1.6 ms, and on an AVX-512 EPYC (int8, 26 questions, one interleaved run) 4-6 tokens gave
# 1.33x vanilla, 10 gave 1.21x, 16 gave 1.12x (docs/experiments.md).
DEFAULT_LOOKUP = 5


@dataclass(frozen=True)
class TreeConfig:
    """Draft tree shape. EAGLE-2 defaults: 60 drafted tokens, depth 6, top-k 10.

    total_tokens counts drafted nodes; the verified tree has total_tokens + 1 nodes (the root is the
    last committed token). For `eagle1` only total_tokens and depth cut the static tree.
    lookup > 0 adds a prompt-lookup branch of up to that many tokens copied from the context
    (engine/lookup.py) on top of the head's tree; 0 is plain EAGLE.
    adaptive rests the head while its tree does not pay for its time (engine/gate.py): those cycles
    verify the lookup chain alone, or just the root. Greedy output is unchanged; sampled output keeps its
    distribution, but the same seed can give another reply (the tree depends on measured times).
    """

    total_tokens: int = 60
    depth: int = 6
    top_k: int = 10
    lookup: int = 0
    adaptive: bool = False

    def describe(self) -> str:
        return f"{self.total_tokens} tokens, depth {self.depth}, top-k {self.top_k}"

    def validate(self) -> None:
        if not 1 <= self.depth <= 32:
            raise ValueError(f"tree depth must be between 1 and 32, got {self.depth}")
        if not 1 <= self.top_k <= 64:
            raise ValueError(f"tree top_k must be between 1 and 64, got {self.top_k}")
        if not 1 <= self.total_tokens <= 512:
            raise ValueError(f"tree total_tokens must be between 1 and 512, got {self.total_tokens}")
        if not 0 <= self.lookup <= 64:
            raise ValueError(f"tree lookup must be between 0 (off) and 64 tokens, got {self.lookup}")


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax). top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")


@dataclass(frozen=True)
class GenerationConfig:
    method: Method | str = Method.EAGLE2  # a known name becomes a Method; `validate` refuses others
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.method in METHODS:
            object.__setattr__(self, "method", Method(self.method))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 1 <= self.max_new_tokens <= 1_000_000:
            raise ValueError(f"max_new_tokens must be between 1 and 1000000, got {self.max_new_tokens}")
        self.sampling.validate()
        self.tree.validate()

    def to_dict(self) -> dict:
        return asdict(self)
