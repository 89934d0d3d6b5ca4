"""Speculative sampling keeps the target distribution (χ² goodness of fit on a tiny vocabulary).

The exact distribution of the first two sampled tokens is computed from the target itself; samples
from `eagle2` (and `vanilla`, as a control) must fit it. Cells with expected count < 5 are pooled.
Threshold: the test fails when the χ² p-value is below 1e-3. A deliberately broken acceptance rule
must fail the same test, which shows the test has power.
"""

import pytest
import torch
from scipy.stats import chisquare

from engine import decode as decode_module
from engine.config import GenerationConfig, SamplingConfig, TreeConfig
from engine.decode import Engine
from engine.verify import accept, processed_probs
from tests.tiny import oracle_head, perturbed, tiny_model, tiny_tokenizer

VOCAB = 12
N = 4000
P_MIN = 1e-3


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", vocab_size=VOCAB, layers=1, seed=11)
    with torch.no_grad():  # flatter logits: many tokens have real probability
        model.lm_head.weight.mul_(0.15)
    head = perturbed(oracle_head(model), 1.0, seed=1)
    engine = Engine(model, tiny_tokenizer(VOCAB), head)
    prompt = [5, 6, 7, 8]
    return engine, prompt


def exact_pairs(engine: Engine, prompt: list[int], sampling: SamplingConfig) -> torch.Tensor:
    """P(x1, x2) under the target with the same processing as the engine; column V means x1 was <eos>
    (id 0) and the reply ended. (V, V + 1)"""
    with torch.no_grad():
        p1 = processed_probs(engine.model(torch.tensor([prompt])).logits[0, -1:].float(), sampling)[0]  # (V,)
        seqs = torch.tensor([prompt + [x] for x in range(VOCAB)])
        p2 = processed_probs(engine.model(seqs).logits[:, -1].float(), sampling)  # (V, V)
    pairs = torch.cat([p1[:, None] * p2, torch.zeros(VOCAB, 1)], dim=1)
    pairs[0] = 0.0
    pairs[0, VOCAB] = p1[0]
    return pairs


def sample_pairs(engine, prompt, method, sampling, tree=TreeConfig(10, 3, 3)):
    counts = torch.zeros(VOCAB, VOCAB + 1)
    accepted_draft = 0
    for seed in range(N):
        cfg = GenerationConfig(method=method, max_new_tokens=2, sampling=sampling, tree=tree, seed=seed)
        events = list(engine.generate(prompt, cfg))
        x1, x2 = (events[-1]["output_ids"] + [VOCAB])[:2]
        counts[x1, x2] += 1
        accepted_draft += any(len(e["accepted"]) > 1 for e in events if e["type"] == "cycle")
    return counts, accepted_draft / N


def gof_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = (probs * counts.sum()).flatten()
    observed = counts.flatten()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue)


SAMPLINGS = [SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.0, top_p=0.8)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["T0.7", "T1", "T1-top_p0.8"])
def test_eagle2_sampling_matches_target(setup, sampling):
    engine, prompt = setup
    probs = exact_pairs(engine, prompt, sampling)
    counts, accept_rate = sample_pairs(engine, prompt, "eagle2", sampling)
    assert accept_rate > 0.3, "x2 must often come from an accepted draft, or the test checks nothing"
    assert gof_pvalue(counts, probs) > P_MIN


def test_vanilla_sampling_matches_target(setup):
    engine, prompt = setup
    sampling = SamplingConfig(temperature=1.0, top_k=6)
    counts, _ = sample_pairs(engine, prompt, "vanilla", sampling)
    assert gof_pvalue(counts, exact_pairs(engine, prompt, sampling)) > P_MIN


def test_broken_acceptance_is_caught(setup, monkeypatch):
    """Always accepting the draft's first guess at the root biases the output; χ² must reject it."""
    engine, prompt = setup

    def first_child_always(tree, drawn):
        drawn = drawn.clone()
        drawn[0] = tree.tokens[1]  # pretend the target drew the root's first child
        return accept(tree, drawn)

    monkeypatch.setattr(decode_module, "accept", first_child_always)
    sampling = SamplingConfig(temperature=1.0)
    counts, _ = sample_pairs(engine, prompt, "eagle2", sampling)
    assert gof_pvalue(counts, exact_pairs(engine, prompt, sampling)) < P_MIN
