"""The EAGLE-3 recipe (arXiv 2503.01840), beside the EAGLE-1/2 recipe of engine/train/fit.py.

- Input features: three residual streams of the target (the inputs of layers 2, L//2 and L-3),
  concatenated, recomputed from the stored token ids by one batched target forward per training batch.
- Training-time test: `FitConfig.unroll` draft steps per position; steps after the first read the head's
  own pre-norm output, with the attention pattern drafting gives it (`fit.unrolled_predictions`).
- Loss: cross-entropy of the head's distribution over its draft vocabulary against the target's
  next-token distribution restricted to that vocabulary, over positions whose target argmax lies in it;
  step s weighted 0.8^s; no feature-regression term.
- The head's own `norm` and `lm_head` start as copies of the target's final norm and of its lm_head rows
  for the draft vocabulary.
"""

import torch
import torch.nn.functional as F

from engine.checkpoint import target_layers
from engine.head import Eagle3Head, head_config_for
from engine.train.unroll import record, scored_steps, unrolled_predictions
from engine.verify import base_model

STEP_DECAY = 0.8  # weight of draft step s is STEP_DECAY ** s


def new_head(model, vocab: torch.Tensor | None) -> Eagle3Head:
    """A fresh EAGLE-3 head for `model` drafting from `vocab` (target ids, sorted; None: all)."""
    lm = model.get_output_embeddings().weight.detach()
    rows = lm if vocab is None else lm[vocab.to(lm.device)]
    config = head_config_for(model, bias=False) | {
        "architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": rows.shape[0],
    }  # fmt: skip
    head = Eagle3Head(config).float()
    head.target_layers = target_layers(config, int(model.config.num_hidden_layers), "a new head")
    if max(head.target_layers) >= model.config.num_hidden_layers:
        raise ValueError("training reads layer inputs: the last layer's output is not one of them")
    with torch.no_grad():
        head.lm_head.weight.copy_(rows.float())
        head.norm.weight.copy_(base_model(model).norm.weight.detach().float())
    head.draft_vocab = None if vocab is None else vocab.cpu()
    return head


def collate(group: list[dict], device, prompt_loss: bool = True) -> dict[str, torch.Tensor]:
    """Token ids (b, T) right-padded with their attention mask, and the loss mask over pairs (b, T-1):
    pair i is (feature_i, token_{i+1}) and predicts token i+2, as in `fit.collate`."""
    width = max(len(s["ids"]) for s in group)
    ids = torch.zeros(len(group), width, dtype=torch.long)
    attention = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros(len(group), width - 1, dtype=torch.bool)
    for r, s in enumerate(group):
        n = len(s["ids"])
        ids[r, :n] = s["ids"]
        attention[r, :n] = 1
        first = 0 if prompt_loss else max(s["answer_start"] - 2, 0)
        mask[r, first : n - 1] = True
    return {k: v.to(device) for k, v in dict(ids=ids, attention=attention, mask=mask).items()}


@torch.no_grad()
def target_signals(model, layers: tuple[int, ...], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused features of pairs (b, T-1, 3H) and the target's final-norm hidden state that follows
    each pair's token (b, T-1, H)."""
    out = base_model(model)(input_ids=batch["ids"], attention_mask=batch["attention"], output_hidden_states=True)
    streams = torch.cat([out.hidden_states[i] for i in layers], dim=-1)  # hidden_states[i]: input of layer i
    return streams[:, :-1].float(), out.last_hidden_state[:, 1:]


def loss(head: Eagle3Head, embed, lm_weight, batch, cfg, noise: bool, model) -> tuple[torch.Tensor, dict]:
    """The EAGLE-3 loss (module docstring); `lm_weight` (Vd, H) are the target's rows for the draft
    vocabulary. Stats use fit.eagle_loss's names: ce, acc for step 1, acc_s and rows_s per step."""
    del noise  # the EAGLE-3 recipe feeds the target's features as they are
    feats, following = target_signals(model, head.target_layers, batch)
    preds = unrolled_predictions(head, embed(batch["ids"][:, 1:]).float(), feats, max(cfg.unroll, 1))
    m = batch["mask"]
    hidden = following[m]  # (k, H)
    with torch.no_grad():
        draft_logits = F.linear(hidden.to(lm_weight.dtype), lm_weight).float()  # (k, Vd)
        full_best = model.get_output_embeddings()(hidden).float().amax(dim=-1)  # (k,)
        in_vocab = draft_logits.amax(dim=-1) >= full_best  # the target's argmax is draftable
        target_p = torch.softmax(draft_logits, dim=-1)
    total, stats = 0.0, {}
    for step, rows, pred_m in scored_steps(preds, m, stats):
        logp = F.log_softmax(head.lm_head(head.norm(pred_m)).float(), dim=-1)  # (k, Vd)
        tp, keep = target_p[rows], in_vocab[rows].float()
        ce = -((tp * logp).sum(-1) * keep).sum() / keep.sum().clamp(min=1)
        total = total + STEP_DECAY**step * ce
        record(stats, step, (logp.argmax(-1) == tp.argmax(-1)).float().mean(), ce=ce)
    return total, stats
