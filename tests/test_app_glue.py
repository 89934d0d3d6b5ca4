"""The glue between engine events and the UI, on hand-written events: tree drawing, token tinting,
stats and notices, settings validation, compare bookkeeping and the event pump. No model needed."""

import copy
import math
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from app.chat import (
    ChatSession,
    Turn,
    as_text,
    chatbot_messages,
    check_message,
    trim_notice,
)
from app.compare import Run, replay_times, summary
from app.labels import shorten, visible
from app.pump import pump
from app.reply import Piece, drafted_count, pieces_from_cycle, render_tinted
from app.settings import make_config, tree_for_temperature
from app.stats import speedup_line, stats_line
from app.tree_svg import COPIED, layout_rows, render_cycle, render_tree
from engine.config import TreeConfig

SVG = "{http://www.w3.org/2000/svg}"
TEXTS = {10: "A", 11: "<", 12: "\n", 13: " ", 14: "&", 15: "x", 20: "end", 0: "<|im_end|>"}


def token_texts(ids):
    return [TEXTS[i] for i in ids]


def cycle_event(new_token_ids=(11, 13, 20), cycle=3):
    """Root 10; drafted 11 '<' and 12 '\\n' under it, 13 ' ' and 14 '&' under 11, 15 under 12.
    The target accepts 11 then 13 and adds the bonus token 20."""
    return {
        "type": "cycle",
        "cycle": cycle,
        "new_token_ids": list(new_token_ids),
        "text": "".join(TEXTS[i] for i in new_token_ids),
        "tree": {
            "tokens": [10, 11, 12, 13, 14, 15],
            "parents": [-1, 0, 0, 1, 1, 2],
            "depths": [0, 1, 1, 2, 2, 2],
            "scores": [0.0, -0.1, -2.3, -0.3, -1.5, -4.0],
        },
        "accepted": [0, 1, 3],
        "bonus_token": 20,
        "draft_ms": 12.5,
        "verify_ms": 40.25,
        "totals": {"new_tokens": 7, "cycles": 3, "tau": 2.0, "elapsed_s": 0.5, "tokens_per_s": 14.0,
                   "draft_ms": 30.0, "verify_ms": 90.0, "prefill_ms": 20.0},
    }


def svg_of(panel_html: str) -> ET.Element:
    start = panel_html.index("<svg")
    end = panel_html.index("</svg>") + len("</svg>")
    return ET.fromstring(panel_html[start:end])  # fails on any unescaped '<' or '&'


def nodes_by_class(svg: ET.Element) -> dict[int, set[str]]:
    return {
        int(g.get("data-node")): set(g.get("class").split())
        for g in svg.iter(f"{SVG}g")
        if "node" in (g.get("class") or "").split()
    }


def node_label(svg: ET.Element, i: int) -> str:
    for g in svg.iter(f"{SVG}g"):
        if g.get("data-node") == str(i):
            return g.find(f"{SVG}text").text
    raise KeyError(i)


# ---- labels ---------------------------------------------------------------------------------------


def test_visible_makes_blank_and_control_characters_visible():
    assert visible(" a\n\tb\r") == "␣a↵⇥b␍"
    assert visible("") == "∅"
    assert visible("\x00\u200b") == "\\x00\\u200b"
    assert visible("<&>") == "<&>"  # escaping for HTML is the caller's job
    assert shorten("abcdefghijkl", 5) == "abcd…"
    assert shorten("abc", 5) == "abc"


# ---- tree SVG -------------------------------------------------------------------------------------


def test_tree_svg_is_well_formed_and_escapes_token_text():
    panel = render_cycle(cycle_event(), token_texts)
    svg = svg_of(panel)
    assert node_label(svg, 1) == "<"  # parsed back from &lt;
    assert node_label(svg, 2) == "↵"
    assert node_label(svg, 3) == "␣"
    assert node_label(svg, 4) == "&"
    assert "&lt;" in panel and "&amp;" in panel
    assert "<\n" not in panel


def test_tree_highlights_accepted_path_fades_rejected_and_marks_bonus():
    svg = svg_of(render_cycle(cycle_event(), token_texts))
    classes = nodes_by_class(svg)
    assert set(classes) == {0, 1, 2, 3, 4, 5, 6}  # six tree nodes + the bonus node
    assert {i for i, c in classes.items() if "accepted" in c} == {0, 1, 3}
    assert {i for i, c in classes.items() if "rejected" in c} == {2, 4, 5}
    assert {i for i, c in classes.items() if "bonus" in c} == {6}
    assert node_label(svg, 6) == "★end"
    groups = {g.get("data-node"): g for g in svg.iter(f"{SVG}g") if g.get("data-node")}
    assert all(groups[str(i)].get("opacity") for i in (2, 4, 5))
    assert not any(groups[str(i)].get("opacity") for i in (0, 1, 3, 6))
    edges = [p.get("class") for p in svg.iter(f"{SVG}path")]
    assert edges.count("edge accepted") == 2 and edges.count("edge bonus") == 1
    assert edges.count("edge rejected") == 3


