"""Acceptance reporting (engine.evaluate) on a tiny model whose drafts are always right."""

import json

from engine.bench.questions import load_questions
from engine.config import GenerationConfig, TreeConfig
from engine.evaluate import acceptance, markdown
from tests.tiny import tiny_engine


def test_acceptance_by_depth_and_tau(tmp_path):
    qfile = tmp_path / "q.jsonl"
    rows = [
        {"question_id": 1, "category": "writing", "turns": ["hello there", "and again"]},
        {"question_id": 2, "category": "qa", "turns": ["the cat sat"]},
        {"question_id": 3, "category": "qa", "turns": ["why"]},
    ]
    qfile.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    questions = load_questions(qfile, per_category=1)
    assert sorted(q["category"] for q in questions) == ["qa", "writing"]
    engine = tiny_engine("llama", head="oracle")
    cfg = GenerationConfig(method="eagle2", max_new_tokens=41, tree=TreeConfig(100, 4, 4))
    out = acceptance(engine, questions, cfg)
    overall = out["overall"]
    # the oracle's drafts are always right: every full cycle reaches depth 4 (5 tokens per cycle)
    assert overall["accept_by_depth"][0] == 1.0 and overall["accept_by_depth"][3] > 0.7
    assert 4.0 < overall["tau"] <= 5.0
    assert overall["cycles"] == out["writing"]["cycles"] + out["qa"]["cycles"]
    assert "| overall |" in markdown({"0.0": out})
