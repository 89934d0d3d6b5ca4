"""The chat and compare glue driven by the real engine on a tiny random model (tests/tiny.py): streamed
snapshots add up to the reply, every cycle's tree renders, trimming leaves a notice, Stop stops, and the
compare runs agree with each other. CPU, no downloads, a few seconds."""

import threading
import xml.etree.ElementTree as ET

import pytest

from app.chat import build_messages, stream_reply
from app.compare import measure, summary
from app.reply import render_tinted
from app.settings import make_config
from app.tree_svg import render_cycle
from app.ui import AppOptions, build_ui
from tests.tiny import tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()  # max context 512 tokens, character tokenizer


def greedy(method="eagle2", max_new=24):
    return make_config(method, max_new, 0.0, 1.0, 0, 20, 4, 4)


def reply(engine, messages, config, cancel=None):
    views = [v.__dict__.copy() for v in stream_reply(engine, messages, config, cancel or threading.Event(), 0.0)]
    return views


def test_streamed_reply_matches_vanilla_and_every_tree_renders(engine):
    messages = build_messages("Be brief.", [], "Say something <nice>!")
    views = reply(engine, messages, greedy("eagle2"))
    final = views[-1]
    assert final["finished"] and final["finish_reason"] in ("eos", "max_new_tokens")
    vanilla = reply(engine, messages, greedy("vanilla"))[-1]
    assert final["text"] == vanilla["text"]  # greedy EAGLE-2 is lossless
    assert "".join(p.text for p in final["pieces"]) == final["text"]
    assert any(p.kind == "draft" for p in final["pieces"])  # the oracle head's drafts get accepted
    assert [c["cycle"] for c in final["cycles"]] == list(range(len(final["cycles"])))
    for event in final["cycles"]:
        panel = render_cycle(event, engine.token_texts)
        if event["tree"] is not None:
            svg = ET.fromstring(panel[panel.index("<svg") : panel.index("</svg>") + 6])
            accepted = [g for g in svg.iter("{http://www.w3.org/2000/svg}g") if "accepted" in g.get("class", "")]
            assert len(accepted) == len(event["accepted"])
    assert 'class="tinted"' in render_tinted(final["pieces"])


def test_snapshots_grow_monotonically(engine):
    texts = [v["text"] for v in reply(engine, build_messages("", [], "abc"), greedy("eagle1"))]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_long_conversation_is_trimmed_with_a_notice(engine):
    history = []
    for i in range(12):  # ~60 characters (= tokens) per message: well past 512 with the reply budget
        history += [{"role": "user", "content": f"question {i} " + "q" * 50},
                    {"role": "assistant", "content": f"answer {i} " + "a" * 50}]
    views = reply(engine, build_messages("sys", history, "last one"), greedy(max_new=8))
    notice = views[-1]["notice"]
    assert "oldest" in notice and "512-token context" in notice
    assert views[-1]["finished"]


def test_a_message_that_cannot_fit_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="too long"):
        reply(engine, build_messages("", [], "x" * 600), greedy())


def test_stop_ends_the_reply_within_a_cycle(engine):
    cancel = threading.Event()
    views = []
    for view in stream_reply(engine, build_messages("", [], "tell me a story"), greedy(max_new=400), cancel, 0.0):
        views.append(view.finish_reason)
        cancel.set()
    assert views[-1] == "cancelled"
    assert len(view.cycles) <= 3  # the cycle running when Stop was pressed, at most one more


def test_stop_before_start_never_runs_the_model(engine):
    cancel = threading.Event()
    cancel.set()
    views = reply(engine, build_messages("", [], "hi"), greedy(), cancel)
    assert len(views) == 1 and views[0]["finish_reason"] == "cancelled" and views[0]["cycles"] == []


def test_compare_measures_both_runs_alone_and_they_agree(engine):
    prompt = engine.chat_ids(build_messages("", [], "compare me"))
    phases, last = [], None
    for run_a, run_b, phase in measure(engine, prompt, (greedy("vanilla"), greedy("eagle2")), threading.Event(), 0.0):
        phases.append(phase)
        last = (run_a, run_b)
    assert phases[0] == "warm-up" and phases[-1] == "measured" and "running" in phases
    run_a, run_b = last
    assert run_a.end and run_b.end
    assert run_a.end["output_ids"] == run_b.end["output_ids"]
    assert run_b.totals["tau"] > 1.0  # drafts accepted
    assert "identical: **yes**" in summary(run_a, run_b, greedy=True)


def test_ui_builds_with_and_without_a_draft_head(engine):
    demo = build_ui(engine, AppOptions(examples=("hello",)))
    names = [fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"]
    assert names == ["chat"]
    build_ui(tiny_engine(head="none"))
