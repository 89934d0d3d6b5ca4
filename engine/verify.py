"""Verification: one stock-transformers forward over the whole tree, then acceptance.

Tree attention is a 4D additive mask (1, 1, n, past + n) plus explicit `position_ids`; the model's own
modeling code runs unchanged. `target_forward` returns the features the draft head reads (final-norm
hidden states, or for EAGLE-3 three residual streams) and logits for the tree nodes only.

Acceptance, greedy and sampled, is one rule: draw the target's next token at every node (argmax, or a
sample from the processed target distribution), then accept the longest root path whose every node is
the token drawn at its parent; the token drawn at the last accepted node is the bonus token.

Why sampling stays lossless: the EAGLE-2 tree picks children deterministically (top-k), so each
candidate's draft distribution q is a point mass. Multi-candidate speculative sampling then tries the
siblings in turn, accepting x with min(1, p(x)/q(x)) = p'(x) where p' is the residual left after
removing earlier rejected siblings, and finally samples the bonus token from the last residual. That
process emits x with probability exactly p(x) at each step, and it is equivalent in law to drawing
x ~ p once and descending into the child holding x (stopping, with x as the bonus, if none does):
P(accept sibling i) = prod_{j<i}(1 - p'_j(c_j)) * p'_i(c_i) = p(c_i). Each node's draw is independent,
so every emitted token is a fresh sample from the target's conditional distribution.
"""

import torch

from engine.config import SamplingConfig
from engine.kernels import row_kernels
from engine.lean import LeanCache
from engine.tree import Tree


def tree_attention_mask(tree: Tree, past_len: int, dtype: torch.dtype, visible: int | None = None) -> torch.Tensor:
    """(1, 1, n, past_len + n) additive mask: 0 where a node may attend, dtype-min elsewhere. Nodes see
    the first `visible` cached entries (default: all `past_len`) and their own ancestors."""
    n, device = tree.size, tree.tokens.device
    seen = (torch.arange(past_len, device=device) < (past_len if visible is None else visible)).expand(n, past_len)
    allowed = torch.cat([seen, tree.ancestors], dim=1)  # (n, past + n)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def base_model(model):
    return getattr(model, model.base_model_prefix)


@torch.no_grad()
def target_forward(model, tokens, positions, mask, cache, logits: bool | str = True, capture=None):
    """Run n tokens (n,) at positions (n,) through the target.

    Returns (features, logits). Features are what the draft head reads: the final-norm hidden states
    (n, H), or with `capture` (layer-input indices, engine/head.py) those residual streams concatenated
    (n, len(capture) * H). `logits`: True for fp32 logits of every token (n, V), "last" for the last
    token's only (1, V), False for none. mask None means plain causal. A model with a lean forward
    (engine/lean.py) runs it when `cache` is its `LeanCache`."""
    lean = getattr(model, "lean", None)
    if lean is not None and isinstance(cache, LeanCache):
        hidden, streams = lean.forward(tokens, positions, mask, cache, capture or ())
    else:
        hidden, streams = _transformers_forward(model, tokens, positions, mask, cache, capture or ())
    features = torch.cat(streams, dim=-1) if capture else hidden
    if logits == "last":
        hidden = hidden[-1:]
    return features, (model.lm_head(hidden).float() if logits else None)


def _transformers_forward(model, tokens, positions, mask, cache, capture) -> tuple[torch.Tensor, list]:
    """Stock transformers forward: final-norm hidden states (n, H) and the residual streams entering the
    layers in `capture` (index L: the last layer's output), read by forward hooks."""
    layers = base_model(model).layers
    streams: dict[int, torch.Tensor] = {}
    hooks = []
    for index in capture:
        if index < len(layers):
            def grab(module, args, kwargs, index=index):
                streams[index] = (args[0] if args else kwargs["hidden_states"])[0]
            hooks.append(layers[index].register_forward_pre_hook(grab, with_kwargs=True))
        else:
            def grab_out(module, args, output, index=index):
                streams[index] = (output[0] if isinstance(output, tuple) else output)[0]
            hooks.append(layers[-1].register_forward_hook(grab_out))
    try:
        out = base_model(model)(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        )
    finally:
        for hook in hooks:
            hook.remove()
    return out.last_hidden_state[0], [streams[i] for i in capture]  # (n, H), after the final norm


NUCLEUS_PROBE = 512  # on CPU, top-p looks for its nucleus among this many top tokens before sorting them all


