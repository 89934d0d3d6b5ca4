"""The draft vocabulary: the answer tokens a head drafts from (the most frequent ones, plus EOS)."""

import torch


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
