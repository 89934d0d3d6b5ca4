"""The benchmark harness on tiny models: question sampling, interleaving, the JSON report, the summary and
the losslessness audit (which must catch a method that changes a token)."""

import json
from dataclasses import replace

import pytest

from engine.bench import cli as bench_cli
from engine.bench import runner
from engine.bench.lossless import check_lossless
from engine.bench.methods import BASELINES, DEFAULT_METHODS, ENGINE_METHODS, EngineMethod, HFGenerateMethod, TurnOutput
from engine.bench.questions import BenchSettings, load_questions
from engine.bench.report import chart_title
from engine.bench.runner import run_benchmark
from engine.bench.stats import matched_speedups, summarize
from engine.checkpoint import save_head
from tests.tiny import tiny_engine

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["hello there", "say more"]},
    {"question_id": 2, "category": "qa", "turns": ["the cat sat on"]},
    {"question_id": 3, "category": "qa", "turns": ["Why is the sky blue?"]},
]
SETTINGS = BenchSettings(max_new_tokens=12, warmup_tokens=4)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("llama", head="oracle")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_questions_per_category_is_stratified_and_keeps_file_order(tmp_path):
    rows = [{"question_id": i, "category": c, "turns": [f"q{i}"]} for i, c in enumerate("aaaaabbc")]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    assert [q["question_id"] for q in load_questions(path, per_category=2)] == [0, 2, 5, 6, 7]
    assert [q["question_id"] for q in load_questions(path, per_category=2, limit=3)] == [0, 2, 5]
    assert len(load_questions(path)) == 8
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"question_id": 9, "turns": ["x"]}])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_questions(bad)


class Recorder:
    """A fake method that logs the prompt it was given and answers with its own name."""

    def __init__(self, name, log, tokenizer):
        self.name, self.log, self.tokenizer = name, log, tokenizer

    def run(self, prompt_ids, settings):
        self.log.append((self.name, self.tokenizer.decode(prompt_ids)))
        return TurnOutput([5, 6, 7], f"answer {self.name}", 0.01, 2, "eos")

    def forget(self):
        self.log.append((self.name, None))


def test_methods_interleave_question_by_question_after_a_warm_up(engine):
    log = []
    methods = {name: Recorder(name, log, engine.tokenizer) for name in ("A", "B", "C")}
    results = run_benchmark(engine, methods, QUESTIONS, SETTINGS)
    # every answer starts cold ("A!": A forgets its cache), so no method reuses another's prompt
    order = [name if prompt is not None else name + "!" for name, prompt in log]
    warm_up = ["A", "B", "C"]
    q1 = ["A!", "A", "A", "B!", "B", "B", "C!", "C", "C"]  # both turns of question 1 before the next method starts
    assert order == warm_up + q1 + ["A!", "A", "B!", "B", "C!", "C"] * 2
    log[:] = [entry for entry in log if entry[1] is not None]
    assert [(r["question_id"], r["method"]) for r in results] == [(q, m) for q in (1, 2, 3) for m in "ABC"]
    # each method's second turn carries its own first answer as history, not another method's
    second_turns = {name: prompt for name, prompt in log[3:9] if "say more" in prompt}
    for name, prompt in second_turns.items():
        assert f"answer {name}" in prompt
        assert all(f"answer {other}" not in prompt for other in "ABC" if other != name)
    assert results[0]["turns"] == 2 and results[0]["new_tokens"] == 6 and results[0]["cycles"] == 4
    assert results[0]["tau"] == pytest.approx((6 - 2) / 4)


def test_summary_speedups_are_ratios_of_total_rates_per_category():
    def row(method, category, tokens, wall, cycles):
        return {"question_id": 0, "category": category, "method": method, "turns": 1, "new_tokens": tokens,
                "wall_s": wall, "cycles": cycles}  # fmt: skip

    results = [
        row("vanilla", "a", 10, 1.0, 9), row("eagle2", "a", 10, 0.5, 3),
        row("vanilla", "b", 10, 2.0, 9), row("eagle2", "b", 10, 0.5, 3),
    ]  # fmt: skip
    summary = summarize(results)
    assert summary["vanilla"]["overall"]["speedup_vs_vanilla"] == pytest.approx(1.0)
    assert summary["eagle2"]["overall"]["tokens_per_s"] == pytest.approx(20.0)
    assert summary["eagle2"]["overall"]["speedup_vs_vanilla"] == pytest.approx(20.0 / (20 / 3))
    assert summary["eagle2"]["per_category"]["a"]["speedup_vs_vanilla"] == pytest.approx(2.0)
    assert summary["eagle2"]["per_category"]["b"]["speedup_vs_vanilla"] == pytest.approx(4.0)
    assert summary["eagle2"]["overall"]["tau"] == pytest.approx(18 / 6)
    assert summarize([row("eagle2", "a", 10, 1.0, 3)])["eagle2"]["overall"]["speedup_vs_vanilla"] is None


