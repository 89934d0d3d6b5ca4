"""The training pipeline end to end on a tiny random model: data, fit, export, load, decode."""

import itertools
import json

import pytest
import torch

from engine.checkpoint import load_head
from engine.config import GenerationConfig, TreeConfig
from engine.decode import Engine
from engine.head import DraftHead, head_config_for
from engine.train import clock as train_clock
from engine.train.data import DataConfig, generate_data, read_prompts
from engine.train.export import export
from engine.train.features import answered_prompts, load_sequences, shard_tensors
from engine.train.fit import FitConfig, fit, unrolled_predictions
from engine.train.vocab import draft_vocabulary
from engine.verify import base_model
from tests.tiny import tiny_model, tiny_tokenizer


def test_refuses_benchmark_questions(tmp_path):
    bench = tmp_path / "benchmarks" / "q.jsonl"
    bench.parent.mkdir()
    bench.write_text(json.dumps({"turns": ["hi"]}) + "\n")
    with pytest.raises(ValueError, match="never train"):
        read_prompts(bench)


def tiny_run(tmp_path, layers: int):
    """A tiny target, its tokenizer, and a run folder holding its answers to 24 prompts in 2 shards."""
    torch.manual_seed(0)
    model = tiny_model("llama", layers=layers, seed=4)
    tokenizer = tiny_tokenizer()
    prompts = [f"tell me about {w} {c}" for c in "abcdef" for w in ("cats", "rain", "maps", "bread")]
    run = tmp_path / "run"
    generate_data(model, tokenizer, prompts, run, DataConfig(limit=24, max_new_tokens=24, batch_size=8, shard_size=12))
    return model, tokenizer, run


def test_tiny_training_run_lowers_loss_and_exports(tmp_path):
    model, tokenizer, run = tiny_run(tmp_path, layers=2)
    assert len(list((run / "data").glob("shard_*.safetensors"))) == 2
    seqs = load_sequences(run)
    assert len(seqs) == 24 and seqs[0]["features"].shape[-1] == 64
    cfg = FitConfig(steps=120, batch_tokens=256, lr=3e-3, warmup=10, eval_every=40, save_every=40, holdout=0.2)
    head = fit(model, seqs, run, cfg, log=lambda m: None)
    first, last = head.history[0], head.history[-1]
    assert last["heldout_reg"] + 0.1 * last["heldout_ce"] < first["heldout_reg"] + 0.1 * first["heldout_ce"]
    assert (run / "ckpt.pt").exists() and (run / "best.pt").exists()

    # resuming a finished run trains no further and keeps the history
    again = fit(model, seqs, run, cfg, log=lambda m: None)
    assert len(again.history) == len(head.history)

    head.draft_vocab, coverage = draft_vocabulary(seqs, 40, 64, {0})
    assert 0 in head.draft_vocab.tolist() and 0.0 < coverage <= 1.0
    out = tmp_path / "head"
    export(head, out, {"target": "tiny", "command": "python -m engine.train ..."})
    assert (out / "README.md").read_text().startswith("# EAGLE draft head for tiny")
    engine = Engine(model, tokenizer, load_head(out, model))
    ids = engine.chat_ids([{"role": "user", "content": "tell me about cats b"}])
    want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=20)))[-1]["output_ids"]
    got = list(engine.generate(ids, GenerationConfig(method="eagle2", max_new_tokens=20, tree=TreeConfig(10, 3, 3))))
    assert got[-1]["output_ids"] == want


