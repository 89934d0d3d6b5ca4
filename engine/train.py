"""Draft-head training: self-distillation data, target features, the EAGLE loss, export.

One command runs every stage and resumes where it stopped:

    python -m engine.train --prompts ../shared/data/train_prompts/prompts.jsonl --run runs/smollm2 \
        --export assets/heads/smollm2-135m-instruct

Stages (each writes small files under --run, so a killed job loses at most one shard or one
checkpoint interval):
  1. data:     prompts -> the target's own answers through its chat template (batched; greedy, and
               sampled at each extra --temperatures value), and the target's final-norm hidden states
               for every token, in safetensors shards.
  2. fit:      the EAGLE loss: SmoothL1(predicted next feature, true next feature)
               + ce_weight * cross-entropy against the target's next-token distribution, with uniform
               noise on input features; AdamW, warm-up + cosine schedule, a held-out split. With
               --unroll S, S draft steps per position, later ones fed the head's own predictions.
               --init fine-tunes an existing head instead of a fresh one.
  3. export:   the official EAGLE layout (config.json + model.safetensors) plus a card (README.md).
Benchmark questions must never be used here; `--prompts` refuses files from a benchmarks folder.
"""

import argparse
import itertools
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.cli import add_engine_arguments, model_spec
from engine.head import DraftHead, head_config_for, save_head, weights_digest
from engine.verify import base_model


@dataclass(frozen=True)
class DataConfig:
    limit: int = 2000  # prompts to answer (0: answer none, train on the run's shards as they are)
    max_prompt_tokens: int = 256
    max_new_tokens: int = 256
    batch_size: int = 48
    shard_size: int = 96  # prompts per shard file
    shuffle_seed: int = 0
    temperatures: str = "0"  # answer every prompt once per temperature, e.g. "0,1" (0: greedy)
    feature_batch_tokens: int = 8192  # tokens per forward when storing features
    data_minutes: float = 0.0  # time budget: start no shard that would end past it (0: none)


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


# ---- stage 1: data ----------------------------------------------------------------------------


def read_prompts(path: Path, max_source_share: float = 1.0, seed: int = 0, sources: tuple[str, ...] = ()) -> list[str]:
    """Prompts from a jsonl file. With `sources`, only rows whose `source` starts with one of those
    prefixes. With `max_source_share` < 1, no `source` keeps more than that share of the prompts (the
    shared set is 56% GSM8K, which skews a head towards math)."""
    if "benchmarks" in Path(path).resolve().parts:
        raise ValueError(f"{path} is a benchmark file; never train a draft head on benchmark questions")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append((row.get("source", ""), row.get("prompt") or row["turns"][0]))
    if sources:
        rows = [(src, prompt) for src, prompt in rows if src.startswith(tuple(sources))]
        if not rows:
            raise ValueError(f"no prompt in {path} has a source starting with {', '.join(sources)}")
    if max_source_share < 1.0:
        random.Random(seed).shuffle(rows)
        sources = {src for src, _ in rows}
        cap = max(1, int(max_source_share * len(rows)))
        # the cap applies to the total after capping: shrink it until no source exceeds its share
        while True:
            counts = {src: min(cap, sum(1 for s, _ in rows if s == src)) for src in sources}
            total = sum(counts.values())
            new_cap = max(1, int(max_source_share * total))
            if new_cap >= cap:
                break
            cap = new_cap
        kept, seen = [], dict.fromkeys(sources, 0)
        for src, prompt in rows:
            if seen[src] < cap:
                seen[src] += 1
                kept.append((src, prompt))
        rows = kept
    return [prompt for _, prompt in rows]


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def now() -> float:
    """Wall clock for the time budgets (a function, so tests can drive it)."""
    return time.time()


def parse_temperatures(text: str) -> list[float]:
    temps = [float(t) for t in str(text).split(",") if t.strip()]
    if not temps or not all(math.isfinite(t) and t >= 0 for t in temps) or len(set(temps)) != len(temps):
        raise ValueError(f"--temperatures wants distinct non-negative numbers such as 0 or 0,1; got {text!r}")
    return temps


