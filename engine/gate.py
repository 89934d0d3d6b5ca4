"""The adaptive head: skip the draft head while its tree does not pay for its cost.

A head cycle costs the head's drafting plus a wider verify; it pays when the tokens its nodes add beyond
what the prompt-lookup chain alone would give are worth that time. On text the head cannot predict
(translation of a language it was not trained on, say) it does not pay, and a cycle that verifies only
the root and the lookup chain (a plain decoding step when there is no chain) is faster.

`HeadGate` judges this from the request's own cycles:
  - `gains`, the last WINDOW head cycles' tokens accepted beyond the lookup chain's own match (the
    verified tree reveals it: the chain's nodes are part of it);
  - `copied`, the lookup chain's tokens accepted per cycle, from both kinds of cycle;
  - running means of a head cycle's time, and of a lookup-only cycle's time. A head cycle's time leaves
    out the head's feed of the pending pairs: after a rest that feed is mostly the rest's catch-up, and
    charging it to the head would make every probe look dear. (A head that runs every cycle pays a
    small feed each time, about 1.5 ms of a 60 ms cycle on the project's CPU, so this leans to the head.)
Copy stretches (engine/decode.py) are neither: the gate is not asked then, and does not count them.
With gain the mean of `gains` (at least BURST of them), the head runs while
(1 + copied + gain) / head_ms >= (1 + copied) / skip_ms. Until a lookup-only cycle has been timed, skip_ms
is taken as a head cycle's verify time, which overstates it: the gate leans to the head.
When the head does not pay, the next `wait` cycles skip it, then a probe of BURST head cycles measures it
afresh (the old gains are dropped: the text has moved on) and the rule is applied to those. The wait
doubles after every probe that still does not pay (PROBE_MIN up to PROBE_MAX) and resets when one does.

Greedy output never changes: verification is the same, only the tree is smaller. Sampled output keeps the
target's distribution, but a seed no longer fixes the reply: the tree, and so which node each random draw
goes to, now depends on measured times. The head's cache
stays in step: skipped cycles leave their (token, feature) pairs pending, and the next head cycle feeds
them all (engine/decode.py).
"""

from collections import deque
from dataclasses import dataclass, field

ALPHA = 0.25  # weight of the newest cycle in the running means
WINDOW = 8  # the gain is judged on at most this many latest head cycles
BURST = 4  # and on at least this many: a probe runs the head this many cycles
PROBE_MIN, PROBE_MAX = 4, 32  # lookup-only cycles before a probe


def _mean(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


@dataclass
class HeadGate:
    gains: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # tokens beyond the chain's match
    copied: float | None = None  # tokens per cycle the lookup chain alone gets accepted
    head_ms: float | None = None  # a head cycle: draft + verify
    verify_ms: float | None = None  # a head cycle's verify alone (skip_ms's stand-in until one is timed)
    skip_ms: float | None = None  # a lookup-only cycle
    wait: int = 0  # lookup-only cycles left before the next probe
    backoff: int = PROBE_MIN

    def use_head(self) -> bool:
        """Whether this cycle runs the head; counts down the wait when it does not."""
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def pays(self) -> bool:
        if len(self.gains) < BURST:
            return True
        gain, copied = sum(self.gains) / len(self.gains), self.copied or 0.0
        skip_ms = self.skip_ms if self.skip_ms is not None else self.verify_ms
        return (1 + copied + gain) * skip_ms >= (1 + copied) * self.head_ms

    def head_cycle(self, accepted: int, copied: int, draft_ms: float, verify_ms: float) -> None:
        """After a cycle that ran the head: `accepted` drafted tokens, of which the lookup chain alone
        would have given `copied`."""
        self.gains.append(accepted - copied)
        self.copied = _mean(self.copied, copied)
        self.head_ms = _mean(self.head_ms, draft_ms + verify_ms)
        self.verify_ms = _mean(self.verify_ms, verify_ms)
        if self.pays():
            if len(self.gains) >= BURST:
                self.backoff = PROBE_MIN
        else:
            self.wait, self.backoff = self.backoff, min(2 * self.backoff, PROBE_MAX)
            self.gains.clear()

    def skip_cycle(self, copied: int, ms: float) -> None:
        """After a lookup-only cycle that accepted `copied` drafted tokens."""
        self.copied = _mean(self.copied, copied)
        self.skip_ms = _mean(self.skip_ms, ms)
