"""What the app can be set to: `AppOptions`, fixed at launch, and `ChatSettings`, one request's sidebar.

`ChatSettings` holds the generation settings as the sidebar's components give them (sliders send floats,
the seed box may be empty); `ChatSettings.config(method)` is the one place they become a validated
`GenerationConfig`, and its ValueError says which setting is wrong. `sidebar_ranges(options)` is the one
table of the sidebar's number fields (label, minimum, maximum): the UI builds its sliders from it and
checks every value against it, so an out-of-range number is refused by name, never clamped in silence.
Pure: no Gradio, no torch.
"""

import random
from dataclasses import dataclass, fields, replace

from app.stats import method_label
from engine.config import METHODS, GenerationConfig, SamplingConfig, TreeConfig

AUTO = "auto"  # the method measured fastest here, per temperature (AppOptions.method_for)


@dataclass(frozen=True)
class AppOptions:
    """What the UI needs besides the engine; launch.py fills it from the command line."""

    title: str = "EAGLE-2 speculative decoding chat"
    examples: tuple[str, ...] = ()
    system_prompt: str = "You are a helpful assistant."
    max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    poll_s: float = 0.08  # how often streaming updates reach the browser
    tree: TreeConfig = TreeConfig()  # default tree settings (auto-tuned by launch.py)
    tree_note: str = "EAGLE-2 paper defaults"  # where the default tree came from, shown in the sidebar
    sampling_tree: TreeConfig | None = None  # the tree for temperature > 0 (None: the same as `tree`)
    sampling_tree_note: str = ""
    default_method: str | None = None  # the method selected on load (None: EAGLE-2 when a head is loaded)
    # What "auto" runs at temperature > 0 when this machine's measurement says it differs from
    # default_method there (None: no "auto" choice, default_method at every temperature), and why.
    sampling_method: str | None = None
    sampling_method_note: str = ""
    backend_note: str = ""  # why this backend runs the target (launch.py's measurement), shown in the sidebar

    def check_reply_length(self, value, name: str) -> int:
        """`value` as a reply length the app serves, or ValueError naming `name`, the range and the value."""
        value = _whole(name, value)
        if not 1 <= value <= self.max_new_tokens_limit:
            raise ValueError(f"{name} must be between 1 and {self.max_new_tokens_limit}, got {value}")
        return value

    def method_for(self, method: str, temperature) -> str:
        """The method a request runs: "auto" is default_method when greedy and sampling_method when sampling."""
        if method != AUTO:
            return method
        sampled = samples(temperature) and self.sampling_method is not None
        return self.sampling_method if sampled else self.default_method or "eagle2"

    def auto_label(self) -> str:
        greedy, sampled = method_label(self.default_method or "eagle2"), method_label(self.sampling_method or "")
        return f"Auto: {greedy.split(' (')[0]} at temperature 0, {sampled.split(' (')[0]} above (measured here)"

    def tree_for(self, temperature) -> TreeConfig:
        """The default tree for a temperature: the sampling tree when sampling and one was given."""
        return self.sampling_tree if self.sampling_tree is not None and samples(temperature) else self.tree


@dataclass(frozen=True)
class Field:
    """One number field of the sidebar: its label and the range it accepts."""

    label: str
    low: float
    high: float

    def check(self, value) -> float:
        """`value` as a number in range, or ValueError naming the field, the range and the value."""
        number = _real(self.label, value)
        if not self.low <= number <= self.high:
            raise ValueError(f"{self.label} must be between {self.low:g} and {self.high:g}, got {number:g}")
        return number