def test_transformers_baselines_count_forwards_and_match_vanilla(engine):
    prompt = engine.chat_ids([{"role": "user", "content": "hello there"}])
    vanilla = EngineMethod(engine, "vanilla").run(prompt, SETTINGS)
    plain = HFGenerateMethod(engine, prompt_lookup=False).run(prompt, SETTINGS)
    lookup = HFGenerateMethod(engine, prompt_lookup=True).run(prompt, SETTINGS)
    assert plain.output_ids == vanilla.output_ids == lookup.output_ids  # fp32 greedy
    assert plain.text == vanilla.text
    assert plain.cycles == vanilla.cycles == len(plain.output_ids) - 1  # one forward per token
    assert lookup.cycles < plain.cycles  # the tiny model's reply repeats itself: lookups hit
    # every forward marks when its tokens reached the host: one mark per token without drafts, fewer with
    for out in (vanilla, plain, lookup):
        counts, times = zip(*out.marks)
        assert counts[-1] == len(out.output_ids) and list(counts) == sorted(set(counts))
        assert list(times) == sorted(times) and 0 < times[-1] <= out.wall_s
    assert [n for n, _ in plain.marks] == [n for n, _ in vanilla.marks] == list(range(1, len(plain.output_ids) + 1))
    assert len(lookup.marks) == lookup.cycles + 1


def test_matched_speedup_times_each_pair_over_the_text_both_replies_share():
    def row(method, qid, category, ids, marks):
        return {"question_id": qid, "category": category, "method": method, "turns": len(ids), "output_ids": ids,
                "emit_marks": marks}  # fmt: skip

    steady = [[n, n / 10] for n in range(1, 7)]  # one token every 0.1 s
    results = [
        row("vanilla", 1, "a", [[1, 2, 3, 4, 5, 6]], [steady]),
        # shares 4 tokens with vanilla; the 4th arrives with the 5th at 0.2 s
        row("eagle2", 1, "a", [[1, 2, 3, 4, 9, 9]], [[[1, 0.1], [3, 0.15], [5, 0.2], [6, 0.25]]]),
        row("hf_prompt_lookup", 1, "a", [[1, 2, 3, 4, 5, 6]], [[[1, 0.1], [6, 0.35]]]),
        row("vanilla", 2, "b", [[7, 8, 9]], [steady[:3]]),
        row("eagle2", 2, "b", [[8, 8, 9]], [[[1, 0.1], [3, 0.2]]]),  # differs at once: nothing shared
        row("hf_prompt_lookup", 2, "b", [[7, 8, 9]], [[[1, 0.1], [3, 0.2]]]),
        # a second turn after different first replies has a different prompt: not the same work, left out
        row("vanilla", 3, "b", [[7], [1, 2, 3]], [steady[:1], steady[:3]]),
        row("eagle2", 3, "b", [[8], [1, 2, 3]], [steady[:1], [[3, 0.1]]]),
        # after the same first reply, the second turn has the same prompt: it counts
        row("vanilla", 4, "c", [[5], [1, 2]], [steady[:1], steady[:2]]),
        row("eagle2", 4, "c", [[5], [1, 3]], [steady[:1], [[2, 0.1]]]),
    ]
    matched = {(m["method"], m["against"]): m for m in matched_speedups(results)}
    assert set(matched) == {("eagle2", "vanilla"), ("eagle2", "hf_prompt_lookup"), ("vanilla", "hf_prompt_lookup")}
    e2 = matched["eagle2", "vanilla"]
    assert e2["per_category"]["a"] == pytest.approx(
        {"turns": 1, "shared_turns": 1, "tokens": 4, "method_s": 0.2, "against_s": 0.4, "speedup": 2.0}
    )
    assert e2["per_category"]["b"]["tokens"] == 0 and e2["per_category"]["b"]["speedup"] is None
    assert e2["per_category"]["c"] == pytest.approx(  # 1 token each turn: 0.1 s and 0.1 s for both
        {"turns": 2, "shared_turns": 2, "tokens": 2, "method_s": 0.2, "against_s": 0.2, "speedup": 1.0}
    )
    assert e2["overall"]["turns"] == 5 and e2["overall"]["shared_turns"] == 3
    assert e2["overall"]["speedup"] == pytest.approx(0.6 / 0.4)
    # against the lookup baseline on the same 4 tokens: its 4th came at 0.35 s
    assert matched["eagle2", "hf_prompt_lookup"]["overall"]["speedup"] == pytest.approx(0.35 / 0.2)
    base = matched["vanilla", "hf_prompt_lookup"]["overall"]
    assert base["tokens"] == 6 + 3 and base["speedup"] == pytest.approx((0.35 + 0.2) / (0.6 + 0.3))
    # any method can be the yardstick, here one engine method against another
    (only,) = matched_speedups(results, against=["eagle2"])
    assert (only["method"], only["against"]) == ("vanilla", "eagle2")
    assert only["overall"]["speedup"] == pytest.approx(0.4 / 0.6)
    # rows from a checkpoint written before emit marks existed are left out, not guessed
    old = [{k: v for k, v in r.items() if k != "emit_marks"} if r["method"] == "eagle2" else r for r in results]
    assert {(m["method"], m["against"]) for m in matched_speedups(old)} == {("vanilla", "hf_prompt_lookup")}


