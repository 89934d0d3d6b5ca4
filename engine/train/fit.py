"""Stage 2, fit: the EAGLE-1/2 loss (feature regression plus cross-entropy against the target's next-token
distribution, optionally unrolled over several draft steps), the resumable training loop, and the choice
of recipe (`FitConfig.recipe`: "eagle1", or "eagle3" from engine/train/eagle3.py)."""

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.head import DraftHead, head_config_for, weights_digest
from engine.train import clock, eagle3
from engine.train.features import pack
from engine.train.unroll import record, scored_steps, unrolled_predictions


@dataclass(frozen=True)
class FitConfig:
    steps: int = 6000
    batch_tokens: int = 2048  # sequences are packed into batches of about this many tokens
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.0
    ce_weight: float = 0.1
    noise: float = 0.1  # uniform noise amplitude on input features (EAGLE: U(-0.1, 0.1))
    unroll: int = 1  # draft steps trained per position; steps > 1 read the head's own predicted features
    prompt_loss: bool = True  # also learn on prompt positions (see collate)
    grad_clip: float = 0.5
    holdout: float = 0.05
    eval_every: int = 500
    save_every: int = 250
    seed: int = 0
    fit_minutes: float = 0.0  # stop early after this many minutes, keeping the best checkpoint (0: no limit)
    recipe: str = "eagle1"  # "eagle1": EAGLE-1/2 head and loss; "eagle3": EAGLE-3 (engine/train/eagle3.py)


RECIPES = ("eagle1", "eagle3")



def batches(seqs: list[dict], batch_tokens: int, rng: random.Random):
    """Endless stream of lists of sequences, about `batch_tokens` tokens each, similar lengths together."""
    while True:
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]["ids"]) + rng.random() * 64))
        groups = pack(order, [len(s["ids"]) for s in seqs], batch_tokens)
        rng.shuffle(groups)
        for g in groups:
            yield [seqs[i] for i in g]


def collate(group: list[dict], device, prompt_loss: bool = True) -> dict[str, torch.Tensor]:
    """Pairs (f_i, x_{i+1}) -> targets f_{i+1}.

    The loss covers the answer and, with `prompt_loss`, the prompt too: the regression target (the
    target's next feature) and the CE target (its next-token distribution) are properties of the
    target model on any text, so prompt positions are valid extra signal at no generation cost."""
    width = max(len(s["ids"]) for s in group) - 1
    b, h = len(group), group[0]["features"].shape[-1]
    tokens = torch.zeros(b, width, dtype=torch.long)
    feats = torch.zeros(b, width, h, dtype=torch.bfloat16)
    target = torch.zeros(b, width, h, dtype=torch.bfloat16)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for r, s in enumerate(group):
        n = len(s["ids"]) - 1
        tokens[r, :n] = s["ids"][1:]
        feats[r, :n] = s["features"][:-1]
        target[r, :n] = s["features"][1:]
        # f_{i+1} at position answer_start - 1 predicts the first answer token
        first = 0 if prompt_loss else max(s["answer_start"] - 2, 0)
        mask[r, first:n] = True
    return {k: v.to(device) for k, v in dict(tokens=tokens, feats=feats, target=target, mask=mask).items()}


def eagle_loss(head: DraftHead, embed, lm_weight, batch, cfg: FitConfig, noise: bool) -> tuple[torch.Tensor, dict]:
    """lm_weight (V or Vd, H): the target's lm_head rows the draft will score (its draft vocabulary).

    With cfg.unroll > 1 the loss is the mean over draft steps; stats report step 1's numbers under
    the plain names (reg, ce, acc) and step s's accuracy as acc_s, and rows_s counts the positions
    each step scored (step s skips the first s - 1)."""
    feats = batch["feats"].float()
    if noise:
        feats = feats + (torch.rand_like(feats) * 2 - 1) * cfg.noise
    preds = unrolled_predictions(head, embed(batch["tokens"]).float(), feats, max(cfg.unroll, 1))
    m = batch["mask"]
    target_m = batch["target"][m].float()  # (k, H)
    with torch.no_grad():
        target_p = torch.softmax(F.linear(target_m.to(lm_weight.dtype), lm_weight).float(), dim=-1)  # (k, V)
    total, stats = 0.0, {}
    for step, rows, pred_m in scored_steps(preds, m, stats):
        tgt, tp = target_m[rows], target_p[rows]
        reg = F.smooth_l1_loss(pred_m, tgt)
        logp = F.log_softmax(F.linear(pred_m.to(lm_weight.dtype), lm_weight).float(), dim=-1)  # (k, V)
        ce = -(tp * logp).sum(-1).mean()
        total = total + (reg + cfg.ce_weight * ce) / len(preds)
        record(stats, step, (logp.argmax(-1) == tp.argmax(-1)).float().mean(), reg=reg, ce=ce)
    return total, stats