def _nucleus(logits: torch.Tensor, top_p: float, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p among each row's `width` most likely tokens: (probs (n, C), ids (n, C), spill ()), spill
    True when some row's nucleus may reach past them (then call again with the whole vocabulary).

    A row keeps the smallest prefix of its sorted distribution whose mass reaches top_p, plus every token
    tied with the last one kept, so the nucleus never depends on how a sort orders equal values."""
    lse = logits.logsumexp(dim=-1, keepdim=True)  # (n, 1)
    if width < logits.shape[-1]:
        values, ids = logits.topk(width, dim=-1)  # (n, C) descending
    else:
        values, ids = logits.sort(dim=-1, descending=True)
    probs = (values - lse).exp()  # (n, C)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each candidate
    smallest = probs.masked_fill(before >= top_p, float("inf")).amin(dim=-1, keepdim=True)  # (n, 1) last kept
    keep = probs >= smallest  # (n, C)
    return probs.masked_fill(~keep, 0.0), ids, keep[:, -1].any()


def _candidates(logits: torch.Tensor, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The processed target distribution over each row's candidate tokens: (probs (n, C), ids (n, C)),
    ids None when every token is a candidate (C = V). Filtered candidates carry probability 0; rows are
    not renormalised. Temperature, then top-k (tokens tied with the k-th stay, as in transformers), then
    top-p (`_nucleus`). On CPU the nucleus is first searched among NUCLEUS_PROBE top tokens, and the
    vocabulary is sorted only when a row's nucleus may be wider (one host read, free on a CPU); on an
    accelerator the sort is cheap and a host read is not, so it always sorts."""
    logits = logits.float() / sampling.temperature  # (n, V)
    vocab = logits.shape[-1]
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, vocab), dim=-1).values[..., -1:]  # (n, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p >= 1.0:
        return torch.softmax(logits, dim=-1), None
    width = vocab if logits.device.type != "cpu" else min(NUCLEUS_PROBE, vocab)
    probs, ids, spill = _nucleus(logits, sampling.top_p, width)
    if width < vocab and bool(spill):
        probs, ids, _ = _nucleus(logits, sampling.top_p, vocab)
    return probs, ids


def processed_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Target distribution after temperature, top-k and top-p, the same for every method. (n, V)"""
    probs, ids = _candidates(logits, sampling)
    if ids is not None:
        probs = torch.zeros_like(logits, dtype=probs.dtype).scatter_(-1, ids, probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def draw_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The target's next token at every node: argmax when greedy, else one sample each. (n,)

    Sampling inverts each row's cumulative distribution (float64 sums over its candidates) at one uniform
    draw: one cumulative sum and a binary search per row, where `torch.multinomial` (and a full sort for
    top-p) cost a CPU more per tree node than the node's share of the verify forward."""
    if sampling.greedy:
        rows = row_kernels() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
        return logits.argmax(dim=-1) if rows is None else rows.argmax(logits)  # C: the same first index, faster
    probs, ids = _candidates(logits, sampling)
    cdf = probs.double().cumsum(dim=-1)  # (n, C)
    total = cdf[:, -1:]  # (n, 1)
    u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    pick = torch.searchsorted(cdf, u, right=True)  # the first candidate whose cdf exceeds u: its probability > 0
    pick = pick.clamp_(max=cdf.shape[-1] - 1)  # only a NaN or all-zero row gets here: keep the index in range
    return (pick if ids is None else ids.gather(-1, pick)).squeeze(-1)


def accept(tree: Tree, drawn: torch.Tensor) -> torch.Tensor:
    """Index () of the deepest node whose whole root path matches the target's draws (the first of them
    where several are deepest)."""
    if tree.size == 1:  # a lone root: a plain decoding step
        return tree.depths[0]
    rows = row_kernels() if drawn.device.type == "cpu" and drawn.dtype == torch.int64 else None
    if rows is not None:  # one C call for what `accept_tensors` computes (a CPU reads the tree for free)
        return torch.tensor(rows.accept(tree.tokens, tree.parents, tree.depths, drawn))
    return accept_tensors(tree, drawn)


def accept_tensors(tree: Tree, drawn: torch.Tensor) -> torch.Tensor:
    """`accept` in tensor ops, without a host read (any device)."""
    match = tree.tokens == drawn[tree.parents.clamp(min=0)]  # (n,) node agrees with its parent's draw
    match[0] = True
    on_path = tree.paths >= 0  # (n, D+1)
    path_ok = (match[tree.paths.clamp(min=0)] | ~on_path).all(dim=-1)  # (n,)
    reach = torch.where(path_ok, tree.depths, -1)  # (n,)
    return reach.argmax()
