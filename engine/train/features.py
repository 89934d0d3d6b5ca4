"""The target's features and the shard files that hold them: a shard concatenates sequences (prompt plus
answer ids, the target's final-norm hidden states, offsets, where each answer starts, its temperature)."""

import itertools
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.verify import base_model


def stored_temperatures(keys, get_tensor, count: int) -> list[float]:
    """A shard's answer temperature per sequence; shards written before temperatures were stored are greedy."""
    return get_tensor("temperature").tolist() if "temperature" in keys else [0.0] * count


def answered_prompts(data_dir: Path, with_temperature: bool = False) -> set:
    """Prompt ids (chat template applied) of every sequence stored in the run's shards; with
    `with_temperature`, (prompt ids, temperature) pairs."""
    done = set()
    for path in data_dir.glob("shard_*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            ids, off = f.get_tensor("input_ids").tolist(), f.get_tensor("offsets").tolist()
            starts = f.get_tensor("answer_start").tolist()
            temps = stored_temperatures(f.keys(), f.get_tensor, len(starts))
        prompts = (tuple(ids[a : a + n]) for a, n in zip(off, starts))
        done.update(zip(prompts, temps) if with_temperature else prompts)
    return done


@torch.no_grad()
def shard_tensors(
    model, records: list[tuple[list[int], list[int]]], batch_tokens: int = 8192
) -> dict[str, torch.Tensor]:
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
                ids, features = t["input_ids"][a:b], t["features"][a:b]
                seqs.append({"ids": ids, "features": features, "answer_start": start, "temperature": temp})
    return seqs


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
