"""The decode loop: vanilla, EAGLE-1 (static tree) and EAGLE-2 (dynamic tree) in one engine.

Every method runs the same cycle on the same model and forward path:
  draft  -> a tree rooted at the last committed token (vanilla: the root alone)
  verify -> one target forward over the tree with a 4D mask, then the target's draw at every node
  accept -> the longest root path matching those draws, plus the bonus token
  commit -> keep the accepted entries in the target's KV cache; queue them for the draft head
Greedy output is the target's argmax sequence whatever the drafter guesses; sampled output follows the
target's distribution (see engine/verify.py). One host sync per cycle: a single packed `.tolist()` (plus
one to read the tree when the prompt-lookup branch is on, engine/lookup.py, and on a CPU one boolean per
draft depth, engine/draft.py).

`Engine.generate` is a generator of plain event dicts (engine/events.py); it knows nothing of HTML.
"""

import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import torch

from engine.config import GenerationConfig, Method
from engine.detok import IncrementalDetokenizer
from engine.draft import Drafter
from engine.events import CycleEvent, EndEvent, FinishReason, StartEvent, Totals, TreeView
from engine.gate import HeadGate
from engine.head import DraftHead, Eagle3Head
from engine.kv import commit_path, keep_first, new_cache
from engine.lookup import NGRAMS, graft, lookup_chain
from engine.models import backend_name
from engine.tree import EAGLE1_DEFAULT_TREE, StaticPlan, Tree, bucket, padded, root_only, static_plan
from engine.verify import accept, draw_tokens, target_forward, tree_attention_mask

SCORE_SCALE = 10_000  # scores travel to the host packed as integers, with 4 decimals
# A cycle that accepts at least this many drafted tokens and ends on a copied (prompt-lookup) node starts
# a copy stretch: the next cycle verifies the copied chain alone, up to twice the lookup length, without
# running the head (its pairs wait for the next head cycle), until a cycle accepts less than that.
COPY_RUN = 4
HEAD_NAMES = {"eagle1": "EAGLE", "eagle3": "EAGLE-3"}


class ContextTooLong(ValueError):
    """The prompt does not fit in the model's context window."""


class Stopwatch:
    """Stage timings without extra host syncs: CUDA events are read after the cycle's one sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000.0


@dataclass
class DecodeState:
    """What one request carries from cycle to cycle."""

    cache: object  # the target's KV cache
    past_len: int  # tokens in the target's cache
    pending: torch.Tensor  # () last committed token, not yet in the target's cache: the next root
    pairs: tuple[torch.Tensor, torch.Tensor] | None  # (tokens (a,), features (a, H)) to feed the head
    prompt: list[int] = field(default_factory=list)
    copying: bool = False  # the last cycle accepted a long copied run: draft the next one by lookup alone
    gate: HeadGate | None = None  # the adaptive head (tree.adaptive): whether the head pays for itself
    output: list[int] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    features: list[torch.Tensor] = field(default_factory=list)  # what the head reads at each cached token, in pieces


@dataclass
class PrefixCache:
    """The target's KV cache as the last request left it, for the next request to start from.

    A chat's next turn repeats the conversation so far: its prompt shares a prefix with the tokens already
    in this cache (the previous prompt and reply), and only the rest needs a prefill. `features` keeps
    what the draft head reads at each cached token, so EAGLE can follow a vanilla turn and the other way
    round. On an exact backend (int8) a cached entry equals the one a fresh prefill computes, bit for bit;
    on float backends, up to rounding."""

    ids: list[int]
    cache: object
    features: torch.Tensor  # (len(ids), F)


def common_prefix(a, b) -> int:
    """How many leading items two sequences (token lists, strings) share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class DraftKind(Enum):
    """Who drafted a cycle's tree."""

    HEAD = "head"  # the head was fed the pending pairs and drafted (near the context limit: the root alone)
    COPY = "copy"  # a copy stretch: the lookup chain alone; the pairs stay pending
    REST = "rest"  # the adaptive head rests: the lookup chain or the root alone; the pairs stay pending
    ROOT = "root"  # no drafter (vanilla)


