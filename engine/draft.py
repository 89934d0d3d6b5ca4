"""Drafting: run the EAGLE head over committed context and grow a draft tree from the root.

The head sees pairs (feature_i, token_{i+1}) at position i and predicts feature_{i+1}; an lm_head (the
target's, or an EAGLE-3 head's own) turns a predicted feature into next-token log-probs. Deeper draft
steps feed the head its own output as the feature. `extend` adds committed pairs to the
head's cache and returns the hidden state that predicts the children of the next root. Growing a tree
writes scratch entries after the committed length; `extend` drops them before adding new pairs, so the
cache holds only committed context between cycles.

Every tensor stays on the device: no `.item()`, no Python loop over nodes (loops run over depth). On a
CPU, where a host read is free, EAGLE-2 drafting reads one boolean per depth to stop early (`_settled`).
With an int8 target and the C kernels (`RowsHead`), a draft step is one C call and a whole EAGLE-2 tree
another (engine/kernels.c `draft_rows`, `draft_tree`): the same tree `_grow` builds in tensor ops, without
the hundred-odd small calls that, right after a verify, cost more than the head's arithmetic.
"""

import torch
import torch.nn.functional as F

from engine.config import TreeConfig
from engine.head import DraftCache, DraftHead, Eagle3Head
from engine.int8 import Int8Linear
from engine.kernels import row_kernels
from engine.lean import RotaryTable, _fuse
from engine.tree import StaticPlan, Tree, make_tree, select_dynamic


class RowsHead:
    """An EAGLE-1/2 head's layer with int8 products, run through the C kernels' one-call forward: how an
    int8 target's drafts are made where the kernels are built. Drafting need not match the float head
    bit for bit (verification decides what is kept); it must be cheap next to a one-token target step."""

    def __init__(self, head: DraftHead, rows):
        layer = head.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        self.rows, self.rotary = rows, RotaryTable(head.rotary)
        self.fc = Int8Linear(head.fc)
        self.qkv = _fuse([Int8Linear(attn.q_proj), Int8Linear(attn.k_proj), Int8Linear(attn.v_proj)])
        self.o = Int8Linear(attn.o_proj)
        self.gate_up = _fuse([Int8Linear(mlp.gate_proj), Int8Linear(mlp.up_proj)])
        self.down = Int8Linear(mlp.down_proj)
        self.norm_in, self.norm_post = None, layer.post_attention_layernorm  # no input norm in EAGLE-1/2
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.scaling = self.head_dim**-0.5  # scaled_dot_product_attention's default
        self.table = rows.layer_table([self])
        self.fc_c = rows.linear(self.fc)

    @classmethod
    def applies(cls, head, lm_int8) -> bool:
        """Whether an int8 target's drafts run through this: an EAGLE-1/2 float32 CPU head whose sizes
        the kernels take, where they are built."""
        rows = row_kernels()
        if not isinstance(head, DraftHead) or lm_int8 is None or rows is None or not rows.runs_products(1):
            return False
        layer = head.layers[0]
        sizes = (head.fc, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj)
        return (
            head.fc.weight.device.type == "cpu" and head.fc.weight.dtype == torch.float32
            and (head.embed_tokens is None or head.embed_tokens.weight.dtype == torch.float32)
            and head.config_dict.get("hidden_act", "silu") == "silu" and rows.attention_fits(layer.self_attn.head_dim)
            and rows.fits(sizes)
        )  # fmt: skip

    @classmethod
    def of(cls, head: DraftHead) -> "RowsHead":
        """The head's int8 copy, quantized once per head."""
        made = head.__dict__.get("_rows_head")
        if made is None:
            made = head.__dict__["_rows_head"] = cls(head, row_kernels())
        return made

    def run(self, embeds, features, positions, mask, cache: DraftCache) -> torch.Tensor:
        """The head over t pairs: embeds, features (t, H), positions (t,), mask (t, cache.used + t) bool.
        Writes their keys and values at cache.used; returns (t, H)."""
        t = embeds.shape[0]
        if cache.used + t > cache.capacity:
            raise RuntimeError(f"draft cache full ({cache.used} + {t} > {cache.capacity})")
        x = self.fc(torch.cat([embeds, features.float()], dim=-1))  # (t, H)
        cos, sin = self.rotary(x, positions)  # (t, hd) each
        visible = mask.to(torch.uint8)
        step = t if self.rows.runs_products(t) else self.rows.gemm_rows
        out = []
        for a in range(0, t, step):  # long runs of committed pairs in pieces the kernels' forward takes
            b = min(a + step, t)
            used = cache.used
            out.append(self.rows.forward(
                self.table, x[a:b].contiguous(), cos[a:b].contiguous(), sin[a:b].contiguous(), self.heads,
                self.head_dim, cache.keys[None], cache.values[None], used, visible[a:b, : used + b - a].contiguous(),
                None,
            ))  # fmt: skip
            cache.used = used + b - a
        return out[0] if len(out) == 1 else torch.cat(out)

    def step(self, embed, tokens, features, positions, slots, cache: DraftCache, lm, vocab, k: int):
        """`run` and the top-k draft log-probs of every row in one C call (engine/kernels.c draft_rows):
        embed (V, H) the embedding table, tokens (t,), features (t, H), positions (t,); slots (t, cache.used
        - cache.length + t) uint8, which scratch entries each row sees, or None (committed pairs: causal).
        lm (LinearC) None: no scores. Returns (hidden (t, H), scores (t, k) or None, ids (t, k) or None)."""
        cos, sin = self.rotary.tables(features, int(positions.max()) + 1)
        return self.rows.draft_rows(
            self.table, self.fc_c, embed, tokens.contiguous(), features.float().contiguous(), cos, sin,
            positions.contiguous(), self.heads, self.head_dim, cache, slots, lm, vocab, k,
        )  # fmt: skip