def test_tree_shade_follows_draft_confidence():
    svg = svg_of(render_cycle(cycle_event(), token_texts))

    def darkness(i):
        for g in svg.iter(f"{SVG}g"):
            if g.get("data-node") == str(i):
                fill = g.find(f"{SVG}rect").get("fill")
                return -sum(int(fill[k : k + 2], 16) for k in (1, 3, 5))
        raise KeyError(i)

    # scores: node1 -0.1 > node3 -0.3 > node4 -1.5 > node2 -2.3 > node5 -4.0
    assert darkness(1) > darkness(3) > darkness(4) > darkness(2) > darkness(5)


def test_tree_without_bonus_when_a_stop_cut_the_cycle():
    event = cycle_event(new_token_ids=(11, 13))  # EOS / max tokens fired before the bonus token
    panel = render_cycle(event, token_texts)
    classes = nodes_by_class(svg_of(panel))
    assert not any("bonus" in c for c in classes.values())
    assert "no bonus token" in panel


def test_tree_caption_counts_and_timings():
    panel = render_cycle(cycle_event(), token_texts)
    assert "Cycle 3: 5 drafted tokens, depth 2, 2 accepted + bonus token" in panel
    assert "draft 12.5 ms" in panel and "verify 40.2 ms" in panel


def test_copied_nodes_are_teal_and_counted():
    event = cycle_event()
    event["tree"]["lookup_from"] = 4  # nodes 4 and 5 came from prompt lookup
    panel = render_cycle(event, token_texts)
    svg = svg_of(panel)
    fills = {
        int(g.get("data-node")): g.find(f"{SVG}rect").get("fill") for g in svg.iter(f"{SVG}g") if g.get("data-node")
    }
    assert fills[4] == fills[5] == COPIED and COPIED not in (fills[1], fills[2], fills[3])
    assert "5 drafted tokens (2 copied by prompt lookup)" in panel
    assert "copied from the context" in panel and "copied" not in render_cycle(cycle_event(), token_texts)


def test_a_cycle_without_the_head_says_so():
    assert "sat this cycle out" not in render_cycle(cycle_event(), token_texts)
    event = cycle_event()
    event["head"] = False  # a copy stretch, or the adaptive head resting
    event["tree"]["lookup_from"] = 1
    assert "the draft head sat this cycle out: the copied branch alone was verified" in render_cycle(event, token_texts)
    root = {"type": "cycle", "cycle": 9, "new_token_ids": [11], "text": "<", "accepted": [0], "bonus_token": 11,
            "tree": {"tokens": [10], "parents": [-1], "depths": [0], "scores": [0.0], "lookup_from": None},
            "draft_ms": 0.1, "verify_ms": 30.0, "head": False, "totals": {}}
    rendered = render_cycle(root, token_texts)
    assert "0 drafted tokens" in rendered and "a plain decoding step" in rendered


def test_vanilla_cycle_has_no_tree():
    event = {"type": "cycle", "cycle": 4, "new_token_ids": [11], "text": "<", "tree": None, "accepted": [],
             "bonus_token": 11, "draft_ms": 0.0, "verify_ms": 3.0, "totals": {}}
    panel = render_cycle(event, token_texts)
    assert "<svg" not in panel and "vanilla" in panel and "&lt;" in panel


def test_labels_must_match_tree():
    with pytest.raises(ValueError, match="labels"):
        render_tree(cycle_event(), ["a"], None)