class Draft(NamedTuple):
    tree: Tree  # the tree to verify
    lookup_from: int  # index of its first prompt-lookup node (its size when none)
    chain: list[int]  # the copied tokens hung from its root (empty when none)
    kind: DraftKind
    feed: tuple | None = None  # stopwatch marks around the head's feed of the pending pairs (adaptive only)


class Engine:
    def __init__(
        self, model, tokenizer, head: DraftHead | Eagle3Head | None = None, static_tree=EAGLE1_DEFAULT_TREE,
        prune: bool | None = None, lookup_ngrams: tuple[int, ...] = NGRAMS,
        verify_buckets: tuple[int, ...] | None = None, reuse_prefix: bool = True,
    ):  # fmt: skip
        """`prune`: the EAGLE-2 drafter's early stop (engine/draft.py); None: on a CPU only.
        `lookup_ngrams`: the n-gram lengths the prompt-lookup branch matches, longest first (engine/lookup.py).
        `verify_buckets`: tree sizes the verify forward is padded to (engine/tree.py `padded`), so that it
        runs a few fixed shapes, as captured GPU graphs need; None: every tree at its own size.
        `reuse_prefix`: start each request from the KV cache the last one left (`PrefixCache`), prefilling
        only the tokens after the prefix they share."""
        self.model = model
        self.tokenizer = tokenizer
        self.head = head
        self.static_tree = static_tree
        self.prune = prune
        self.lookup_ngrams = lookup_ngrams
        self.verify_buckets = verify_buckets
        self.reuse_prefix = reuse_prefix
        self.prefix: PrefixCache | None = None
        weight = model.get_output_embeddings().weight
        self.device = weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.context_length = int(model.config.max_position_embeddings)
        self.eos_ids = self._eos_ids()
        self.stopwatch = Stopwatch(self.device)
        self.backend = backend_name(model)  # int8, bf16, fp32, bnb-4bit, ... (engine/backend.py)

    @property
    def capture(self) -> tuple[int, ...] | None:
        """What the head reads from the target: final-norm hidden states (None), or EAGLE-3's residual streams."""
        return None if self.head is None else self.head.target_layers

    def _eos_ids(self) -> set[int]:
        ids = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        return ids

    # ---- text helpers -------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # BatchEncoding in some tokenizers
            ids = ids["input_ids"]
        return list(ids)

    def trim_messages(self, messages: list[dict], reserve_tokens: int) -> tuple[list[dict], int]:
        """Drop the oldest turns (never the system prompt or the last message) until the prompt plus
        `reserve_tokens` fits the context. Returns (messages, number dropped)."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system) :]
        dropped = 0
        while len(self.chat_ids(system + rest)) + reserve_tokens > self.context_length:
            if len(rest) <= 1:
                raise ContextTooLong(
                    f"the message is too long: it needs {len(self.chat_ids(system + rest))} tokens plus "
                    f"{reserve_tokens} for the reply, and the model's context is {self.context_length}; "
                    f"shorten it or lower max new tokens"
                )
            rest = rest[1:]
            dropped += 1
        return system + rest, dropped

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def describe(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or self.model.config.model_type
        name = Path(name).name if Path(name).exists() else name  # a local folder: no machine paths in the UI
        head = "no draft head (vanilla only)" if self.head is None else f"{HEAD_NAMES[self.head.kind]} head loaded"
        return f"{name} · {self.backend} · {self.device} · {head}"

    def forget(self) -> None:
        """Drop the kept KV cache: the next request prefills its whole prompt (a cold start)."""
        self.prefix = None

    # ---- decoding -----------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], config: GenerationConfig, cancel=None):
        """Yield start, one cycle event per verify step (cycle 0 is the prefill's token), then end."""
        config.validate()
        if config.method != Method.VANILLA and self.head is None:
            raise ValueError(f"method {config.method} needs a draft head; load one with --head or use vanilla")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ContextTooLong(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context_length}"
            )
        generator = None
        if not config.sampling.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(config.seed if config.seed is not None else torch.seed())
        plan = static_plan(self.static_tree, config.tree.depth, config.tree.total_tokens)
        drafter = None
        if config.method != Method.VANILLA:
            budget = min(len(prompt_ids) + config.max_new_tokens + 1, self.context_length)
            scratch = max(config.tree.depth * config.tree.top_k, len(plan.parents))
            embed, lm_head = self.model.get_input_embeddings(), self.model.lm_head
            drafter = Drafter(self.head, embed, lm_head, budget + scratch, prune=self.prune)

        yield asdict(StartEvent(config.method, len(prompt_ids), config.to_dict()))
        start = time.perf_counter()
        detok = IncrementalDetokenizer(self.tokenizer)
        state, busy = None, True  # busy: inside the prefill or a cycle, where the cache may be half-written
        try:
            state, first_ms = self._prefill(prompt_ids, config, generator, drafter)
            state.totals.prefill_ms = first_ms
            first = int(state.pending)
            finish = self._finish_reason([first], config, state)
            new_ids = [first]
            event = CycleEvent(0, new_ids, "", None, [], first, 0.0, first_ms)
            while True:
                state.output.extend(event.new_token_ids)
                text = detok.add([t for t in event.new_token_ids if t not in self.eos_ids])
                text, hit = self._apply_stop_strings(detok, text, config.stop)
                finish = finish or (FinishReason.STOP_STRING if hit else None)
                event.text = text
                totals = state.totals
                totals.new_tokens = len(state.output)
                totals.elapsed_s = time.perf_counter() - start
                totals.tokens_per_s = totals.new_tokens / max(totals.elapsed_s, 1e-9)
                totals.tau = (totals.new_tokens - 1) / totals.cycles if totals.cycles else 0.0
                event.totals = replace(totals)
                busy = False
                yield asdict(event)
                if finish is None and cancel is not None and cancel.is_set():
                    finish = FinishReason.CANCELLED
                if finish is None and state.past_len >= self.context_length:
                    finish = FinishReason.CONTEXT_LENGTH
                if finish is not None:
                    break
                busy = True
                event = self._cycle(state, config, generator, drafter, plan)
                finish = self._finish_reason(event.new_token_ids, config, state)
                if finish in (FinishReason.EOS, FinishReason.MAX_NEW_TOKENS):
                    event.new_token_ids = self._cut(event.new_token_ids, config, state)
        finally:  # also when the consumer stops early: between cycles the cache is whole
            if state is not None and not busy and self.reuse_prefix:
                self.prefix = self._kept(state)
        yield asdict(EndEvent(finish, self._finish_message(finish), detok.text, state.output, replace(state.totals)))

    @torch.no_grad()
    def _prefill(self, prompt_ids, config, generator, drafter):
        mark = self.stopwatch.mark()
        cache, cached, kept_features = self._take_prefix(prompt_ids)
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)  # (T,)
        positions = torch.arange(cached, len(prompt_ids), device=self.device)
        features, logits = target_forward(self.model, ids[cached:], positions, None, cache, "last", self.capture)
        if kept_features is not None:
            features = torch.cat([kept_features, features])  # (T, F)
        first = draw_tokens(logits, config.sampling, generator)  # (1,)
        pairs = None
        if drafter is not None:  # pairs (f_i, x_{i+1}): the prompt shifted by one, then the new token
            pairs = (torch.cat([ids[1:], first]), features)
        state = DecodeState(cache, len(prompt_ids), first[0], pairs, list(prompt_ids))
        state.totals.cached_tokens = cached
        if self.reuse_prefix:
            state.features = [features]
        if drafter is not None and config.tree.adaptive:
            state.gate = HeadGate()
        int(first)  # the prefill's sync: its time is real
        return state, self.stopwatch.ms(mark, self.stopwatch.mark())

    @staticmethod
    def _kept(state: DecodeState) -> PrefixCache:
        """What a finished request leaves for the next: its cache holds the prompt and then the reply (all
        but its pending last token); entries of a path cut short at max_new_tokens are dropped."""
        ids = (state.prompt + state.output)[: state.past_len]
        keep_first(state.cache, len(ids))
        return PrefixCache(ids, state.cache, torch.cat(state.features)[: len(ids)])

    def _take_prefix(self, prompt_ids: list[int]) -> tuple[object, int, torch.Tensor | None]:
        """(cache, how many leading prompt tokens it already holds, their features or None). The kept
        cache becomes this request's (another request meanwhile starts cold). The last prompt token always
        runs, for the logits that draw the first new token."""
        kept, self.prefix = self.prefix, None
        cached = 0 if kept is None else min(common_prefix(kept.ids, prompt_ids), len(prompt_ids) - 1)
        if cached == 0:
            return new_cache(self.model), 0, None
        keep_first(kept.cache, cached)
        return kept.cache, cached, kept.features[:cached]

    @torch.no_grad()
    def _cycle(
        self, state: DecodeState, config: GenerationConfig, generator, drafter: Drafter | None, plan: StaticPlan
    ) -> CycleEvent:
        t0 = self.stopwatch.mark()
        tree, lookup_from, chain, kind, feed = self._draft(state, config, drafter, plan)
        head_fed = kind is DraftKind.HEAD
        t1 = self.stopwatch.mark()
        n = tree.size
        shaped = tree if self.verify_buckets is None else padded(tree, bucket(n, self.verify_buckets))
        positions = state.past_len + shaped.depths  # (n,)
        # a lone root attends to everything before it: plain causal decoding needs no mask
        mask = tree_attention_mask(shaped, state.past_len, self.dtype) if shaped.size > 1 else None
        features, logits = target_forward(self.model, shaped.tokens, positions, mask, state.cache, capture=self.capture)
        features, logits = features[:n], logits[:n]  # padding rows, if any, are dropped unread
        drawn = draw_tokens(logits, config.sampling, generator)  # (n,)
        best = accept(tree, drawn)  # ()
        packed = torch.cat(  # one host sync for everything the event and the commit need
            [
                tree.paths[best],
                drawn[best].view(1),
                tree.tokens,
                tree.parents,
                tree.depths,
                (tree.scores * SCORE_SCALE).round().long(),
            ]
        ).tolist()
        t2 = self.stopwatch.mark()
        d, n = tree.paths.shape[1], tree.size
        path = [j for j in packed[:d] if j >= 0]
        bonus = packed[d]
        tokens = packed[d + 1 : d + 1 + n]
        accepted = len(path)
        path_t = tree.paths[best][:accepted]  # (a,)
        if shaped.size > 1:  # a lone root's entry is already in place
            commit_path(state.cache, state.past_len, path_t)
        state.past_len += accepted
        state.pending = drawn[best]
        committed = features[path_t]  # (a, F)
        if self.reuse_prefix:
            state.features.append(committed)
        if drafter is not None:
            pairs = (torch.cat([tree.tokens[path_t[1:]], drawn[best].view(1)]), committed)
            if not head_fed:  # a copy or rest cycle: the head has not seen the last pairs yet, keep them all
                pairs = tuple(torch.cat([old, new]) for old, new in zip(state.pairs, pairs))
            state.pairs = pairs
            state.copying = lookup_from < n and path[-1] >= lookup_from and accepted - 1 >= COPY_RUN
        state.totals.cycles += 1
        state.totals.head_cycles += head_fed
        draft_ms, verify_ms = self.stopwatch.ms(t0, t1), self.stopwatch.ms(t1, t2)
        state.totals.draft_ms += draft_ms
        state.totals.verify_ms += verify_ms
        if state.gate is not None and kind is DraftKind.HEAD:
            # siblings are distinct, so the chain alone matches as far as it agrees with the accepted path;
            # the head's cost leaves out the feed, which after a rest or a copy stretch is mostly catch-up
            copied = common_prefix(chain, [tokens[j] for j in path[1:]])
            state.gate.head_cycle(accepted - 1, copied, draft_ms - self.stopwatch.ms(*feed), verify_ms)
        elif state.gate is not None and kind is DraftKind.REST:  # copy stretches are not the gate's to judge
            state.gate.skip_cycle(accepted - 1, draft_ms + verify_ms)
        view = None
        if config.method != Method.VANILLA:
            rest = packed[d + 1 + n :]
            view = TreeView(
                tokens, rest[:n], rest[n : 2 * n], [s / SCORE_SCALE for s in rest[2 * n :]],
                lookup_from if lookup_from < n else None,
            )
        new_ids = [tokens[j] for j in path[1:]] + [bonus]
        return CycleEvent(state.totals.cycles, new_ids, "", view, path, bonus, draft_ms, verify_ms, head=head_fed)

    def _draft(self, state: DecodeState, config: GenerationConfig, drafter: Drafter | None, plan: StaticPlan) -> Draft:
        room = self.context_length - state.past_len  # cache slots left, the root included
        if drafter is None:
            return Draft(root_only(state.pending), 1, [], DraftKind.ROOT)
        lookup = config.tree.lookup
        chain = lookup_chain(state.prompt + state.output, 2 * lookup, self.lookup_ngrams) if lookup and room > 1 else []
        if state.copying and chain:  # inside a copied stretch the head's tree rarely adds: skip it
            chain = chain[: room - 1]
            return Draft(*graft(root_only(state.pending), chain), chain, DraftKind.COPY)
        if state.gate is not None and not state.gate.use_head():  # the head has not paid lately: rest it
            chain = chain[: min(lookup, room - 1)]
            return Draft(*graft(root_only(state.pending), chain), chain, DraftKind.REST)
        timed = state.gate is not None  # only the gate reads the feed's time: no extra marks without it
        feed = (self.stopwatch.mark(),) if timed else None
        root_hidden = drafter.extend(*state.pairs)  # commit the pending pairs (keeps the head in step)
        feed = feed + (self.stopwatch.mark(),) if timed else None
        if config.method == Method.EAGLE2 and room >= 2:
            tree_cfg = config.tree
            if tree_cfg.total_tokens > room - 1:
                tree_cfg = replace(tree_cfg, total_tokens=room - 1)
            tree = drafter.dynamic_tree(state.pending, root_hidden, tree_cfg)
        elif config.method == Method.EAGLE1 and len(plan.parents) <= room:
            tree = drafter.static_tree(state.pending, root_hidden, plan)
        else:  # near the context limit: one token at a time
            return Draft(root_only(state.pending), 1, [], DraftKind.HEAD, feed)
        if chain and room > tree.size:
            chain = chain[: min(lookup, room - tree.size)]
            return Draft(*graft(tree, chain), chain, DraftKind.HEAD, feed)
        return Draft(tree, tree.size, [], DraftKind.HEAD, feed)

    # ---- stopping -----------------------------------------------------------------------------

    def _finish_reason(self, new_ids: list[int], config: GenerationConfig, state: DecodeState) -> FinishReason | None:
        if any(t in self.eos_ids for t in new_ids[: max(config.max_new_tokens - len(state.output), 0)]):
            return FinishReason.EOS
        if len(state.output) + len(new_ids) >= config.max_new_tokens:
            return FinishReason.MAX_NEW_TOKENS
        return None

    def _cut(self, new_ids: list[int], config: GenerationConfig, state: DecodeState) -> list[int]:
        new_ids = new_ids[: config.max_new_tokens - len(state.output)]
        for i, t in enumerate(new_ids):
            if t in self.eos_ids:
                return new_ids[: i + 1]
        return new_ids

    @staticmethod
    def _apply_stop_strings(detok: IncrementalDetokenizer, delta: str, stops: tuple[str, ...]) -> tuple[str, bool]:
        """Trim the reply at the first stop string; returns the delta to emit and whether one was hit."""
        if not stops or not delta:
            return delta, False
        window_start = max(0, len(detok.text) - len(delta) - max(len(s) for s in stops))
        window = detok.text[window_start:]
        hits = [window.find(s) for s in stops if s and s in window]
        if not hits:
            return delta, False
        cut = window_start + min(hits)
        emitted_before = len(detok.text) - len(delta)
        detok.text = detok.text[:cut]
        return detok.text[emitted_before:] if cut > emitted_before else "", True

    def _finish_message(self, reason: FinishReason) -> str:
        return {
            FinishReason.EOS: "the model ended its reply",
            FinishReason.MAX_NEW_TOKENS: "reached the max new tokens limit",
            FinishReason.STOP_STRING: "stopped at a stop string",
            FinishReason.CONTEXT_LENGTH: f"stopped at the model's context length ({self.context_length} tokens)",
            FinishReason.CANCELLED: "stopped by the user",
        }[reason]
