"""The target's draw at each tree node: the filters' exact semantics, and the sampler's fit to them.

`processed_probs` is checked against a plain full-sort reference (so the nucleus search among the top
tokens, and its fallback to a full sort, change nothing), and `draw_tokens` against `processed_probs`
with a χ² test per row (fails below p = 1e-3) plus a hard check that no filtered token is ever drawn.
"""

import pytest
import torch
from scipy.stats import chisquare

from engine import verify
from engine.config import SamplingConfig
from engine.verify import draw_tokens, processed_probs

V = 40
DRAWS = 12_000


def reference_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p over a fully sorted vocabulary, written the obvious way."""
    out = torch.zeros_like(logits)
    for row, values in enumerate(logits / sampling.temperature):
        order = values.argsort(descending=True, stable=True)
        if sampling.top_k > 0:
            order = order[: sampling.top_k]
        probs = torch.softmax(values[order], dim=-1)
        kept, mass = 0, 0.0
        while kept < len(order) and (sampling.top_p >= 1.0 or mass < sampling.top_p):
            mass += float(probs[kept])
            kept += 1
        out[row, order[:kept]] = probs[:kept] / probs[:kept].sum()
    return out


def fit_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """χ² goodness of fit; cells expected below 5 draws are pooled into one."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    expected = exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()
    return float(chisquare(obs[keep].numpy(), expected).pvalue)


def logits_rows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, V, generator=gen) * 2.0
    logits[0, :10] = -1e4  # tokens no sampler may ever draw (probability 0 after softmax)
    logits[2] = torch.linspace(0.0, 1.0, V)  # a flat row: a wide nucleus
    return logits


SAMPLINGS = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.6, top_k=7),
    SamplingConfig(temperature=1.0, top_p=0.8),
    SamplingConfig(temperature=1.3, top_k=12, top_p=0.5),
]
IDS = ["T1", "T0.6-top_k7", "T1-top_p0.8", "T1.3-top_k12-top_p0.5"]


@pytest.mark.parametrize("probe", [V, 16, 4], ids=["whole-vocabulary", "probe-16", "probe-4"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_processed_probs_match_full_sort_reference(sampling, probe, monkeypatch):
    monkeypatch.setattr(verify, "NUCLEUS_PROBE", probe)
    logits = logits_rows()
    for rows in (logits, logits[:2], logits[1:2]):  # mixed batches, and peaked rows alone
        want = reference_probs(rows, sampling)
        torch.testing.assert_close(processed_probs(rows, sampling), want, atol=1e-6, rtol=1e-5)


def test_the_nucleus_probe_sorts_everything_only_when_a_row_needs_it(monkeypatch):
    monkeypatch.setattr(verify, "NUCLEUS_PROBE", 16)
    real, widths = verify._nucleus, []
    def recorded(logits, top_p, width):
        widths.append(width)
        return real(logits, top_p, width)

    monkeypatch.setattr(verify, "_nucleus", recorded)
    sampling = SamplingConfig(temperature=1.0, top_p=0.8)
    logits = logits_rows()
    processed_probs(logits[:2], sampling)  # peaked rows: their nuclei fit in 16 tokens
    assert widths == [16]
    widths.clear()
    processed_probs(logits, sampling)  # the flat row's nucleus does not: the whole batch is sorted
    assert widths == [16, V]


def test_ties_at_a_filter_boundary_are_all_kept():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    kept = processed_probs(logits, SamplingConfig(temperature=1.0, top_k=2))[0] > 0
    assert kept.tolist() == [True, True, True, True, False, False]  # the k-th value is shared by three tokens
    flat_tail = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).log()
    kept = processed_probs(flat_tail, SamplingConfig(temperature=1.0, top_p=0.5))[0] > 0
    assert kept.tolist() == [True, True, True, True]  # 0.4 + 0.2 reaches 0.5; the other 0.2s tie with it


@pytest.mark.parametrize("u, want", [(0.0, "first"), (1.0 - 2.0**-53, "last")])
def test_the_extreme_uniform_draws_pick_the_first_and_last_kept_tokens(u, want, monkeypatch):
    logits = torch.tensor([[-1e4, 1.0, 2.0, 3.0, 2.5, -1e4]])  # tokens 0 and 5 have probability 0
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(*shape, u, dtype=kw.get("dtype")))
    token = int(draw_tokens(logits, SamplingConfig(temperature=1.0), None))
    assert token == {"first": 1, "last": 4}[want]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_draws_fit_the_processed_distribution(sampling):
    logits = logits_rows()
    probs = processed_probs(logits, sampling)
    gen = torch.Generator().manual_seed(0)
    draws = draw_tokens(logits.repeat_interleave(DRAWS, dim=0), sampling, gen).view(len(logits), DRAWS)
    for row in range(len(logits)):
        counts = torch.bincount(draws[row], minlength=V).double()
        assert counts[probs[row] == 0].sum() == 0, f"row {row} drew a token the filters removed"
        pvalue = fit_pvalue(counts, probs[row])
        assert pvalue > 1e-3, f"row {row}: draws do not fit the processed distribution (p = {pvalue:.2e})"


def test_a_biased_sampler_fails_the_fit():
    """The fit has power: drawing from the distribution at a slightly wrong temperature is rejected."""
    sampling = SamplingConfig(temperature=1.0)
    logits = logits_rows()
    probs = processed_probs(logits, sampling)
    gen = torch.Generator().manual_seed(0)
    draws = draw_tokens(logits.repeat_interleave(DRAWS, dim=0) * 1.15, sampling, gen).view(len(logits), DRAWS)
    counts = torch.bincount(draws[1], minlength=V).double()
    assert fit_pvalue(counts, probs[1]) < 1e-3


def test_greedy_is_argmax_and_same_seed_same_draws():
    logits = logits_rows()
    assert draw_tokens(logits, SamplingConfig(0.0), None).tolist() == logits.argmax(dim=-1).tolist()
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    first = draw_tokens(logits, sampling, torch.Generator().manual_seed(7))
    again = draw_tokens(logits, sampling, torch.Generator().manual_seed(7))
    assert first.tolist() == again.tolist()
