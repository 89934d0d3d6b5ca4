"""Training-time test: several draft steps per position in one pass, each step reading the head's own
output from the step before, with the attention pattern drafting gives it (used by both recipes)."""

import torch

from engine.head import DraftHead, Eagle3Head


class UnrolledKeys:
    """Stands in for the head's KV cache while training several draft steps at once (as HASS and
    EAGLE-3's training-time test do).

    Step s (0-based) feeds every position i the head's own step s-1 prediction for position i, so its
    query must see what drafting would have in its cache: true-feature keys (step 0) up to position
    i - s, the root of that chain, then step m's key at position i - s + m for m = 1..s. Keys of all
    steps are kept; `mask(s)` spells that pattern over their concatenation."""

    def __init__(self, length: int, device):
        self.t, self.device = length, device
        self.keys, self.values = [], []

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.append(k)
        self.values.append(v)
        return torch.cat(self.keys, dim=2), torch.cat(self.values, dim=2)

    def mask(self, step: int) -> torch.Tensor:  # bool (1, 1, t, (step + 1) * t)
        i = torch.arange(self.t, device=self.device)[:, None]
        j = torch.arange(self.t, device=self.device)[None, :]
        blocks = [j <= i - step] + [j == i - step + m for m in range(1, step + 1)]
        return torch.cat(blocks, dim=1)[None, None]


def unrolled_predictions(
    head: DraftHead | Eagle3Head, embeds: torch.Tensor, feats: torch.Tensor, steps: int
) -> list[torch.Tensor]:
    """The head's predicted next features for `steps` draft steps, each (b, t, H).

    Step 0 reads the true features (teacher forcing). Step s >= 1 at position i reads the step s-1
    prediction for position i, which drafting would feed it at depth s below a root at i - s; it is
    only meaningful for i >= s."""
    b, t, _ = feats.shape
    positions = torch.arange(t, device=feats.device).expand(b, t)
    keys = UnrolledKeys(t, feats.device)
    preds = []
    for step in range(steps):
        pred = head(embeds, feats, positions, keys.mask(step), keys)
        preds.append(pred)
        feats = torch.cat([torch.zeros_like(pred[:, :1]), pred[:, :-1]], dim=1)
    return preds


def scored_steps(preds: list[torch.Tensor], mask: torch.Tensor, stats: dict):
    """(step, rows, predictions) for every draft step with positions to score: `rows` (k,) selects the
    masked positions step s can score (it skips the first s), predictions are theirs (rows, H).
    Records `rows_s` in `stats`."""
    position = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)[mask]  # (k,)
    for step, pred in enumerate(preds):
        rows = position >= step
        stats[f"rows_{step + 1}"] = int(rows.sum())
        if stats[f"rows_{step + 1}"]:
            yield step, rows, pred[mask][rows]


def record(stats: dict, step: int, acc: torch.Tensor, **losses: torch.Tensor) -> None:
    """Step 1's numbers under the plain names (acc and the losses), later steps' accuracy as acc_s."""
    if step == 0:
        stats.update(acc=acc.item(), **{k: v.item() for k, v in losses.items()})
    else:
        stats[f"acc_{step + 1}"] = acc.item()