@dataclass(frozen=True)
class ChatSettings:
    """One request's generation settings, in the sidebar's order, as its components hold them."""

    max_new_tokens: float = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: float = 0
    total_tokens: float = 60
    depth: float = 6
    tree_top_k: float = 10
    seed: float | str | None = None  # None, "" or negative: a random seed
    lookup: float = 0
    adaptive: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in the order the UI passes the settings components' values."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def with_tree(cls, tree: TreeConfig, **values) -> "ChatSettings":
        """Settings that draft with `tree` (its shape, lookup branch and adaptive head); the rest from values."""
        shape = dict(total_tokens=tree.total_tokens, depth=tree.depth, tree_top_k=tree.top_k)
        return cls(**shape, lookup=tree.lookup, adaptive=tree.adaptive, **values)

    def config(self, method: str) -> GenerationConfig:
        """A validated GenerationConfig for `method`; ValueError says what is wrong."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        seed = self._seed()
        config = GenerationConfig(
            method=method,
            max_new_tokens=_whole("max new tokens", self.max_new_tokens),
            sampling=SamplingConfig(
                temperature=_real("temperature", self.temperature),
                top_p=_real("top-p", self.top_p),
                top_k=_whole("top-k", self.top_k),
            ),
            tree=TreeConfig(
                total_tokens=_whole("tree total tokens", self.total_tokens),
                depth=_whole("tree depth", self.depth),
                top_k=_whole("tree top-k", self.tree_top_k),
                lookup=_whole("prompt-lookup tokens", self.lookup),
                adaptive=bool(self.adaptive),
            ),
            seed=None if seed is None or seed < 0 else seed,
        )
        config.validate()
        return config

    def check(self, ranges: dict[str, Field]) -> "ChatSettings":
        """These settings, or ValueError naming the first field outside its range in `ranges`."""
        for name, field in ranges.items():
            field.check(getattr(self, name))
        return self

    def with_fixed_seed(self) -> "ChatSettings":
        """The same settings with a concrete seed: the one set, or a random one when none is."""
        seed = self._seed()
        return self if seed is not None and seed >= 0 else replace(self, seed=random.randrange(2**31))

    def _seed(self) -> int | None:
        return None if self.seed is None or self.seed == "" else _whole("seed", self.seed)


def slider_max(trees: list[TreeConfig], field: str, usual: int) -> int:
    """A tree slider's maximum: `usual`, or more when a default tree needs it (so switching trees fits)."""
    return max([usual] + [getattr(t, field) for t in trees])


def sidebar_ranges(options: AppOptions) -> dict[str, Field]:
    """The sidebar's number fields by ChatSettings name (the seed is free: -1 or any whole number)."""
    trees = [options.tree] + ([options.sampling_tree] if options.sampling_tree is not None else [])
    return {
        "max_new_tokens": Field("Max new tokens", 1, options.max_new_tokens_limit),
        "temperature": Field("Temperature", 0.0, 2.0),
        "top_p": Field("Top-p", 0.05, 1.0),
        "top_k": Field("Top-k", 0, 200),
        "total_tokens": Field("Total drafted tokens", 1, slider_max(trees, "total_tokens", 128)),
        "depth": Field("Depth", 1, slider_max(trees, "depth", 12)),
        "tree_top_k": Field("Top-k per expansion", 1, slider_max(trees, "top_k", 20)),
        "lookup": Field("Prompt-lookup branch (tokens)", 0, 32),
    }


def make_config(
    method: str,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    total_tokens,
    depth,
    tree_top_k,
    seed=None,
    lookup=0,
    adaptive=False,
) -> GenerationConfig:
    """`ChatSettings(...).config(method)` in one call, for scripts and tests that spell settings out."""
    values = (max_new_tokens, temperature, top_p, top_k, total_tokens, depth, tree_top_k, seed, lookup, adaptive)
    return ChatSettings(*values).config(method)


def available_methods(engine, options: AppOptions | None = None) -> list[str]:
    """The methods this engine can run, the preferred first (vanilla alone when no head is loaded);
    "auto" first when the options choose another method for sampling than for greedy decoding."""
    if engine.head is None:
        return ["vanilla"]
    auto = options is not None and options.sampling_method not in (None, options.default_method)
    return [AUTO] * auto + ["eagle2", "eagle1", "vanilla"]


def opening_method(options: AppOptions, methods: list[str]) -> str:
    """The method a page opens with (and an API request without one runs): "auto" where it is offered,
    else the options' default method when available, else the first."""
    if methods[0] == AUTO or options.default_method not in methods:
        return methods[0]
    return options.default_method


def samples(temperature) -> bool:
    """Whether a temperature setting means sampling (above 0) rather than greedy decoding."""
    return float(temperature) > 0


def tree_for_temperature(
    temperature, total, depth, top_k, greedy: TreeConfig, sampling: TreeConfig | None
) -> tuple[int, int, int]:
    """The tree sliders (total, depth, top-k) after a temperature change: the sampling tree when sampling
    starts, the greedy tree when it stops, but only while the sliders still hold the other default:
    a tree the user set stays."""
    current = (int(total), int(depth), int(top_k))
    if sampling is None:
        return current
    greedy_values = (greedy.total_tokens, greedy.depth, greedy.top_k)
    sampling_values = (sampling.total_tokens, sampling.depth, sampling.top_k)
    if samples(temperature) and current == greedy_values:
        return sampling_values
    if not samples(temperature) and current == sampling_values:
        return greedy_values
    return current


def _whole(name: str, value) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(number)


def _real(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
