"""The GPU check's CPU dry run (scripts/gpu_check.py) on a tiny saved model: every step runs or skips
cleanly, and the summary holds every section with numbers. Speeds are measured there, never asserted."""

import json

import pytest

from engine.checkpoint import save_head
from scripts import gpu_check
from tests.tiny import tiny_engine

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a line about the sea.", "Now shorter."]},
    {"question_id": 2, "category": "qa", "turns": ["What is a tree?"]},
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    engine = tiny_engine("llama", head="oracle")  # an oracle head: the trees are accepted, lossless is exact
    engine.model.save_pretrained(root / "model")
    engine.tokenizer.save_pretrained(root / "model")
    save_head(engine.head, root / "head")
    questions = root / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = root / "out"
    summary = gpu_check.main([
        "--out", str(out), "--device", "cpu", "--model", str(root / "model"), "--head", str(root / "head"),
        "--questions", str(questions), "--tree", "8,4,4",
    ])  # fmt: skip
    return summary, out


def test_every_step_runs_on_a_cpu_and_the_cuda_only_ones_skip(dry_run):
    summary, out = dry_run
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert list(status) == [s.name for s in gpu_check.STEPS]
    assert status.pop("probe_4bit") == status.pop("probe_compiled") == "skipped"
    assert set(status.values()) == {"ok"}, summary["steps"]
    assert json.loads((out / "gpu_check.json").read_text())["steps"] == json.loads(json.dumps(summary["steps"]))
    md = (out / "gpu_check.md").read_text()
    for name in status:
        assert f"## {name}" in md


def test_the_summary_holds_numbers(dry_run):
    summary, out = dry_run
    r = {s["name"]: s.get("result") for s in summary["steps"]}
    assert r["lossless"]["passed"]  # fp32 greedy: every method wrote vanilla's tokens
    assert set(r["lossless"]["methods"]) == {"eagle2", "eagle2_lookup", "eagle1"}
    for name in ("bench_bf16", "bench_fp32"):
        assert set(r[name]["methods"]) == set(gpu_check.BENCH_METHODS)
        assert all(row["tokens_per_s"] > 0 for row in r[name]["methods"].values())
        assert (out / r[name]["report"]).is_file()
    assert r["bench_fp32"]["lossless"]["bugs"] == 0
    for method in ("eagle2", "eagle2_lookup"):
        split = r["profile"]["methods"][method]
        assert split["cycles"] > 0 and split["verify_ms_per_cycle"] > 0 and split["top_ops"]
        assert (out / f"profile-{method}.txt").is_file()
    assert r["profile"]["eagle2_without_cudnn_sdpa"]["ms_per_cycle"] > 0
    for dtype in ("bfloat16", "float32"):
        assert list(r["verify_cost"][dtype]["verify_ms"]) == [str(n) for n in gpu_check.VERIFY_SIZES]
        assert all(ms > 0 for ms in r["verify_cost"][dtype]["verify_ms"].values())
    probe = r["probe_bf16"]
    assert probe["config"] == "tiny"
    assert probe["engine_vanilla"]["new_tokens"] == probe["hf_static"]["new_tokens"] == probe["new_tokens"]
    assert list(probe["verify"]["verify_ms"]) == [str(n) for n in gpu_check.PROBE_SIZES]


def test_a_stand_in_runs_the_model_steps_without_the_real_model(tmp_path):
    summary = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--stand-in", "tiny", "--tree", "8,4,4",
                              "--only", "lossless,bench_bf16"])  # fmt: skip
    lossless, bench = summary["steps"]
    assert lossless["status"] == "ok" and lossless["result"]["passed"]
    assert bench["status"] == "skipped" and "real model" in bench["reason"]


def test_a_step_that_would_not_fit_is_not_started(tmp_path):
    summary = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--stand-in", "tiny", "--budget-s", "10",
                              "--only", "lossless"])  # fmt: skip
    (step,) = summary["steps"]
    assert step["status"] == "skipped" and "budget" in step["reason"]