class FlipToken:
    """A deliberately broken method: the first turn's token at `position` is replaced by the next id."""

    def __init__(self, inner, position, vocab_size):
        self.inner, self.position, self.vocab_size, self.calls = inner, position, vocab_size, 0

    def run(self, prompt_ids, settings):
        out = self.inner.run(prompt_ids, settings)
        ids = list(out.output_ids)
        ids[self.position] = (ids[self.position] + 1) % self.vocab_size
        return replace(out, output_ids=ids)


class DropLast:
    def __init__(self, inner):
        self.inner = inner

    def run(self, prompt_ids, settings):
        out = self.inner.run(prompt_ids, settings)
        return replace(out, output_ids=out.output_ids[:-1])


def test_lossless_check_flags_a_broken_method_and_passes_the_engine(engine):
    vocab = engine.model.config.vocab_size
    methods = {
        "vanilla": EngineMethod(engine, "vanilla"),
        "eagle2": EngineMethod(engine, "eagle2"),
        "eagle1": EngineMethod(engine, "eagle1"),
        "eagle2_lookup": EngineMethod(engine, "eagle2_lookup"),
        "eagle2_adaptive": EngineMethod(engine, "eagle2_adaptive"),
        "broken": FlipToken(EngineMethod(engine, "eagle2"), 3, vocab),
        "short": DropLast(EngineMethod(engine, "vanilla")),
    }
    results = run_benchmark(engine, methods, QUESTIONS, SETTINGS)
    report = check_lossless(engine, QUESTIONS, results, bound=1e-4, max_new_tokens=SETTINGS.max_new_tokens)
    by_method = {}
    for d in report["divergences"]:
        by_method.setdefault(d["method"], []).append(d)
    assert set(by_method) == {"broken", "short"}  # the eagle methods are token-identical to vanilla
    broken = by_method["broken"]
    assert [(d["question_id"], d["turn"], d["position"]) for d in broken] == [(1, 0, 3), (2, 0, 3), (3, 0, 3)]
    vanilla = {r["question_id"]: r for r in results if r["method"] == "vanilla"}
    for d in broken:  # question 1's second turn is not compared: the histories differ after turn 0
        assert d["bug"] and d["gap"] > 1e-4 and d["margin"] > 0
        assert d["vanilla_token"] == vanilla[d["question_id"]]["output_ids"][0][3]
        assert d["method_token"] == (d["vanilla_token"] + 1) % vocab
        assert d["vanilla_rank"] == 0  # vanilla's token is the recomputed argmax
    assert all(d["bug"] and d["margin"] is None for d in by_method["short"])
    assert report["bugs"] == len(broken) + len(by_method["short"])
    # eagle methods: 4 turns each; broken and short stop at their first divergence, turn 0 of each question
    assert report["compared_turns"] == 4 + 4 + 4 + 4 + 3 + 3

    # the same divergences under a huge bound are near-ties, except a shorter output, which never is
    lenient = check_lossless(engine, QUESTIONS, results, bound=1e9, max_new_tokens=SETTINGS.max_new_tokens)
    assert len(lenient["divergences"]) == len(report["divergences"])
    assert lenient["bugs"] == len(by_method["short"])


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny target and its oracle head as folders, the way a user passes --model and --head."""
    root = tmp_path_factory.mktemp("tiny")
    engine = tiny_engine("llama", head="oracle")
    engine.model.save_pretrained(root / "model")
    engine.tokenizer.save_pretrained(root / "model")
    save_head(engine.head, root / "head")
    return root


def test_command_writes_json_markdown_and_chart(saved_tiny, tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "run" / "result.json"
    argv = [
        "--questions", str(questions), "--methods", ",".join(DEFAULT_METHODS), "--out", str(out),
        "--model", str(saved_tiny / "model"), "--head", str(saved_tiny / "head"), "--dtype", "float32",
        "--device", "cpu", "--max-new-tokens", "10", "--total-tokens", "12", "--depth", "4", "--top-k", "3",
        "--check-lossless", "--no-progress", "--threads", "1",
    ]  # fmt: skip
    assert bench_cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"config", "hardware", "memory", "results", "summary", "lossless", "matched"}
    assert report["config"]["tree"] == {"total_tokens": 12, "depth": 4, "top_k": 3, "lookup": 0, "adaptive": False}
    assert report["config"]["dtype"] == "float32" and report["config"]["question_count"] == 3
    for key in ("cpu", "threads", "gpu", "torch", "transformers"):
        assert key in report["hardware"]
    assert report["memory"]["peak_rss_mb"] > 0
    assert len(report["results"]) == len(QUESTIONS) * len(DEFAULT_METHODS)
    fields = {"question_id", "category", "method", "new_tokens", "wall_s", "cycles", "tau", "output_ids", "text"}
    for r in report["results"]:
        assert fields <= set(r)
        assert len(r["output_ids"]) == len(r["text"]) == r["turns"]
        assert r["new_tokens"] == sum(len(ids) for ids in r["output_ids"]) > 0
    assert list(report["summary"]) == list(DEFAULT_METHODS)
    for s in report["summary"].values():
        assert set(s["overall"]) >= {"tokens_per_s", "speedup_vs_vanilla", "tau"}
        assert set(s["per_category"]) == {"writing", "qa"}
    assert report["summary"]["vanilla"]["overall"]["speedup_vs_vanilla"] == pytest.approx(1.0)
    assert report["summary"]["eagle2"]["overall"]["tau"] > 1.5  # the oracle head's drafts are accepted
    assert report["lossless"]["bugs"] == 0 and report["lossless"]["divergences"] == []
    # this engine's methods split their time; the transformers baselines have no such split
    for r in report["results"]:
        if r["method"] in ENGINE_METHODS:
            phases = r["phase_ms"]
            assert set(phases) == {"prefill_ms", "draft_ms", "verify_ms"} and phases["prefill_ms"] > 0
            assert phases["prefill_ms"] + phases["draft_ms"] + phases["verify_ms"] <= r["wall_s"] * 1000
            assert phases["verify_ms"] > 0 and phases["draft_ms"] > 0  # vanilla's "draft" is its root: tiny, not zero
            assert 0 <= r["head_cycles"] <= r["cycles"] and (r["head_cycles"] == 0) == (r["method"] == "vanilla")
        else:
            assert "phase_ms" not in r and "head_cycles" not in r
    eagle2 = report["summary"]["eagle2"]["overall"]
    rows = [r for r in report["results"] if r["method"] == "eagle2"]
    draft_ms = sum(r["phase_ms"]["draft_ms"] for r in rows)
    assert eagle2["draft_ms_per_cycle"] == pytest.approx(draft_ms / sum(r["cycles"] for r in rows))
    assert "verify_ms_per_cycle" not in report["summary"]["hf_generate"]["overall"]
    assert report["summary"]["eagle2"]["overall"]["head_share"] == 1.0  # plain EAGLE-2 drafts every cycle
    assert report["summary"]["vanilla"]["overall"]["head_share"] == 0.0
    # fp32: every reply is the same text, so each pair is timed over all of it
    pairs = {(m["method"], m["against"]): m for m in report["matched"]}
    against = ("vanilla",) + tuple(b for b in BASELINES if b in DEFAULT_METHODS)
    assert set(pairs) == {(m, a) for m in ENGINE_METHODS for a in against if m != a}
    shared = sum(len(ids) for r in report["results"] if r["method"] == "vanilla" for ids in r["output_ids"])
    for m in pairs.values():
        assert m["overall"]["tokens"] == shared and m["overall"]["speedup"] > 0
        assert set(m["per_category"]) == {"writing", "qa"}
    md = out.with_suffix(".md").read_text()
    assert "| eagle2 |" in md and "writing" in md
    assert "| eagle2_lookup | hf_prompt_lookup |" in md.split("Speedup on the same text")[1]
    timing = "Where the engine's time goes"
    assert timing in md and "| hf_generate | " not in md.split(timing)[1]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_refuses_lossless_check_without_vanilla_or_when_sampling(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    base = ["--questions", str(questions), "--out", str(tmp_path / "r.json"), "--check-lossless"]
    with pytest.raises(SystemExit, match="add vanilla"):
        bench_cli.main(base + ["--methods", "eagle2"])
    with pytest.raises(SystemExit, match="greedy"):
        bench_cli.main(base + ["--methods", "vanilla,eagle2", "--temperature", "0.7"])
    with pytest.raises(SystemExit, match="unknown method"):
        bench_cli.main(base + ["--methods", "vanilla,medusa"])


def test_an_interrupted_run_resumes_from_its_checkpoint(saved_tiny, tmp_path, monkeypatch):
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "result.json"
    argv = [
        "--questions", str(questions), "--methods", "vanilla,eagle2", "--out", str(out),
        "--model", str(saved_tiny / "model"), "--head", str(saved_tiny / "head"), "--dtype", "float32",
        "--device", "cpu", "--max-new-tokens", "8", "--no-progress", "--threads", "1",
    ]  # fmt: skip
    real_answer, answered = runner.answer_question, []

    def dies_at_the_fourth(engine, method, name, question, settings):
        if len(answered) == 3:
            raise KeyboardInterrupt  # the run is killed during its fourth answer
        answered.append((question["question_id"], name))
        return real_answer(engine, method, name, question, settings)

    monkeypatch.setattr(runner, "answer_question", dies_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        bench_cli.main(argv)
    partial = tmp_path / "result.partial.jsonl"
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 3  # settings + three answers

    with pytest.raises(SystemExit, match=r"other settings \(max_new_tokens\)"):  # another max-new-tokens: no reuse
        bench_cli.main([a if a != "8" else "9" for a in argv] + ["--resume"])

    answered.clear()
    def counted(*a):
        answered.append((a[3]["question_id"], a[2]))
        return real_answer(*a)

    monkeypatch.setattr(runner, "answer_question", counted)
    assert bench_cli.main(argv + ["--resume"]) == 0
    assert answered == [(2, "eagle2"), (3, "vanilla"), (3, "eagle2")]  # only what the first run had not done
    report = json.loads(out.read_text())
    assert [(r["question_id"], r["method"]) for r in report["results"]] == [
        (q["question_id"], m) for q in QUESTIONS for m in ("vanilla", "eagle2")
    ]
    assert report["config"]["resumed_answers"] == 3 and not partial.exists()
    assert all(r["new_tokens"] > 0 for r in report["results"])


def test_the_gguf_is_looked_up_only_for_llama_cpp(monkeypatch):
    """Finding the default model's GGUF may download it: a run without llama_cpp must not ask (an offline
    GPU machine has no registry)."""
    from types import SimpleNamespace

    import engine.models
    from engine.bench.cli import gguf_of

    asked = []
    monkeypatch.setattr(engine.models, "default_gguf", lambda progress=False: asked.append(1) or "model.gguf")
    assert gguf_of(SimpleNamespace(model=None), ["vanilla", "eagle2"]) is None and not asked
    assert gguf_of(SimpleNamespace(model=None), ["vanilla", "llama_cpp"]) == "model.gguf" and asked
    assert gguf_of(SimpleNamespace(model="m.gguf"), ["llama_cpp"]) == "m.gguf"


def test_chart_title_names_the_backend_over_the_dtype():
    config = {"model": None, "dtype": "float32", "temperature": 0.0}
    report = {"hardware": {"gpu": None, "cpu": "AMD EPYC"}, "config": config}
    assert chart_title(report) == "default model · float32 · AMD EPYC · T=0.0"  # a report from before backends
    report["config"]["backend"] = "int8"  # the int8 backend loads float32 weights: its dtype says float32
    assert chart_title(report) == "default model · int8 · AMD EPYC · T=0.0"
