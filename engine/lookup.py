"""A prompt-lookup branch for the draft tree: copy what followed the context's last n-gram.

Replies often repeat their input (extraction, summaries, code edits, quoted names). Prompt lookup
drafts those stretches for free: find the latest earlier occurrence of the context's last n tokens
(n = 3, then 2, then 1) and propose the tokens that followed it (at most UNIGRAM_TOKENS after a 1-token
match, which is right less often). `graft` merges that chain into the head's tree
as one more branch, sharing nodes the tree already has, so no two siblings ever carry the same token
(the sampling proof in engine/verify.py needs distinct siblings). Verification is unchanged, so the
output is still exactly the target's; the branch only costs its extra tree nodes.

This runs on the host: it reads the tree's tokens (one extra host sync per cycle, free on a CPU).
"""

import torch

from engine.tree import Tree, make_tree

NGRAMS = (3, 2, 1)  # match lengths tried, longest first
UNIGRAM_TOKENS = 5  # a 1-token match is right less often: it proposes at most this many tokens


def lookup_chain(history: list[int], max_tokens: int, ngrams: tuple[int, ...] = NGRAMS) -> list[int]:
    """Up to `max_tokens` tokens (UNIGRAM_TOKENS for a 1-token match) that followed the latest earlier
    occurrence of history's last n-gram."""
    for n in ngrams:
        if len(history) <= n:
            continue
        tail, first = history[-n:], history[-n]
        count = max_tokens if n > 1 else min(max_tokens, UNIGRAM_TOKENS)
        for start in range(len(history) - n - 1, -1, -1):  # latest first; the tail itself excluded
            if history[start] == first and history[start : start + n] == tail:
                return history[start + n : start + n + count]
    return []


def graft(tree: Tree, chain: list[int]) -> tuple[Tree, int]:
    """The tree with `chain` hung from the root, reusing matching nodes; returns (tree, first new node).

    New nodes are appended after the existing ones (topological order holds) and carry their parent's
    score: a copied token has no draft probability of its own."""
    n = tree.size
    if not chain:
        return tree, n
    tokens, parents, depths = tree.tokens.tolist(), tree.parents.tolist(), tree.depths.tolist()
    children: dict[tuple[int, int], int] = {(parents[i], tokens[i]): i for i in range(1, n)}
    scores = tree.scores.tolist()
    new_tokens, new_parents, new_depths = [], [], []
    node = 0
    for token in chain:
        child = children.get((node, token))
        if child is None:
            child = n + len(new_tokens)
            new_tokens.append(token)
            new_parents.append(node)
            new_depths.append((depths[node] if node < n else new_depths[node - n]) + 1)
            scores.append(scores[node])
        node = child
    if not new_tokens:
        return tree, n
    dev = tree.tokens.device
    parents_t = torch.cat([tree.parents, torch.tensor(new_parents, dtype=torch.long, device=dev)])
    depths_t = torch.cat([tree.depths, torch.tensor(new_depths, dtype=torch.long, device=dev)])
    grafted = make_tree(
        torch.cat([tree.tokens, torch.tensor(new_tokens, dtype=torch.long, device=dev)]),
        parents_t,
        depths_t,
        torch.tensor(scores, dtype=tree.scores.dtype, device=dev),
        max(max(depths), max(new_depths)),
    )
    return grafted, n
