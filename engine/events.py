"""The events the engine streams, one per decoding cycle, as plain JSON-serializable dicts.

`Engine.generate` yields, in order:
  1. one `start` event,
  2. one `cycle` event per verify step (vanilla: one per token),
  3. one `end` event (always last, also after cancellation or an error in a stop condition).

Each event is built from a dataclass below and yielded as `dataclasses.asdict(event)`, so the UI,
the benchmark and trace files all see the same dicts. `save_trace` / `load_trace` write and read
them as JSON lines; replaying a trace is iterating over `load_trace(path)`.

Invariants of a `cycle` event:
  - `tree` is None for `vanilla`; otherwise node 0 is the root (the last committed token, already
    part of the output), `parents[0] == -1`, every other parent index is smaller than the node index
    (topological order), `depths[i] == depths[parents[i]] + 1`.
  - `accepted` lists node indices of the accepted path, root first; `accepted[1:]` are the drafted
    nodes the target agreed with, in order.
  - `new_token_ids == [tree.tokens[i] for i in accepted[1:]] + [bonus_token]`, except that it is cut
    short when a stop condition (EOS, max_new_tokens, stop string, context length) fires inside the
    cycle; then `end` follows.
  - `text` is the text delta of `new_token_ids` (after stop-string trimming).
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class FinishReason(StrEnum):
    """Why a reply ended (the end event's `finish_reason`); a str, so it serialises as its value."""

    EOS = "eos"  # the model ended its reply
    MAX_NEW_TOKENS = "max_new_tokens"
    STOP_STRING = "stop_string"
    CONTEXT_LENGTH = "context_length"
    CANCELLED = "cancelled"


FINISH_REASONS = tuple(r.value for r in FinishReason)


@dataclass
class Totals:
    new_tokens: int = 0
    cycles: int = 0
    tau: float = 0.0  # mean tokens committed per cycle (accepted drafts + bonus token)
    elapsed_s: float = 0.0  # wall time since generation started (prefill included)
    tokens_per_s: float = 0.0
    draft_ms: float = 0.0  # summed over cycles
    verify_ms: float = 0.0  # summed over cycles (target forward + acceptance)
    prefill_ms: float = 0.0
    cached_tokens: int = 0  # leading prompt tokens whose K/V the last request left in the cache (not prefilled)
    head_cycles: int = 0  # cycles in which the draft head drafted (the rest verified a copied chain or the root)


@dataclass
class TreeView:
    tokens: list[int]
    parents: list[int]
    depths: list[int]
    scores: list[float]  # cumulative draft log-probability of the path to the node (root 0.0)
    lookup_from: int | None = None  # nodes from this index on were copied by prompt lookup, not drafted


@dataclass
class StartEvent:
    method: str
    prompt_tokens: int
    config: dict
    type: str = "start"


@dataclass
class CycleEvent:
    cycle: int  # 1-based
    new_token_ids: list[int]
    text: str
    tree: TreeView | None
    accepted: list[int]
    bonus_token: int
    draft_ms: float
    verify_ms: float
    head: bool = False  # the draft head drafted this tree (False for vanilla, copy stretches, a resting head)
    totals: Totals = field(default_factory=Totals)
    type: str = "cycle"


@dataclass
class EndEvent:
    finish_reason: str  # one of FINISH_REASONS
    message: str  # human-readable, e.g. "stopped at the model's context length (8192 tokens)"
    text: str  # the whole reply
    output_ids: list[int]
    totals: Totals = field(default_factory=Totals)
    type: str = "end"


def save_trace(events: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for event in events:
            f.write(json.dumps(event) + "\n")


def load_trace(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
