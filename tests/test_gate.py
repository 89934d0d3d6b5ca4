"""The adaptive head (engine/gate.py): when it rests the head, when it probes again, and that decoding
with it stays lossless and keeps the head's cache in step."""

import pytest

from engine.config import GenerationConfig, TreeConfig
from engine.decode import Engine, common_prefix
from engine.gate import BURST, PROBE_MAX, PROBE_MIN, HeadGate
from tests.tiny import oracle_head, random_head, tiny_model, tiny_tokenizer


def run(gate: HeadGate, gains, head_ms=60.0, verify_ms=45.0, skip_ms=40.0, copied=0) -> str:
    """Drive the gate through cycles: `gains` gives the head's extra tokens for each head cycle, in turn.
    Returns the cycles as a string, H for a head cycle and s for a skipped one."""
    trace = []
    for gain in gains:
        while not gate.use_head():
            gate.skip_cycle(copied, skip_ms)
            trace.append("s")
        gate.head_cycle(copied + gain, copied, head_ms - verify_ms, verify_ms)
        trace.append("H")
    return "".join(trace)


def test_a_head_that_pays_always_runs():
    # 1.5 extra tokens per 60 ms cycle against 1 token per 40 ms: 2.5/60 > 1/40
    assert run(HeadGate(), [1.5] * 40) == "H" * 40


def test_a_head_that_does_not_pay_rests_with_growing_waits_between_probes():
    trace = run(HeadGate(), [0.2] * (BURST * 6))
    probe = "H" * BURST
    waits = [PROBE_MIN * 2**i for i in range(5)]
    assert trace.startswith(probe + "".join("s" * min(w, PROBE_MAX) + probe for w in waits))
    assert "s" * (PROBE_MAX + 1) not in trace  # the wait stops growing at PROBE_MAX


def test_a_probe_that_pays_brings_the_head_back_and_resets_the_wait():
    gate = HeadGate()
    trace = run(gate, [0.0] * BURST + [0.0] * BURST + [2.0] * 20)
    assert trace == "H" * BURST + "s" * PROBE_MIN + "H" * BURST + "s" * (2 * PROBE_MIN) + "H" * 20
    assert gate.backoff == PROBE_MIN and gate.wait == 0


def test_the_verdict_weighs_the_head_against_its_cost():
    # the same 0.5 extra tokens per cycle: worth it when a head cycle costs 1.2x a skipped one, not at 2x
    assert "s" not in run(HeadGate(), [0.5] * 20, head_ms=48.0, verify_ms=42.0, skip_ms=40.0)
    assert "s" in run(HeadGate(), [0.5] * 20, head_ms=80.0, verify_ms=50.0, skip_ms=40.0)
    # what the lookup chain copies anyway raises the bar: 1 extra token on 2 copied ones at 1.5x the cost
    assert "s" in run(HeadGate(), [1.0] * 20, head_ms=60.0, verify_ms=42.0, skip_ms=40.0, copied=2)
    assert "s" not in run(HeadGate(), [1.0] * 20, head_ms=60.0, verify_ms=42.0, skip_ms=40.0, copied=0)


def test_before_any_skipped_cycle_the_head_verify_time_stands_in_for_it():
    gate = HeadGate()
    for _ in range(BURST):  # 0.3 extra tokens; head 60 ms, its verify 50 ms: 1.3 * 50 >= 60, it pays
        gate.head_cycle(0.3, 0, 10.0, 50.0)
    assert gate.skip_ms is None and gate.wait == 0


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7, 8], [7, 8]) == 2


class TickStopwatch:
    """A stopwatch that ticks 10 ms per mark, so the gate's verdicts do not hang on this machine's load: a
    head cycle (marks around the cycle, the feed and the draft) costs 20 ms of drafting + 10 of verify,
    a rested one 10 + 10."""

    def __init__(self):
        self.ticks = 0

    def mark(self):
        self.ticks += 1
        return self.ticks

    def ms(self, start, end):
        return 10.0 * (end - start)


