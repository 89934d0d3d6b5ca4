"""Stage 1, data: training prompts, the target's own answers to them (greedy and sampled), and their
features stored in safetensors shards under the run folder (engine/train/features.py)."""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine.train import clock
from engine.train.features import answered_prompts, shard_tensors


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
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


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
    started, slowest = clock.now(), 0.0
    for s, shard in enumerate(shards, start=first):
        elapsed = clock.now() - started
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
                sampled = dict(do_sample=True, temperature=temp, top_k=0, top_p=1.0)
                sampling = sampled if temp > 0 else dict(do_sample=False)
                # reproducible sampled answers
                torch.manual_seed(((cfg.shuffle_seed * 100_003 + s) * 1_009 + b) * 31 + ti)
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
        slowest = max(slowest, clock.now() - started - elapsed)
    bar.close()