def lr_at(step: int, cfg: FitConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def fit(
    model, seqs: list[dict], run: Path, cfg: FitConfig, log=print, vocab: torch.Tensor | None = None,
    init: DraftHead | None = None,
) -> DraftHead:
    """Train a fresh head, or fine-tune `init` (or resume run/ckpt.pt); returns the head with the best
    held-out score.

    With `vocab` (the draft vocabulary) the cross-entropy runs over those lm_head rows only, as
    drafting will; the full 49k-row softmax would dominate a CPU step."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    seqs = list(seqs)
    random.Random(cfg.seed).shuffle(seqs)
    n_hold = max(1, int(len(seqs) * cfg.holdout)) if len(seqs) > 1 else 0
    held, train = seqs[:n_hold], seqs[n_hold:] or seqs
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    lm_weight = lm_head.weight.detach() if vocab is None else lm_head.weight.detach()[vocab.to(lm_head.weight.device)]
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    if init is None:
        fresh = eagle3.new_head(model, vocab) if cfg.recipe == "eagle3" else DraftHead(head_config_for(model)).float()
        head, origin = fresh, "fresh"
    else:
        if init.embed_tokens is not None:
            raise ValueError(
                "--init: this head carries its own embed_tokens; fine-tuning trains with the target's embeddings"
            )
        if init.kind != cfg.recipe:
            raise ValueError(f"--init: this is an {init.kind} head; train it with --recipe {init.kind}")
        head = type(init)(init.config_dict).float()
        head.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
        head.target_layers, head.draft_vocab = init.target_layers, init.draft_vocab
        origin = "init " + weights_digest(init)[:12]
    collate_fn, loss_fn = recipe_parts(cfg, model)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    ckpt = run / "ckpt.pt"
    step, history = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("origin", "fresh") != origin:
            raise ValueError(
                f"{ckpt} holds a run that started from another head ({state.get('origin', 'fresh')}, not {origin}); "
                "use a fresh --run folder (the data shards can be shared: link or copy its data/ folder)"
            )
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step, history = int(state["step"]), json.loads(state["history"])
        log(f"resuming from {ckpt} at step {step}")
    device = lm_head.weight.device
    head.to(device).train()
    stream = batches(train, cfg.batch_tokens, rng)
    for _ in range(step):  # replay the data order so a resumed run sees what a straight run would
        next(stream)
    bar = tqdm(total=cfg.steps, initial=step, desc="training head", unit="step")
    start = clock.now()

    def record_eval(at: int, extra: dict) -> None:
        ev = evaluate_loss(head, embed, lm_weight, held, cfg, collate_fn, loss_fn)
        history.append({"step": at, **extra, **ev, "elapsed_s": clock.now() - start})
        log(json.dumps(history[-1]))
        with open(run / "train_log.jsonl", "a") as f:
            f.write(json.dumps(history[-1]) + "\n")
        if ev and ev["heldout_score"] >= max(h.get("heldout_score", 0.0) for h in history):
            torch.save(head.state_dict(), run / "best.pt")

    def save_checkpoint() -> None:
        tmp = ckpt.with_suffix(".tmp")
        state = {
            "head": head.state_dict(), "opt": opt.state_dict(), "step": step, "history": json.dumps(history),
            "origin": origin,
        }  # fmt: skip
        torch.save(state, tmp)
        tmp.rename(ckpt)

    while step < cfg.steps:
        if cfg.fit_minutes and clock.now() - start > cfg.fit_minutes * 60:
            log(f"training time limit ({cfg.fit_minutes} min) reached at step {step} of {cfg.steps}; stopping early")
            if not history or history[-1]["step"] != step:
                record_eval(step, {"stopped_early": True})
            save_checkpoint()
            break
        batch = collate_fn(next(stream), device, cfg.prompt_loss)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, stats = loss_fn(head, embed, lm_weight, batch, cfg, noise=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['acc']:.2f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            train_stats = {f"train_{k}": v for k, v in stats.items() if not k.startswith("rows_")}
            record_eval(step, {"train_loss": loss.item(), **train_stats})
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint()
    bar.close()
    if (run / "best.pt").exists():  # the held-out best, not merely the last step
        head.load_state_dict(torch.load(run / "best.pt", map_location="cpu", weights_only=True))
    head.eval()
    head.history = history
    return head


def recipe_parts(cfg: FitConfig, model):
    """(collate, loss) of the configured recipe."""
    if cfg.recipe == "eagle3":
        return eagle3.collate, partial(eagle3.loss, model=model)
    return collate, eagle_loss


@torch.no_grad()
def evaluate_loss(head, embed, lm_weight, held: list[dict], cfg: FitConfig, collate_fn=None, loss_fn=None) -> dict:
    """Held-out stats, token-weighted, in batches of about cfg.batch_tokens; `heldout_score` (the
    mean accuracy over the trained draft steps) picks the best checkpoint."""
    if not held:
        return {}
    head.eval()
    collate_fn, loss_fn = collate_fn or collate, loss_fn or eagle_loss
    sums, weights = defaultdict(float), defaultdict(int)
    lengths = [len(s["ids"]) for s in held]
    for group in pack(sorted(range(len(held)), key=lengths.__getitem__), lengths, cfg.batch_tokens):
        batch = collate_fn([held[i] for i in group], lm_weight.device, cfg.prompt_loss)
        _, stats = loss_fn(head, embed, lm_weight, batch, cfg, noise=False)
        for k, v in stats.items():
            if not k.startswith("rows_"):
                n = stats["rows_" + (k.rsplit("_", 1)[1] if k.startswith("acc_") else "1")]  # the step's own rows
                sums[k] += v * n
                weights[k] += n
    head.train()
    out = {f"heldout_{k}": v / weights[k] for k, v in sums.items() if weights[k]}
    out["heldout_score"] = sum(v for k, v in out.items() if k.startswith("heldout_acc")) / max(cfg.unroll, 1)
    return out