def test_sixty_node_tree_layout_never_crosses_edges_and_keeps_rows_apart():
    import random

    rng = random.Random(0)
    for _ in range(20):
        parents, depths, scores = [-1], [0], [0.0]
        for i in range(1, 61):
            p = rng.randrange(i) if rng.random() < 0.5 else rng.randrange(max(0, i - 8), i)
            if depths[p] >= 6:
                p = 0
            parents.append(p)
            depths.append(depths[p] + 1)
            scores.append(scores[p] + math.log(rng.uniform(0.05, 1.0)))
        rows = layout_rows(parents, depths, scores)
        for d in range(1, max(depths) + 1):
            col = sorted((rows[i], i) for i in range(61) if depths[i] == d)
            assert all(b[0] - a[0] >= 1 - 1e-9 for a, b in zip(col, col[1:]))
            for (_, a), (_, b) in zip(col, col[1:]):  # order of children follows order of parents
                assert rows[parents[a]] <= rows[parents[b]]
        event = {"cycle": 1, "tree": {"tokens": [15] * 61, "parents": parents, "depths": depths, "scores": scores},
                 "accepted": [0], "new_token_ids": [20], "bonus_token": 20}
        svg = svg_of(render_cycle(event, token_texts))
        assert len(nodes_by_class(svg)) == 62
        assert float(svg.get("width")) < 1000  # readable without shrinking: depth 6 fits one screen


# ---- tinted reply ---------------------------------------------------------------------------------


def test_pieces_split_accepted_drafts_from_the_target_token():
    pieces = pieces_from_cycle(cycle_event(), token_texts)
    assert [(p.text, p.kind) for p in pieces] == [("<", "draft"), (" ", "draft"), ("end", "target")]
    assert drafted_count(cycle_event()) == 2


def test_pieces_skip_end_of_turn_token_and_fall_back_when_texts_do_not_add_up():
    event = cycle_event(new_token_ids=(11, 0))
    event["text"] = "<"  # the reply text leaves out <|im_end|>
    assert [(p.text, p.kind) for p in pieces_from_cycle(event, token_texts)] == [("<", "draft")]
    event = cycle_event()
    event["text"] = "é"  # e.g. a character completed across tokens: no honest per-token split
    assert [(p.text, p.kind) for p in pieces_from_cycle(event, token_texts)] == [("é", "mixed")]
    vanilla = {"cycle": 2, "new_token_ids": [15], "text": "x", "tree": None, "accepted": []}
    assert [p.kind for p in pieces_from_cycle(vanilla, token_texts)] == ["target"]


def test_render_tinted_escapes_and_marks_cycles():
    out = render_tinted([Piece("<b>", "draft", 1), Piece("a\nb", "target", 2)])
    assert "<b>" not in out and "&lt;b&gt;" in out
    assert "a<br>b" in out and "\n" not in out
    assert 'class="tok tok-draft cyc-odd"' in out and 'class="tok tok-target cyc-even"' in out


def test_chat_text_is_escaped_outside_code_only():
    assert as_text("a <b>x</b> & y") == "a &lt;b>x&lt;/b> &amp; y"
    assert as_text("use `<div>` here") == "use `<div>` here"
    assert as_text("```\n<p>&\n```\n<i>") == "```\n<p>&\n```\n&lt;i>"


def test_chatbot_messages_tint_toggle():
    turn = Turn("hi <there>", "< end", pieces_from_cycle(cycle_event(), token_texts), "stopped by the user")
    plain = chatbot_messages([turn], tint=False)
    assert plain[0] == {"role": "user", "content": "hi &lt;there>"}
    assert plain[1]["content"].startswith("&lt; end") and "stopped by the user" in plain[1]["content"]
    tinted = chatbot_messages([turn], tint=True)
    assert 'class="tinted"' in tinted[1]["content"] and "tok-draft" in tinted[1]["content"]
    pending = chatbot_messages([turn], tint=False, pending="next?")
    assert pending[-1] == {"role": "user", "content": "next?"}


# ---- stats, notices, settings ----------------------------------------------------------------------


def test_stats_line_formats_engine_totals():
    line = stats_line(cycle_event()["totals"], "eagle2")
    assert line == (
        "EAGLE-2 (dynamic tree): 14.0 tokens/s · τ 2.00 · 3 cycles · draft 10.0 ms/cycle · "
        "verify 30.0 ms/cycle · 7 tokens in 0.50 s"
    )
    assert "0 cycles" in stats_line({"new_tokens": 1, "cycles": 0})
    assert "1 cycle ·" in stats_line({"cycles": 1})
    assert "cached" not in stats_line({"cycles": 1}) and "40 prompt tokens cached" in stats_line({"cached_tokens": 40})


def test_speedup_line():
    assert speedup_line(10.0, 25.0, "Vanilla", "EAGLE-2").endswith("2.50× speed-up")
    slower = speedup_line(25.0, 10.5, "Vanilla", "EAGLE-2")
    assert slower.endswith("0.42× (slower)") and "speed-up" not in slower
    assert "produced no tokens" in speedup_line(0.0, 5.0, "Vanilla", "EAGLE-2")