@pytest.mark.parametrize("method", ["eagle2", "eagle1"])
@pytest.mark.parametrize("lookup", [0, 6])
def test_greedy_with_a_resting_head_matches_vanilla(method, lookup, monkeypatch):
    """A random head does not pay: the gate rests it, and the replies are still vanilla's, token for token."""
    model = tiny_model("llama", layers=2, seed=3)
    engine = Engine(model, tiny_tokenizer(), random_head(model, 3))
    engine.stopwatch = TickStopwatch()
    real_draft = Engine._draft

    def head_in_step(self, state, config, drafter, plan):  # rested cycles leave pairs pending, never lose them
        assert drafter is None or drafter.cache.length + state.pairs[0].shape[0] == state.past_len
        return real_draft(self, state, config, drafter, plan)

    monkeypatch.setattr(Engine, "_draft", head_in_step)
    rested = 0
    for prompt in ("the cat sat on the mat and the cat sat on the", "abc abc abc abc", "hello there"):
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=64)))[-1]["output_ids"]
        cfg = GenerationConfig(method=method, max_new_tokens=64, tree=TreeConfig(8, 3, 2, lookup=lookup, adaptive=True))
        events = list(engine.generate(ids, cfg))
        assert events[-1]["output_ids"] == want, prompt
        cycles = [e for e in events if e["type"] == "cycle" and e["cycle"] > 0]
        totals = events[-1]["totals"]
        assert totals["head_cycles"] == sum(e["head"] for e in cycles)
        rested += totals["cycles"] - totals["head_cycles"]
        for e in cycles:
            if not e["head"] and e["tree"]["lookup_from"] is None:  # nothing to copy: a plain decoding step
                assert e["tree"]["tokens"] == e["tree"]["tokens"][:1]
    assert rested > 0, "the gate never rested a random head: the test checks nothing"


def test_a_perfect_head_is_never_rested():
    model = tiny_model("llama", layers=1, seed=4)
    engine = Engine(model, tiny_tokenizer(), oracle_head(model))
    engine.stopwatch = TickStopwatch()
    ids = engine.chat_ids([{"role": "user", "content": "hello there"}])
    cfg = GenerationConfig(method="eagle2", max_new_tokens=64, tree=TreeConfig(4, 4, 1, adaptive=True))
    totals = list(engine.generate(ids, cfg))[-1]["totals"]
    # every cycle accepts the whole depth-4 chain: 4 extra tokens a 30 ms cycle against 1 token in 20 ms
    assert totals["tau"] == pytest.approx(5.0, abs=0.3)
    assert totals["head_cycles"] == totals["cycles"]


def test_copy_stretches_are_not_the_gates_to_judge(monkeypatch):
    """Cycles inside a copy stretch neither count down a rest nor feed the gate's means."""
    model = tiny_model("llama", layers=1, seed=4)
    engine = Engine(model, tiny_tokenizer(), oracle_head(model))
    engine.stopwatch = TickStopwatch()
    seen = []  # (the head drafted, gate state before, gate state after)
    real_cycle = Engine._cycle

    def always_copying(self, state, *args):
        gate = state.gate
        snapshot = lambda: (gate.wait, gate.backoff, gate.copied, gate.head_ms, gate.skip_ms, list(gate.gains))
        state.copying = True  # every cycle with something to copy is a copy cycle
        before = snapshot()
        event = real_cycle(self, state, *args)
        seen.append((event.head, before, snapshot()))
        return event

    monkeypatch.setattr(Engine, "_cycle", always_copying)
    ids = engine.chat_ids([{"role": "user", "content": "abc abc abc abc abc abc abc abc"}])
    cfg = GenerationConfig(method="eagle2", max_new_tokens=64, tree=TreeConfig(4, 4, 1, lookup=4, adaptive=True))
    list(engine.generate(ids, cfg))
    copies = [(before, after) for head, before, after in seen if not head]  # the oracle head is never rested
    assert copies and len(copies) < len(seen), "need both copy and head cycles, or the test checks nothing"
    assert all(before == after for before, after in copies)
    assert any(before != after for head, before, after in seen if head)  # head cycles do move the gate