@torch.no_grad()
def generate_data(model, tokenizer, prompts: list[str], run: Path, cfg: DataConfig) -> None:
    """Answer prompts with the target (batched; greedy at temperature 0, else sampled) and store ids +
    features per shard.

    Takes the first `cfg.limit` prompts of a seeded shuffle and answers each once per temperature,
    skipping (prompt, temperature) pairs already in the run's shards, so rerunning resumes, and a rerun
    with another prompt selection (a larger limit, other sources, another temperature) adds to the same
    run without answering anything twice. Sampled answers widen the contexts the head sees to those of
    sampled decoding; the training targets stay the target's own distributions either way."""
    data_dir = run / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    temps = parse_temperatures(cfg.temperatures)
    if cfg.limit <= 0:
        return
    answered = answered_prompts(data_dir, with_temperature=True)
    rng = random.Random(cfg.shuffle_seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    selected, jobs = 0, []
    for i in order:
        ids = chat_prompt_ids(tokenizer, prompts[i])
        if len(ids) > cfg.max_prompt_tokens:
            continue
        selected += 1
        for temp in temps:
            if (tuple(ids), temp) not in answered:
                answered.add((tuple(ids), temp))  # the prompt file may repeat a prompt
                jobs.append((ids, temp))
        if selected == cfg.limit:
            break
    first = len(list(data_dir.glob("shard_*.safetensors")))
    shards = [jobs[i : i + cfg.shard_size] for i in range(0, len(jobs), cfg.shard_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_set = set(eos) if isinstance(eos, list) else {eos}
    done = selected * len(temps) - len(jobs)
    bar = tqdm(total=len(jobs), desc=f"answering prompts ({done} answers already stored)", unit="answer")
    started, slowest = now(), 0.0
    for s, shard in enumerate(shards, start=first):
        elapsed = now() - started
        if cfg.data_minutes and elapsed + slowest > cfg.data_minutes * 60:
            bar.write(f"data time budget ({cfg.data_minutes} min) reached: stopping after {s - first} new shards")
            break
        path = data_dir / f"shard_{s:05d}.safetensors"
        records = []
        for ti, temp in enumerate(temps):
            part = sorted((ids for ids, t in shard if t == temp), key=len)
            for b in range(0, len(part), cfg.batch_size):
                batch = part[b : b + cfg.batch_size]
                width = max(map(len, batch))
                input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=model.device)
                attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=model.device)
                sampling = dict(do_sample=True, temperature=temp, top_k=0, top_p=1.0) if temp > 0 else dict(do_sample=False)
                torch.manual_seed(((cfg.shuffle_seed * 100_003 + s) * 1_009 + b) * 31 + ti)  # reproducible sampled answers
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention, max_new_tokens=cfg.max_new_tokens,
                    pad_token_id=pad, eos_token_id=eos, **sampling,
                )
                for x, row in zip(batch, out[:, width:].tolist()):
                    answer = []
                    for t in row:
                        answer.append(t)
                        if t in eos_set:
                            break
                    records.append((x, answer, temp))
                bar.update(len(batch))
        tensors = shard_tensors(model, [(x, a) for x, a, _ in records], cfg.feature_batch_tokens)
        tensors["temperature"] = torch.tensor([t for _, _, t in records], dtype=torch.float64)
        save_file(tensors, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").rename(path)
        slowest = max(slowest, now() - started - elapsed)
    bar.close()


def stored_temperatures(keys, get_tensor, count: int) -> list[float]:
    """A shard's answer temperature per sequence; shards written before temperatures were stored are greedy."""
    return get_tensor("temperature").tolist() if "temperature" in keys else [0.0] * count


def answered_prompts(data_dir: Path, with_temperature: bool = False) -> set:
    """Prompt ids (chat template applied) of every sequence stored in the run's shards; with
    `with_temperature`, (prompt ids, temperature) pairs."""
    done = set()
    for path in data_dir.glob("shard_*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            ids, off, starts = f.get_tensor("input_ids").tolist(), f.get_tensor("offsets").tolist(), f.get_tensor("answer_start").tolist()
            temps = stored_temperatures(f.keys(), f.get_tensor, len(starts))
        prompts = (tuple(ids[a : a + n]) for a, n in zip(off, starts))
        done.update(zip(prompts, temps) if with_temperature else prompts)
    return done


@torch.no_grad()
def shard_tensors(model, records: list[tuple[list[int], list[int]]], batch_tokens: int = 8192) -> dict[str, torch.Tensor]:
    """Concatenate sequences; features are the target's final-norm hidden states (bf16).

    Sequences of similar length share a forward (right-padded, masked): causal attention means the
    padding never reaches a real position."""
    base = base_model(model)
    seqs = [prompt + answer for prompt, answer in records]
    lengths = [len(seq) for seq in seqs]
    hidden: list[torch.Tensor | None] = [None] * len(seqs)
    for group in pack(sorted(range(len(seqs)), key=lengths.__getitem__), lengths, batch_tokens):
        width = max(lengths[i] for i in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, i in enumerate(group):
            ids[r, : lengths[i]] = torch.tensor(seqs[i])
            mask[r, : lengths[i]] = 1
        out = base(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
        out = out.to(torch.bfloat16).cpu()
        for r, i in enumerate(group):
            hidden[i] = out[r, : lengths[i]]
    return {
        "input_ids": torch.tensor([t for seq in seqs for t in seq], dtype=torch.long),
        "features": torch.cat(hidden),
        "offsets": torch.tensor([0, *itertools.accumulate(lengths)]),
        "answer_start": torch.tensor([len(prompt) for prompt, _ in records]),
    }


def load_sequences(run: Path) -> list[dict]:
    seqs = []
    for path in sorted((run / "data").glob("shard_*.safetensors")):
        t = load_file(str(path))
        off, starts = t["offsets"].tolist(), t["answer_start"].tolist()
        temps = stored_temperatures(t.keys(), t.__getitem__, len(starts))
        for i, (start, temp) in enumerate(zip(starts, temps)):
            a, b = off[i], off[i + 1]
            if b - a >= 3:
                seqs.append({"ids": t["input_ids"][a:b], "features": t["features"][a:b], "answer_start": start, "temperature": temp})
    return seqs


# ---- stage 2: fit -----------------------------------------------------------------------------


def pack(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Cut `order` into consecutive groups whose padded size (longest x count) stays within `budget`."""
    groups, cur, width = [], [], 0
    for i in order:
        if cur and max(width, lengths[i]) * (len(cur) + 1) > budget:
            groups.append(cur)
            cur, width = [], 0
        cur.append(i)
        width = max(width, lengths[i])
    if cur:
        groups.append(cur)
    return groups


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


def unrolled_predictions(head: DraftHead, embeds: torch.Tensor, feats: torch.Tensor, steps: int) -> list[torch.Tensor]:
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
    position = torch.arange(m.shape[1], device=m.device).expand_as(m)[m]  # (k,)
    total, stats = 0.0, {}
    for step, pred in enumerate(preds):
        rows = position >= step
        stats[f"rows_{step + 1}"] = int(rows.sum())
        if not stats[f"rows_{step + 1}"]:
            continue
        pred_m, tgt, tp = pred[m][rows], target_m[rows], target_p[rows]
        reg = F.smooth_l1_loss(pred_m, tgt)
        logp = F.log_softmax(F.linear(pred_m.to(lm_weight.dtype), lm_weight).float(), dim=-1)  # (k, V)
        ce = -(tp * logp).sum(-1).mean()
        acc = (logp.argmax(-1) == tp.argmax(-1)).float().mean()
        total = total + (reg + cfg.ce_weight * ce) / len(preds)
        if step == 0:
            stats.update(reg=reg.item(), ce=ce.item(), acc=acc.item())
        else:
            stats[f"acc_{step + 1}"] = acc.item()
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
    if init is None:
        head, origin = DraftHead(head_config_for(model)).float(), "fresh"
    else:
        if init.embed_tokens is not None:
            raise ValueError("--init: this head carries its own embed_tokens; fine-tuning trains with the target's embeddings")
        head = DraftHead(init.config_dict).float()
        head.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
        origin = "init " + weights_digest(init)[:12]
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
    start = now()

    def record_eval(at: int, extra: dict) -> None:
        ev = evaluate_loss(head, embed, lm_weight, held, cfg)
        history.append({"step": at, **extra, **ev, "elapsed_s": now() - start})
        log(json.dumps(history[-1]))
        with open(run / "train_log.jsonl", "a") as f:
            f.write(json.dumps(history[-1]) + "\n")
        if ev and ev["heldout_score"] >= max(h.get("heldout_score", 0.0) for h in history):
            torch.save(head.state_dict(), run / "best.pt")

    def save_checkpoint() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "history": json.dumps(history), "origin": origin}, tmp)
        tmp.rename(ckpt)

    while step < cfg.steps:
        if cfg.fit_minutes and now() - start > cfg.fit_minutes * 60:
            log(f"training time limit ({cfg.fit_minutes} min) reached at step {step} of {cfg.steps}; stopping early")
            if not history or history[-1]["step"] != step:
                record_eval(step, {"stopped_early": True})
            save_checkpoint()
            break
        batch = collate(next(stream), device, cfg.prompt_loss)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss, stats = eagle_loss(head, embed, lm_weight, batch, cfg, noise=True)
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


@torch.no_grad()
def evaluate_loss(head, embed, lm_weight, held: list[dict], cfg: FitConfig) -> dict:
    """Held-out stats, token-weighted, in batches of about cfg.batch_tokens; `heldout_score` (the
    mean accuracy over the trained draft steps) picks the best checkpoint."""
    if not held:
        return {}
    head.eval()
    sums, weights = defaultdict(float), defaultdict(int)
    for group in pack(sorted(range(len(held)), key=lambda i: len(held[i]["ids"])), [len(s["ids"]) for s in held], cfg.batch_tokens):
        batch = collate([held[i] for i in group], lm_weight.device, cfg.prompt_loss)
        _, stats = eagle_loss(head, embed, lm_weight, batch, cfg, noise=False)
        for k, v in stats.items():
            if not k.startswith("rows_"):
                n = stats["rows_" + (k.rsplit("_", 1)[1] if k.startswith("acc_") else "1")]  # the step's own rows
                sums[k] += v * n
                weights[k] += n
    head.train()
    out = {f"heldout_{k}": v / weights[k] for k, v in sums.items() if weights[k]}
    out["heldout_score"] = sum(v for k, v in out.items() if k.startswith("heldout_acc")) / max(cfg.unroll, 1)
    return out


def answer_token_counts(seqs: list[dict], vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        counts += torch.bincount(s["ids"][s["answer_start"] :], minlength=vocab_size)
    return counts


def vocabulary_coverage(counts: torch.Tensor, vocab: torch.Tensor) -> float:
    """The share of answer tokens a draft vocabulary holds."""
    return float(counts[vocab].sum() / counts.sum().clamp(min=1))


def draft_vocabulary(seqs: list[dict], size: int, vocab_size: int, always: set[int]) -> tuple[torch.Tensor, float]:
    """The `size` most frequent answer tokens plus `always` (e.g. EOS), sorted; and their coverage."""
    counts = answer_token_counts(seqs, vocab_size)
    top = counts.topk(min(size, vocab_size)).indices
    vocab = torch.unique(torch.cat([top, torch.tensor(sorted(always), dtype=torch.long)]))  # sorted
    return vocab, vocabulary_coverage(counts, vocab)


# ---- stage 3: export --------------------------------------------------------------------------


def export(head: DraftHead, path: Path, card: dict) -> None:
    save_head(head.to(torch.bfloat16), path)
    lines = [
        f"# EAGLE draft head for {card['target']}",
        "",
        "Official EAGLE layout: `config.json` (Llama keys, 1 layer) + `model.safetensors` "
        "(fc, one decoder layer without input layernorm; embeddings and lm_head are the target's).",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in card.items() if k != "command"]
    lines += ["", "Reproduce:", "", "```", card["command"], "```", ""]
    (path / "README.md").write_text("\n".join(lines))


FLAG_HELP = {
    "temperatures": "answer every prompt once per temperature, e.g. 0,1 (0: greedy; sampled answers widen the "
    "contexts the head sees to those of sampled decoding)",
    "data_minutes": "time budget of the data stage: no shard starts that would end past it (0: none)",
    "feature_batch_tokens": "tokens per target forward when storing features (raise it on a GPU)",
    "unroll": "draft steps trained per position; steps after the first read the head's own predicted features, "
    "as drafting does (HASS / EAGLE-3 style)",
    "fit_minutes": "stop training after this many minutes, keeping the best checkpoint (0: none); the learning-rate "
    "schedule still spans --steps, so size --steps to the time",
    "limit": "prompts to answer (0: answer none and train on the run's shards)",
}


def main(argv=None) -> None:
    from engine.head import load_head
    from engine.models import load_target

    p = argparse.ArgumentParser(description="Train an EAGLE draft head for a target model (resumable).")
    p.add_argument("--prompts", required=True, help="jsonl with a 'prompt' field per line (never benchmark questions)")
    p.add_argument("--run", required=True, type=Path, help="working folder for data shards and checkpoints")
    p.add_argument("--export", type=Path, help="write the trained head here (official EAGLE layout + card)")
    add_engine_arguments(p, head=False)  # the head is the one being trained (--init, --export)
    p.add_argument(
        "--max-source-share", type=float, default=1.0,
        help="cap each prompt source (the jsonl 'source' field) at this share of the prompts, e.g. 0.25; default 1 (no cap)",
    )
    p.add_argument(
        "--sources", default="",
        help="comma-separated prefixes of the jsonl 'source' field to keep, e.g. self-instruct (default: all)",
    )
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft only the N most frequent answer tokens (0: full vocabulary)")
    p.add_argument(
        "--init", type=Path, default=None, metavar="HEAD",
        help="fine-tune this head (official EAGLE layout) instead of training a fresh one; keeps its draft vocabulary",
    )
    for name, cfg_cls in (("data", DataConfig), ("fit", FitConfig)):
        for k, v in asdict(cfg_cls()).items():
            flag, help_ = f"--{k.replace('_', '-')}", f"{name}: {FLAG_HELP[k] + '; ' if k in FLAG_HELP else ''}default {v}"
            if isinstance(v, bool):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=v, help=help_)
            else:
                p.add_argument(flag, type=type(v), default=v, help=help_)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_cfg = DataConfig(**{k: getattr(args, k) for k in asdict(DataConfig())})
    fit_cfg = FitConfig(**{k: getattr(args, k) for k in asdict(FitConfig())})
    args.run.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_target(model_spec(args))
    init = load_head(args.init, model, dtype=torch.float32) if args.init else None  # before hours of data
    started = time.time()
    generate_data(model, tokenizer, read_prompts(args.prompts, args.max_source_share, sources=tuple(filter(None, args.sources.split(",")))), args.run, data_cfg)
    seqs = load_sequences(args.run)
    n_tokens = sum(len(s["ids"]) - s["answer_start"] for s in seqs)
    print(f"{len(seqs)} sequences, {n_tokens} answer tokens", file=sys.stderr)
    vocab, coverage = None, 1.0
    if init is not None and init.draft_vocab is not None:  # a fine-tune keeps the head's vocabulary
        vocab = init.draft_vocab.cpu()
        coverage = vocabulary_coverage(answer_token_counts(seqs, model.config.vocab_size), vocab)
        print(f"draft vocabulary of {args.init}: {len(vocab)} tokens cover {coverage:.1%} of answer tokens", file=sys.stderr)
    elif init is None and args.draft_vocab:
        eos = model.generation_config.eos_token_id
        always = {eos} if isinstance(eos, int) else set(eos or [])
        vocab, coverage = draft_vocabulary(seqs, args.draft_vocab, model.config.vocab_size, always)
        print(f"draft vocabulary: {len(vocab)} tokens cover {coverage:.1%} of answer tokens", file=sys.stderr)
    head = fit(model, seqs, args.run, fit_cfg, log=lambda m: print(m, file=sys.stderr), vocab=vocab, init=init)
    head.draft_vocab = vocab
    if args.export:
        best = max(head.history, key=lambda h: h.get("heldout_score", 0.0)) if head.history else {}
        steps_acc = ", ".join(f"step {k.rsplit('_', 1)[1]} {v:.3f}" for k, v in best.items() if k.startswith("heldout_acc_"))
        card = {
            "target": Path(getattr(model.config, "_name_or_path", "") or model.config.model_type).name,
            "data": f"{len(seqs)} self-distilled answers ({n_tokens} tokens) to prompts from {Path(args.prompts).name}"
            + " (" + ", ".join(f"{n} at T={t:g}" for t, n in sorted(Counter(s["temperature"] for s in seqs).items())) + ")",
            "steps": fit_cfg.steps if not head.history or head.history[-1]["step"] >= fit_cfg.steps
            else f"{head.history[-1]['step']} of {fit_cfg.steps} (stopped by --fit-minutes {fit_cfg.fit_minutes})",
            "batch tokens": fit_cfg.batch_tokens,
            "held-out next-token accuracy (best checkpoint)": f"{best.get('heldout_acc', float('nan')):.3f} at step {best.get('step')}"
            + (f" (draft steps fed the head's own features: {steps_acc})" if steps_acc else ""),
            "training draft steps (unroll)": fit_cfg.unroll,
            **({"fine-tuned from": str(args.init)} if args.init else {}),
            "draft vocabulary": f"{len(head.draft_vocab)} tokens ({coverage:.1%} of answer tokens)" if head.draft_vocab is not None else "full",
            "wall time (this run, all stages)": f"{(time.time() - started) / 60:.1f} min",
            "hardware": f"{torch.get_num_threads()} CPU threads" if model.device.type == "cpu" else str(model.device),
            "command": "python -m engine.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        export(head, args.export, card)
        print(f"exported head to {args.export}", file=sys.stderr)


if __name__ == "__main__":
    main()