def test_trim_notice():
    assert trim_notice(0, 8192) == ""
    assert "the oldest message was left out" in trim_notice(1, 8192)
    notice = trim_notice(3, 8192)
    assert "8,192-token context" in notice and "oldest 3 messages" in notice


def test_make_config_accepts_ui_values_and_rejects_out_of_range():
    config = make_config("eagle2", 128.0, 0.7, 0.9, 40.0, 60, 6, 10, -1)
    assert config.max_new_tokens == 128 and config.sampling.top_k == 40 and config.seed is None
    assert make_config("vanilla", 8, 0, 1, 0, 60, 6, 10, 7).seed == 7
    assert config.tree.lookup == 0 and make_config("eagle2", 8, 0, 1, 0, 60, 6, 10, -1, 12.0).tree.lookup == 12
    assert not config.tree.adaptive and make_config("eagle2", 8, 0, 1, 0, 60, 6, 10, -1, 0, True).tree.adaptive
    for args, message in [
        (("eagle3", 8, 0, 1, 0, 60, 6, 10), "unknown method"),
        (("eagle2", 0, 0, 1, 0, 60, 6, 10), "max_new_tokens"),
        (("eagle2", 8, 9.0, 1, 0, 60, 6, 10), "temperature"),
        (("eagle2", 8, 0, 0.0, 0, 60, 6, 10), "top_p"),
        (("eagle2", 8, 0, 1, 2.5, 60, 6, 10), "top-k must be a whole number"),
        (("eagle2", 8, 0, 1, 0, 600, 6, 10), "total_tokens"),
        (("eagle2", 8, 0, 1, 0, 60, 0, 10), "depth"),
        (("eagle2", 8, "hot", 1, 0, 60, 6, 10), "temperature must be a number"),
        (("eagle2", 8, 0, 1, 0, 60, 6, 10, -1, 99), "lookup"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_config(*args)


def test_check_message_rejects_empty_and_huge_input():
    assert check_message("hi", 100) == "hi"
    for empty in ("", "   \n", None):
        with pytest.raises(ValueError, match="empty"):
            check_message(empty, 100)
    with pytest.raises(ValueError, match="Shorten it"):
        check_message("x" * 10_000, 100)


def test_session_copies_get_their_own_cancel_flag_and_one_request_at_a_time():
    session = ChatSession([Turn("a", "b")])
    clone = copy.deepcopy(session)
    assert clone.turns == session.turns and clone.turns is not session.turns
    assert clone.cancel is not session.cancel
    session.begin("hello")
    first = session.cancel
    with pytest.raises(ValueError, match="still being generated"):
        session.begin("again")
    session.active = False
    session.begin("again")
    assert session.cancel is not first and session.pending == "again"


# ---- compare ---------------------------------------------------------------------------------------


def run_of(method, times, texts, ids, tps):
    cycles = [{"type": "cycle", "text": t, "totals": {"elapsed_s": s, "new_tokens": k + 1, "tokens_per_s": tps}}
              for k, (s, t) in enumerate(zip(times, texts))]
    end = {"type": "end", "text": "".join(texts), "output_ids": ids, "message": "the model ended its reply",
           "finish_reason": "eos",
           "totals": {"elapsed_s": times[-1], "tokens_per_s": tps, "new_tokens": len(ids)}}
    return Run(method, cycles, end)


def test_run_replays_at_its_measured_pace():
    run = run_of("vanilla", [0.1, 0.2, 0.3], ["a", "b", "c"], [1, 2, 3], 10.0)
    assert run.shown_at(0.05)[0] == "" and not run.shown_at(0.05)[2]
    assert run.shown_at(0.2)[0] == "ab" and not run.shown_at(0.2)[2]
    assert run.shown_at(0.3) == ("abc", run.end["totals"], True)
    times = list(replay_times(run, run_of("eagle2", [0.15], ["abc"], [1, 2, 3], 20.0), fps=10))
    assert times == sorted(times) and times[-1] == 0.3


def test_summary_reports_speedup_and_identity():
    a = run_of("vanilla", [0.1, 0.2], ["a", "b"], [1, 2], 10.0)
    b = run_of("eagle2", [0.1], ["ab"], [1, 2], 20.0)
    text = summary(a, b, greedy=True)
    assert "2.00× speed-up" in text and "identical: **yes**" in text
    c = run_of("eagle2", [0.1], ["ax"], [1, 3], 20.0)
    text = summary(a, c, greedy=False)
    assert "identical: **no**" in text and "character 1" in text and "samples" in text
    assert "stopped" in summary(a, Run("eagle2"), greedy=True)
    c.end["finish_reason"] = "cancelled"
    assert "stopped" in summary(a, c, greedy=True)


def test_summary_of_differing_greedy_texts_keeps_the_headers_promise():
    a = run_of("vanilla", [0.1, 0.2], ["a", "b"], [1, 2], 10.0)
    c = run_of("eagle2", [0.1], ["ax"], [1, 3], 20.0)
    bf16 = summary(a, c, greedy=True, backend="bf16")
    assert "differ from character 1" in bf16 and "rounding near-tie of bf16" in bf16 and "bug" not in bf16
    int8 = summary(a, c, greedy=True, backend="int8")  # the header promises identical tokens: say so
    assert "differ from character 1" in int8 and "bug" in int8 and "near-tie" not in int8


class _Engine:
    def __init__(self, backend):
        self.backend = backend

    def describe(self):
        return f"SmolLM2 · {self.backend} · cpu · EAGLE head loaded"


def test_header_promise_is_exact_only_for_the_exact_backend():
    from app.ui import promise

    int8 = promise(_Engine("int8"))
    assert "identical, token for token" in int8 and "near-tie" not in int8 and "0 of 126 turns" in int8
    bf16 = promise(_Engine("bf16"))
    assert "identical to the one SmolLM2 (bf16) writes alone up to rounding near-ties" in bf16
    assert "315 of 435" in bf16 and "token for token" not in bf16
    fp32 = promise(_Engine("fp32"))
    assert "up to rounding near-ties" in fp32 and "audit" not in fp32


# ---- pump ------------------------------------------------------------------------------------------


def test_pump_delivers_every_event_in_order():
    got = [e for batch in pump(iter([{"i": i} for i in range(50)]), threading.Event(), poll_s=0.01) for e in batch]
    assert got == [{"i": i} for i in range(50)]


def test_pump_reraises_stream_errors_after_earlier_events():
    def stream():
        yield {"i": 0}
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        for batch in pump(stream(), threading.Event(), poll_s=0.01):
            got += batch
    assert got == [{"i": 0}]


def test_pump_cancels_the_stream_when_the_consumer_leaves():
    cancel = threading.Event()
    produced = []

    def stream():
        for i in range(1000):
            if cancel.is_set():
                return
            produced.append(i)
            yield {"i": i}
            time.sleep(0.005)

    batches = pump(stream(), cancel, poll_s=0.01)
    next(batches)
    batches.close()  # e.g. the browser went away
    assert cancel.is_set()
    assert len(produced) < 1000


def test_tree_sliders_follow_the_temperature_until_the_user_moves_them():
    greedy, sampling = TreeConfig(8, 4, 4, lookup=10), TreeConfig(4, 2, 4, lookup=10)
    assert tree_for_temperature(0.7, 8, 4, 4, greedy, sampling) == (4, 2, 4)  # sampling starts
    assert tree_for_temperature(1.3, 4, 2, 4, greedy, sampling) == (4, 2, 4)  # still sampling
    assert tree_for_temperature(0.0, 4, 2, 4, greedy, sampling) == (8, 4, 4)  # back to greedy
    assert tree_for_temperature(0.7, 20, 5, 6, greedy, sampling) == (20, 5, 6)  # a tree the user set stays
    assert tree_for_temperature(0.0, 20, 5, 6, greedy, sampling) == (20, 5, 6)
    assert tree_for_temperature(0.7, 8, 4, 4, greedy, None) == (8, 4, 4)  # no sampling tree: no switch


def test_auto_method_is_offered_only_where_sampling_was_measured_to_differ():
    from types import SimpleNamespace

    from app.settings import AppOptions, available_methods, opening_method

    engine = SimpleNamespace(head=object())
    measured = AppOptions(default_method="eagle2", sampling_method="vanilla")
    methods = available_methods(engine, measured)
    assert methods == ["auto", "eagle2", "eagle1", "vanilla"] and opening_method(measured, methods) == "auto"
    assert measured.auto_label() == "Auto: EAGLE-2 at temperature 0, Vanilla above (measured here)"
    assert [measured.method_for("auto", t) for t in (0, 0.0, 0.3, 1)] == ["eagle2", "eagle2", "vanilla", "vanilla"]
    assert measured.method_for("eagle1", 1) == "eagle1"
    same = AppOptions(default_method="eagle2", sampling_method="eagle2")
    assert available_methods(engine, same) == ["eagle2", "eagle1", "vanilla"] == available_methods(engine)
    assert available_methods(SimpleNamespace(head=None), measured) == ["vanilla"]