class Drafter:
    def __init__(
        self, head: DraftHead | Eagle3Head, embed: torch.nn.Module, lm_head: torch.nn.Module, capacity: int,
        prune: bool | None = None,
    ):  # fmt: skip
        self.head = head
        self.embed = head.embed_tokens if head.embed_tokens is not None else embed
        # The draft's scores: an EAGLE-3 head's own lm_head (its rows are the draft vocabulary), else the
        # target's, restricted to the head's reduced draft vocabulary when it has one (`head.draft_vocab`,
        # target ids). Verification always uses the target's full vocabulary.
        self.vocab_ids = None if head.draft_vocab is None else head.draft_vocab.to(head.fc.weight.device)
        own = head.lm_head is not None
        scorer = head.lm_head if own else lm_head
        # With an int8 target the draft scores come from an int8 lm_head too (drafting need not be exact).
        self.lm_int8 = None
        if isinstance(scorer, Int8Linear):
            self.lm_int8 = scorer if own or self.vocab_ids is None else scorer.rows(self.vocab_ids)
            self.lm_weight = None
        else:
            rows = own or self.vocab_ids is None
            self.lm_weight = scorer.weight if rows else scorer.weight[self.vocab_ids]  # (Vd, H)
        self.cache = head.new_cache(capacity)
        self.device = head.fc.weight.device
        # An int8 target drafts through the head's int8 copy in the C kernels (`RowsHead`) where it can:
        # a draft step (the head's layer, its scores, their top-k) is then one C call.
        self.rows_head = RowsHead.of(head) if RowsHead.applies(head, self.lm_int8) else None
        if self.rows_head is not None:
            self.lm_c = self.rows_head.rows.linear(self.lm_int8)
            self.embed_table = self.embed.weight.detach().float().contiguous()  # (V, H) float32: no copy for int8
            if self.vocab_ids is not None:  # the C calls read it as int64 in memory order
                self.vocab_ids = self.vocab_ids.long().contiguous()
        # Stop growing a tree once deeper nodes cannot make the cut (`_settled`): the tree is the same, the
        # skipped draft steps are saved. It costs a host read per depth: free on a CPU, not on a GPU, so by
        # default (`prune` None) it is on for a CPU only.
        self.prune = self.device.type == "cpu" if prune is None else prune
        self._static: dict = {}  # StaticPlan -> its tensors on this device

    def reset(self) -> None:
        self.cache.truncate(0)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (t, H) -> (t, Vd) float32
        hidden = self.head.final(hidden)
        if self.lm_int8 is not None:
            return self.lm_int8(hidden.float())
        return F.linear(hidden.to(self.lm_weight.dtype), self.lm_weight).float()

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:  # (t, H) -> (t, Vd) float32
        return F.log_softmax(self._logits(hidden), dim=-1)

    def _top(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k draft log-probs and their *target* token ids. (t, k) each"""
        if self.rows_head is not None and k <= self.lm_c.N:  # products, log-softmax and top-k in one C call
            return self.rows_head.rows.draft_scores(hidden.float(), self.lm_c, self.vocab_ids, k)
        scores, idx = self._logprobs(hidden).topk(k, dim=-1)
        return scores, (idx if self.vocab_ids is None else self.vocab_ids[idx])

    def _one_call(self, rows: int, top_k: int) -> bool:
        """Whether a draft step of `rows` rows scoring the top_k runs as one C call (`RowsHead.step`)."""
        return self.rows_head is not None and rows <= self.rows_head.rows.gemm_rows and top_k <= self.lm_c.N

    def _run(self, tokens, features, positions, scratch_mask, top_k: int = 0):
        """Feed t (token, feature) pairs; scratch_mask (t, scratch slots incl. these) or None for causal.
        Returns the head's output (t, H) and, with top_k, `_top(output, top_k)` (else None)."""
        L, t = self.cache.length, tokens.shape[0]
        if self._one_call(t, top_k):  # one C call
            slots = None if scratch_mask is None else scratch_mask.to(torch.uint8).contiguous()
            lm = self.lm_c if top_k else None
            h, scores, ids = self.rows_head.step(
                self.embed_table, tokens, features, positions, slots, self.cache, lm, self.vocab_ids, top_k
            )
            return h, (scores, ids) if top_k else None
        if scratch_mask is None:  # committed pairs: causal over context + themselves
            new = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
            mask = torch.cat([torch.ones(t, self.cache.used, dtype=torch.bool, device=self.device), new], dim=1)
        else:
            mask = torch.cat([torch.ones(t, L, dtype=torch.bool, device=self.device), scratch_mask], dim=1)
        if self.rows_head is not None:
            h = self.rows_head.run(self.embed(tokens), features, positions, mask, self.cache)
        else:
            h = self.head(
                self.embed(tokens)[None].to(self.head.fc.weight.dtype),  # (1, t, H)
                features[None],
                positions[None],
                mask[None, None],
                self.cache,
            )[0]  # (t, H)
        return h, self._top(h, top_k) if top_k else None

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Commit pairs (features[i], tokens[i]); returns the hidden (H,) that drafts the next root."""
        self.cache.truncate(self.cache.length)
        start = self.cache.length
        positions = torch.arange(start, start + tokens.shape[0], device=self.device)
        h, _ = self._run(tokens, features, positions, None)
        self.cache.commit()
        return h[-1]

    @torch.no_grad()
    def dynamic_tree(self, root_token: torch.Tensor, root_hidden: torch.Tensor, cfg: TreeConfig) -> Tree:
        """EAGLE-2: expand the top-k frontier by cumulative log-prob to `depth`, rerank all candidates."""
        self.cache.truncate(self.cache.length)  # forget scratch from an earlier tree
        if not self._one_call(cfg.top_k, cfg.top_k):
            return self._grow(root_token, root_hidden, cfg)
        # The same steps in one C call: the head's levels, the frontier, the early stop and the rerank.
        rows = self.rows_head
        cos, sin = rows.rotary.tables(root_hidden, self.cache.length + cfg.depth)
        tokens, parents, depths, scores, ancestors, paths = rows.rows.draft_tree(
            rows.table, rows.fc_c, self.embed_table, cos, sin, rows.heads, rows.head_dim, self.cache, self.lm_c,
            self.vocab_ids, root_hidden, int(root_token), cfg.total_tokens, cfg.depth, cfg.top_k, self.prune,
        )  # fmt: skip
        return Tree(tokens, parents, depths, scores, ancestors, paths)

    def _grow(self, root_token: torch.Tensor, root_hidden: torch.Tensor, cfg: TreeConfig) -> Tree:
        """`dynamic_tree` step by step in tensor ops, after the cache's scratch entries were dropped."""
        k, dev = cfg.top_k, self.device
        L = self.cache.length  # root pair sits at position L - 1; a depth-d node is fed at L - 1 + d
        scores, tokens = (x[0] for x in self._top(root_hidden[None], k))  # (k,)
        pool_tokens, pool_scores = [tokens], [scores]
        pool_parents = [torch.full((k,), -1, dtype=torch.long, device=dev)]
        pool_depths = [torch.ones(k, dtype=torch.long, device=dev)]
        frontier = torch.arange(k, device=dev)  # pool indices
        feats = root_hidden.expand(k, -1)  # (k, H) parent hidden of each frontier node
        slots = torch.zeros(k, (cfg.depth - 1) * k, dtype=torch.bool, device=dev)  # scratch visibility
        rows = torch.arange(k, device=dev)
        offset = k
        for d in range(2, cfg.depth + 1):
            step = d - 2
            slots[rows, step * k + rows] = True  # each frontier node sees its own new slot
            positions = torch.full((k,), L - 2 + d, dtype=torch.long, device=dev)
            h, (top_s, top_t) = self._run(tokens, feats, positions, slots[:, : (step + 1) * k], k)  # (k, H), (k, k)
            cand = (scores[:, None] + top_s).flatten()  # (k*k,) cumulative
            pool_tokens.append(top_t.flatten())
            pool_scores.append(cand)
            pool_parents.append(frontier.repeat_interleave(k))
            pool_depths.append(torch.full((k * k,), d, dtype=torch.long, device=dev))
            best = cand.topk(k).indices  # (k,) next frontier
            parent_row = best // k
            frontier, tokens, scores = offset + best, top_t.flatten()[best], cand[best]
            feats, slots = h[parent_row], slots[parent_row]
            offset += k * k
            if self.prune and d < cfg.depth and self._settled(pool_scores, scores, cfg.total_tokens):
                break
        return select_dynamic(
            root_token,
            torch.cat(pool_tokens),
            torch.cat(pool_parents),
            torch.cat(pool_depths),
            torch.cat(pool_scores),
            cfg.total_tokens,
            cfg.depth,
        )

    @torch.no_grad()
    def static_tree(self, root_token: torch.Tensor, root_hidden: torch.Tensor, plan: StaticPlan) -> Tree:
        """EAGLE-1: fill a fixed tree shape with the draft's ranked guesses, depth by depth."""
        dev, n = self.device, len(plan.parents)
        self.cache.truncate(self.cache.length)  # forget scratch from an earlier tree
        L = self.cache.length
        tokens = torch.zeros(n, dtype=torch.long, device=dev)
        scores = torch.zeros(n, dtype=torch.float32, device=dev)
        hidden = torch.zeros(n, root_hidden.shape[-1], dtype=root_hidden.dtype, device=dev)
        tokens[0] = root_token
        hidden[0] = root_hidden
        parents, depths, steps = self._plan_tensors(plan)
        for d, step in enumerate(steps, start=1):
            if d == 1:
                top_s, top_t = self._top(root_hidden[None], plan.top_k)  # (1, top_k)
            else:
                fed = step["fed"]  # (f,)
                positions = torch.full((fed.shape[0],), L - 2 + d, dtype=torch.long, device=dev)
                h, (top_s, top_t) = self._run(tokens[fed], hidden[parents[fed]], positions, step["mask"], plan.top_k)
                hidden[fed] = h  # (f, H); top_s, top_t (f, top_k)
            children, rows, ranks = step["children"], step["rows"], step["ranks"]
            tokens[children] = top_t[rows, ranks]
            scores[children] = scores[parents[children]] + top_s[rows, ranks]
        return make_tree(tokens, parents, depths, scores, max(plan.depths))

    @staticmethod
    def _settled(pool_scores: list[torch.Tensor], frontier_scores: torch.Tensor, total: int) -> bool:
        """Whether deeper levels can no longer enter the tree: a child scores at most its parent, so when
        no frontier node beats the pool's `total`-th best score, no descendant will (ties go to the pool's
        earlier entries in the stable rerank). One host read."""
        pool = torch.cat(pool_scores)
        if pool.shape[0] < total:
            return False
        return bool(frontier_scores.max() <= pool.topk(total).values[-1])

    def _plan_tensors(self, plan: StaticPlan):
        """The plan's index tensors on this device, built once per plan."""
        cached = self._static.get(plan)
        if cached is None:
            dev = self.device
            steps = [
                {
                    "fed": torch.tensor(s.fed, dtype=torch.long, device=dev),
                    "mask": torch.tensor(s.fed_mask, dtype=torch.bool, device=dev) if s.fed else None,
                    "children": torch.tensor(s.children, dtype=torch.long, device=dev),
                    "rows": torch.tensor(s.rows, dtype=torch.long, device=dev),
                    "ranks": torch.tensor(s.ranks, dtype=torch.long, device=dev),
                }
                for s in plan.steps
            ]
            parents = torch.tensor(plan.parents, dtype=torch.long, device=dev)
            cached = (parents, torch.tensor(plan.depths, dtype=torch.long, device=dev), steps)
            self._static = {plan: cached}
        return cached
