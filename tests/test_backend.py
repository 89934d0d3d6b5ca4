"""Choosing the target's backend: the pure choice on fake costs, the shipped acceptance table, and the
measured CPU tuning on a tiny model (its cache included)."""

import json

import pytest

from engine import acceptance as acceptance_module
from engine.autotune import backends as tuning_module
from engine.autotune.backends import backend_key, tune_cpu
from engine.backend import BackendRate, choose_backend, dominated, spec_for, variant
from engine.checkpoint import save_head
from engine.int8 import is_int8
from engine.models import ModelSpec, backend_name
from tests.tiny import oracle_head, perturbed, tiny_model, tiny_tokenizer


def test_spec_for_maps_names_and_refuses_unknown():
    assert spec_for("int8", ModelSpec()).quantization == "int8"
    assert spec_for("bf16", ModelSpec(quantization="4bit")) == ModelSpec(dtype="bfloat16")
    assert spec_for("bnb-4bit", ModelSpec()).quantization == "4bit"
    with pytest.raises(ValueError, match="unknown backend 'int4'"):
        spec_for("int4", ModelSpec())


def test_dominated_needs_slower_at_every_probe():
    probes = {"int8": [40.0, 80.0], "fp32": [95.0, 206.0], "bf16": [58.0, 320.0]}
    assert dominated(probes) == {"fp32", "bf16"}
    # fp32 flat at 16 nodes: slower for one token but not for many, so it stays
    probes = {"int8": [40.0, 300.0], "fp32": [95.0, 206.0]}
    assert dominated(probes) == set()


def test_choice_is_the_fastest_best_method_not_the_fastest_step():
    rates = [
        BackendRate("int8", vanilla_tokens_per_s=25.0, eagle_tokens_per_s=30.0, tree=(8, 4, 4)),
        BackendRate("bf16", vanilla_tokens_per_s=21.0, eagle_tokens_per_s=50.0, tree=(24, 5, 8)),
    ]
    choice = choose_backend(rates)
    assert (choice.backend, choice.method) == ("bf16", "eagle2")
    assert choice.rates[0].backend == "bf16" and "bf16" in choice.reason()


def test_vanilla_is_the_default_where_no_tree_pays():
    rates = [
        BackendRate("bf16", vanilla_tokens_per_s=17.0, eagle_tokens_per_s=9.2, tree=(4, 2, 4)),
        BackendRate("fp32", vanilla_tokens_per_s=10.0, eagle_tokens_per_s=12.0, tree=(8, 3, 4)),
    ]
    choice = choose_backend(rates)
    assert (choice.backend, choice.method) == ("bf16", "vanilla")
    assert "no draft tree pays" in choice.reason()
    with pytest.raises(ValueError):
        choose_backend([])


def test_eagle2_stays_the_default_near_parity_before_the_lookup_branch():
    """Plain EAGLE-2's estimate leaves out the lookup branch: at 0.95x vanilla it is still chosen, at
    0.85x it is not."""
    near = choose_backend([BackendRate("int8", vanilla_tokens_per_s=56.0, eagle_tokens_per_s=53.2, tree=(4, 3, 4))])
    assert near.method == "eagle2"
    assert "EAGLE-2 expected at 53 tokens/s before its prompt-lookup branch (vanilla 56)" in near.reason()
    below = choose_backend([BackendRate("int8", vanilla_tokens_per_s=56.0, eagle_tokens_per_s=47.6, tree=(4, 3, 4))])
    assert below.method == "vanilla"


def test_variants_are_the_named_backends():
    model = tiny_model("llama", layers=1)
    assert backend_name(variant(model, "fp32")) == "fp32"
    assert backend_name(variant(model, "bf16")) == "bf16"
    int8 = variant(model, "int8")
    assert is_int8(int8) and not is_int8(model) and int8.lean is not None


@pytest.fixture
def head_dir(tmp_path):
    model = tiny_model("llama", layers=1, seed=3)
    head = perturbed(oracle_head(model), 1.0, seed=2)
    save_head(head, tmp_path / "head")
    return model, tmp_path / "head"


def test_shipped_table_is_used_only_for_its_own_head(head_dir, tmp_path):
    model, path = head_dir
    table = {"samples": 3, "table": [[4, 2, 4, 1.5]]}
    data = {"format": 1, "head_sha256": acceptance_module.head_digest(path), "greedy": table,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **table}}  # fmt: skip
    (path / "acceptance.json").write_text(json.dumps(data))
    assert acceptance_module.load_shipped(path).table[(4, 2, 4)] == 1.5
    assert acceptance_module.load_shipped(path, acceptance_module.SAMPLING).samples == 3
    data["head_sha256"] = "0" * 16  # another head's table
    (path / "acceptance.json").write_text(json.dumps(data))
    assert acceptance_module.load_shipped(path) is None


def test_tune_cpu_chooses_caches_and_reloads(head_dir, tmp_path, monkeypatch):
    model, path = head_dir
    tokenizer = tiny_tokenizer()
    engine, tuning = tune_cpu(model, tokenizer, path, progress=False, candidates=("int8", "fp32"),
                              cache=tmp_path / "cache")  # fmt: skip
    assert tuning.acceptance_source == "calibrated"
    assert {r.backend for r in tuning.choice.rates} == {"int8", "fp32"}
    assert backend_name(engine.model) == tuning.choice.backend
    assert tuning.greedy.tree.total_tokens >= 1 and tuning.sampling.key.get("sampling")
    assert engine.head is not None

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached tuning must not time anything")

    monkeypatch.setattr(tuning_module, "measure_costs", no_timing)
    again, cached = tune_cpu(model, tokenizer, path, progress=False, candidates=("int8", "fp32"),
                             cache=tmp_path / "cache")  # fmt: skip
    assert cached.choice == tuning.choice and cached.greedy.tree == tuning.greedy.tree
    assert backend_name(again.model) == tuning.choice.backend


def test_backend_key_names_the_cpu_features(head_dir):
    model, path = head_dir
    key = backend_key(model, path, ("int8", "fp32"))
    assert {"cpu", "isa", "threads", "torch", "head_sha256"} <= set(key)
    assert isinstance(key["isa"], list)