def test_source_share_cap(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"source": "gsm8k", "prompt": f"math {i}"} for i in range(60)]
    rows += [{"source": "seed", "prompt": f"seed {i}"} for i in range(20)]
    rows += [{"source": "t0", "prompt": f"t0 {i}"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert len(read_prompts(path)) == 100
    capped = read_prompts(path, max_source_share=0.4)
    share = sum(p.startswith("math") for p in capped) / len(capped)
    assert share <= 0.4 + 1e-9 and len(capped) > 40
    assert {p.split()[0] for p in capped} == {"math", "seed", "t0"}


def test_source_prefix_filter(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"source": "gsm8k/train", "prompt": f"math {i}"} for i in range(5)]
    rows += [{"source": "self-instruct/seed", "prompt": f"seed {i}"} for i in range(3)]
    rows += [{"source": "self-instruct/t0", "prompt": f"t0 {i}"} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kept = read_prompts(path, sources=("self-instruct",))
    assert sorted(p.split()[0] for p in kept) == ["seed"] * 3 + ["t0"] * 4
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(path, sources=("sharegpt",))


def test_data_generation_extends_a_run_without_answering_twice(tmp_path):
    model, tokenizer = tiny_model("llama", layers=1, seed=2), tiny_tokenizer()
    run = tmp_path / "run"
    first = [f"first prompt {c}" for c in "abcdefghij"]  # the tiny tokenizer has letters, few digits
    generate_data(model, tokenizer, first, run, DataConfig(limit=10, max_new_tokens=6, batch_size=4, shard_size=4))
    assert len(list((run / "data").glob("shard_*.safetensors"))) == 3
    before = answered_prompts(run / "data")
    assert len(before) == 10

    # the same call again is a no-op; a new selection overlapping the old one answers only the new prompts
    generate_data(model, tokenizer, first, run, DataConfig(limit=10, max_new_tokens=6, batch_size=4, shard_size=4))
    assert len(list((run / "data").glob("shard_*.safetensors"))) == 3
    second = first[:5] + [f"second prompt {c}" for c in "abcdef"] + ["second prompt a"]
    generate_data(model, tokenizer, second, run, DataConfig(limit=12, max_new_tokens=6, batch_size=4, shard_size=4))
    after = answered_prompts(run / "data")
    assert len(after) == 16 and before < after
    seqs = load_sequences(run)
    assert len(seqs) == 16  # no sequence stored twice


def test_shard_features_batched_equal_one_sequence_at_a_time():
    model = tiny_model("llama", layers=2, seed=5).float()
    records = [([1, 5, 9], [4, 4, 7, 2]), ([3] * 11, [8, 2]), ([6, 1], [2]), ([7, 7, 3, 5], [9, 9, 9, 9, 9, 1])]
    t = shard_tensors(model, records, batch_tokens=24)  # several forwards, each padded to its longest
    off = t["offsets"].tolist()
    for i, (prompt, answer) in enumerate(records):
        alone = base_model(model)(input_ids=torch.tensor([prompt + answer])).last_hidden_state[0]
        assert t["input_ids"][off[i] : off[i + 1]].tolist() == prompt + answer
        assert t["answer_start"][i] == len(prompt)
        torch.testing.assert_close(t["features"][off[i] : off[i + 1]].float(), alone.to(torch.bfloat16).float())


def test_unrolled_steps_match_drafting_with_own_features():
    """Training step s at position i must compute what drafting computes at depth s below a root at
    i - s: true-feature cache up to the root, then the head's own predicted features."""
    torch.manual_seed(0)
    model = tiny_model("llama", layers=1, seed=3).float()
    head = DraftHead(head_config_for(model)).float().eval()
    b, t, h = 2, 9, model.config.hidden_size
    embeds, feats = torch.randn(b, t, h), torch.randn(b, t, h)
    with torch.no_grad():
        preds = unrolled_predictions(head, embeds, feats, steps=3)
        for row in range(b):
            for root in range(t - 2):
                cache = head.new_cache(32)
                prefix = (embeds[row : row + 1, : root + 1], feats[row : row + 1, : root + 1])
                out = head(*prefix, torch.arange(root + 1)[None], None, cache)
                torch.testing.assert_close(preds[0][row, root], out[0, -1])
                feature = out[:, -1:]
                for step in (1, 2):
                    pos = root + step
                    if pos >= t:
                        break
                    feature = head(embeds[row : row + 1, pos : pos + 1], feature, torch.tensor([[pos]]), None, cache)
                    torch.testing.assert_close(preds[step][row, pos], feature[0, 0], rtol=1e-4, atol=1e-5)


def test_unrolled_training_reports_each_step_and_stops_on_time(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama", layers=2, seed=4), tiny_tokenizer()
    prompts = [f"tell me about {w} {c}" for c in "abcd" for w in ("cats", "rain", "maps")]
    run = tmp_path / "run"
    generate_data(model, tokenizer, prompts, run, DataConfig(limit=12, max_new_tokens=16, batch_size=6, shard_size=12))
    seqs = load_sequences(run)
    cfg = FitConfig(steps=60, batch_tokens=256, lr=3e-3, warmup=5, eval_every=20, save_every=20, holdout=0.25, unroll=3)
    head = fit(model, seqs, run, cfg, log=lambda m: None)
    last = head.history[-1]
    assert {"heldout_acc", "heldout_acc_2", "heldout_acc_3"} <= last.keys()
    mean_acc = (last["heldout_acc"] + last["heldout_acc_2"] + last["heldout_acc_3"]) / 3
    assert last["heldout_score"] == pytest.approx(mean_acc)
    first = head.history[0]
    assert last["heldout_reg"] < first["heldout_reg"]

    # a time limit stops early with an evaluation and a checkpoint; a rerun without it resumes there
    run2 = tmp_path / "run2"
    run2.mkdir()
    clock = itertools.count()
    monkeypatch.setattr(train_clock, "now", lambda: float(next(clock)))  # one second per look at the clock
    limited = fit(model, seqs, run2, FitConfig(**{**cfg.__dict__, "fit_minutes": 25 / 60}), log=lambda m: None)
    stopped = limited.history[-1]
    assert stopped["stopped_early"] and 20 < stopped["step"] < cfg.steps
    assert (run2 / "best.pt").exists()
    resumed = fit(model, seqs, run2, cfg, log=lambda m: None)
    assert stopped in resumed.history and resumed.history[-1]["step"] == cfg.steps

    # fine-tuning starts from the given head: at learning rate 0 it comes back unchanged; a run folder
    # holding another start's checkpoint is refused
    with pytest.raises(ValueError, match="started from another head"):
        fit(model, seqs, run2, cfg, log=lambda m: None, init=head)
    (tmp_path / "run3").mkdir()
    frozen = FitConfig(**{**cfg.__dict__, "steps": 3, "lr": 0.0})
    same = fit(model, seqs, tmp_path / "run3", frozen, log=lambda m: None, init=head)
    for (name, a), b in zip(same.state_dict().items(), head.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    # limit 0 answers nothing: a run can train on the shards it has
    generate_data(model, tokenizer, [f"new prompt {c}" for c in "xyz"], run, DataConfig(limit=0))
    assert len(load_sequences(run)) == len(seqs)


def test_data_answers_each_prompt_once_per_temperature(tmp_path):
    model, tokenizer = tiny_model("llama", layers=1, seed=2), tiny_tokenizer()
    run = tmp_path / "run"
    prompts = [f"some prompt {c}" for c in "abcdef"]
    generate_data(model, tokenizer, prompts, run, DataConfig(limit=6, max_new_tokens=12, batch_size=4, shard_size=4))
    assert len(answered_prompts(run / "data")) == 6
    cfg = DataConfig(limit=6, max_new_tokens=12, batch_size=4, shard_size=4, temperatures="0,1")
    generate_data(model, tokenizer, prompts, run, cfg)  # adds only the sampled answers
    pairs = answered_prompts(run / "data", with_temperature=True)
    assert len(pairs) == 12 and {t for _, t in pairs} == {0.0, 1.0}
    seqs = load_sequences(run)
    assert len(seqs) == 12
    by_prompt = {}
    for s in seqs:
        prompt, answer = s["ids"][: s["answer_start"]], s["ids"][s["answer_start"] :]
        by_prompt.setdefault(tuple(prompt.tolist()), []).append(answer.tolist())
    assert all(len(v) == 2 for v in by_prompt.values())
    assert any(a != b for a, b in by_prompt.values())  # sampling at T=1 on a random model departs from greedy
    generate_data(model, tokenizer, prompts, run, cfg)  # nothing left to answer
    assert len(load_sequences(run)) == 12
    for bad in ("0,-1", "0,nan", "inf", "1,1"):
        with pytest.raises(ValueError, match="temperatures"):
            generate_data(model, tokenizer, prompts, run, DataConfig(temperatures=bad))


def test_data_time_budget_starts_no_shard_past_it(tmp_path, monkeypatch):
    model, tokenizer = tiny_model("llama", layers=1, seed=2), tiny_tokenizer()
    clock = itertools.count(step=10)
    monkeypatch.setattr(train_clock, "now", lambda: float(next(clock)))  # every shard takes 10 s
    run = tmp_path / "run"
    cfg = DataConfig(limit=4, max_new_tokens=4, batch_size=1, shard_size=1, data_minutes=0.75)
    generate_data(model, tokenizer, [f"p {c}" for c in "abcd"], run, cfg)
    # shards end at 10 s and 20 s; a third would end at 60 s, past the 45 s budget
    assert len(list((run / "data").glob("shard_*.safetensors"))) == 2


def test_eagle3_recipe_trains_exports_the_official_layout_and_decodes_losslessly(tmp_path):
    from safetensors.torch import load_file

    from engine.train.eagle3 import STEP_DECAY

    model, tokenizer, run = tiny_run(tmp_path, layers=8)
    seqs = load_sequences(run)
    vocab, _ = draft_vocabulary(seqs, 40, 64, {0})
    cfg = FitConfig(
        steps=150, batch_tokens=256, lr=3e-3, warmup=10, eval_every=50, save_every=50, holdout=0.2,
        unroll=3, recipe="eagle3",
    )  # fmt: skip
    head = fit(model, seqs, run, cfg, log=lambda m: None, vocab=vocab)
    assert head.kind == "eagle3" and head.target_layers == (2, 4, 5) and STEP_DECAY == 0.8
    first, last = head.history[0], head.history[-1]
    assert last["heldout_ce"] < first["heldout_ce"] and "heldout_acc_3" in last

    out = tmp_path / "head"
    export(head, out, {"target": "tiny", "command": "python -m engine.train --recipe eagle3 ..."})
    keys = set(load_file(str(out / "model.safetensors")))
    assert {"fc.weight", "midlayer.hidden_norm.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= keys
    assert not any(k.startswith("layers.") for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == len(vocab)
    assert (out / "README.md").read_text().startswith("# EAGLE-3 draft head for tiny")

    loaded = load_head(out, model)
    assert loaded.kind == "eagle3" and loaded.draft_vocab.tolist() == vocab.tolist()
    engine = Engine(model, tokenizer, loaded)
    ids = engine.chat_ids([{"role": "user", "content": "tell me about rain c"}])
    want = list(engine.generate(ids, GenerationConfig(method="vanilla", max_new_tokens=24)))[-1]["output_ids"]
    got = list(engine.generate(ids, GenerationConfig(method="eagle2", max_new_tokens=24, tree=TreeConfig(10, 3, 3))))
    assert got[-1]["output_ids"] == want
    assert got[-1]["totals"]["tau"] > 1.2  # the trained head's drafts get accepted on text like its training data
