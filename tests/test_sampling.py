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


def exact_tail(engine: Engine, prompt: list[int], sampling: SamplingConfig) -> torch.Tensor:
    """P(x2, x3) of a 3-token reply under the target, with the engine's processing. Index V means the
    reply had already ended (x1 or x2 was <eos>, id 0). (V + 1, V + 1)

    x1 comes from the prefill and x2 is drawn at the first tree's root; x3 is drawn at an accepted
    depth-1 node when the draft was right, so a wrong acceptance rule below the root shows here."""
    v = VOCAB
    with torch.no_grad():
        def probs(seqs):
            return processed_probs(engine.model(torch.tensor(seqs)).logits[:, -1].float(), sampling)

        p1 = probs([prompt])[0]  # (V,)
        p2 = probs([prompt + [a] for a in range(v)])  # (V, V)
        p3 = probs([prompt + [a, b] for a in range(v) for b in range(v)]).view(v, v, v)
    tail = torch.zeros(v + 1, v + 1)
    tail[v, v] = p1[0]
    for a in range(1, v):
        tail[0, v] += p1[a] * p2[a, 0]
        tail[1:v, :v] += p1[a] * p2[a, 1:, None] * p3[a, 1:]
    return tail


def sample_tail(engine, prompt, method, sampling, tree=TreeConfig(10, 3, 3), n=N):
    """Counts of (x2, x3) over n seeded replies, and the share of replies where cycle 1 accepted a draft."""
    counts = torch.zeros(VOCAB + 1, VOCAB + 1)
    accepted_draft = 0
    for seed in range(n):
        cfg = GenerationConfig(method=method, max_new_tokens=3, sampling=sampling, tree=tree, seed=seed)
        events = list(engine.generate(prompt, cfg))
        _, x2, x3 = (events[-1]["output_ids"] + [VOCAB, VOCAB])[:3]
        counts[x2, x3] += 1
        accepted_draft += any(len(e["accepted"]) > 1 for e in events if e["type"] == "cycle" and e["cycle"] == 1)
    return counts, accepted_draft / n


def gof_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = (probs * counts.sum()).flatten()
    observed = counts.flatten()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    expected = exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()
    return float(chisquare(obs[keep].numpy(), expected).pvalue)


SAMPLINGS = [
    SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.0, top_p=0.8)
]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["T0.7", "T1", "T1-top_p0.8"])
def test_eagle2_sampling_matches_target(setup, sampling):
    engine, prompt = setup
    probs = exact_tail(engine, prompt, sampling)
    counts, accept_rate = sample_tail(engine, prompt, "eagle2", sampling)
    assert accept_rate > 0.3, "x3 must often come from an accepted draft, or the test checks nothing"
    assert gof_pvalue(counts, probs) > P_MIN


def test_vanilla_sampling_matches_target(setup):
    engine, prompt = setup
    sampling = SamplingConfig(temperature=1.0, top_k=6)
    counts, _ = sample_tail(engine, prompt, "vanilla", sampling)
    assert gof_pvalue(counts, exact_tail(engine, prompt, sampling)) > P_MIN


def test_broken_acceptance_is_caught(setup, monkeypatch):
    """Always accepting the draft's first guess at the root biases the output; χ² must reject it."""
    engine, prompt = setup

    def first_child_always(tree, drawn):
        drawn = drawn.clone()
        drawn[0] = tree.tokens[1]  # pretend the target drew the root's first child
        return accept(tree, drawn)

    monkeypatch.setattr(decode_module, "accept", first_child_always)
    sampling = SamplingConfig(temperature=1.0)
    counts, _ = sample_tail(engine, prompt, "eagle2", sampling)
    assert gof_pvalue(counts, exact_tail(engine, prompt, sampling)) < P_MIN


def test_broken_acceptance_below_the_root_is_caught(setup, monkeypatch):
    """Accepting a depth-2 node without checking the draw at its depth-1 parent biases x3."""
    engine, prompt = setup

    def unchecked_below_root(tree, drawn):
        drawn = drawn.clone()
        deep = (tree.depths == 2).nonzero().flatten()
        drawn[tree.parents[deep]] = tree.tokens[deep]  # each depth-1 node pretends it drew one of its children
        return accept(tree, drawn)

    monkeypatch.setattr(decode_module, "accept", unchecked_below_root)
    sampling = SamplingConfig(temperature=1.0)
    counts, _ = sample_tail(engine, prompt, "eagle2", sampling)
    assert gof_pvalue(counts, exact_tail(engine, prompt, sampling)) < P_MIN
