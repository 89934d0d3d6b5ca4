"""The target's KV cache: committing the accepted path of a verified tree.

After verification the cache holds `past_len` committed entries followed by one entry per tree node.
`commit_path` moves the accepted nodes' entries to `past_len, past_len + 1, ...` in place and drops the
rest, leaving exactly what a sequential prefill of the accepted tokens would have produced (the
entries of a token depend only on its ancestors, which the tree mask enforced). No re-prefill.
"""

import torch
from transformers import DynamicCache

from engine.lean import LeanCache


def new_cache(model) -> DynamicCache | LeanCache:
    """The lean forward's preallocated cache when the model has one (engine/lean.py), else transformers'."""
    lean = getattr(model, "lean", None)
    return lean.new_cache() if lean is not None else DynamicCache(config=model.config)


def commit_path(cache: DynamicCache | LeanCache, past_len: int, path: torch.Tensor) -> None:
    """Keep tree nodes `path` (a,) (node indices, root first) after `past_len`; drop the other nodes."""
    if isinstance(cache, LeanCache):
        cache.commit_path(past_len, path)
        return
    keep = path.shape[0]
    src = past_len + path  # (a,) absolute cache positions of the accepted nodes
    for layer in cache.layers:
        total = layer.keys.shape[-2]
        layer.keys[..., past_len : past_len + keep, :] = layer.keys.index_select(-2, src)
        layer.values[..., past_len : past_len + keep, :] = layer.values.index_select(-2, src)
        layer.crop(-(total - past_len - keep))


def keep_first(cache: DynamicCache | LeanCache, length: int) -> None:
    """Keep the first `length` entries and drop the rest (transformers' `crop` takes how many to drop)."""
    extra = cache_length(cache) - length
    if extra > 0:
        cache.crop(-extra)


def cache_length(cache: DynamicCache | LeanCache) -> int:
    return cache.get_seq_length()
