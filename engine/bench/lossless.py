"""The losslessness audit: each method's tokens against vanilla's, and at a divergence the target's own
logits there, to tell a rounding near-tie from a bug."""

import torch

from engine.bench.questions import turn_prompt
from engine.decode import Engine, common_prefix
from engine.kv import new_cache
from engine.verify import target_forward

# Largest logit gap between two diverging tokens still accepted as a rounding tie, per dtype. bf16 logits
# near 20 are spaced 0.125 apart, and a 61-token tree and a 1-token step round differently.
# Methods that run another implementation of the model (llama.cpp's own quantized arithmetic): their
# tokens are not this target's, so the audit leaves them out.
OTHER_TARGETS = ("llama_cpp",)
MARGIN_BOUNDS = {torch.float32: 1e-4, torch.float16: 0.25, torch.bfloat16: 0.5}


@torch.no_grad()
def logit_margin(engine: Engine, prefix_ids: list[int], token_a: int, token_b: int) -> dict:
    """The target's next-token logits after `prefix_ids` (one plain forward): top-2 margin, gap a vs b."""
    ids = torch.tensor(prefix_ids, dtype=torch.long, device=engine.device)  # (T,)
    positions = torch.arange(len(prefix_ids), device=engine.device)
    features, _ = target_forward(engine.model, ids, positions, None, new_cache(engine.model), logits=False)
    logits = engine.model.lm_head(features[-1:]).float()[0]  # (V,)
    top = logits.topk(2).values.tolist()
    return {
        "margin": top[0] - top[1],
        "gap": abs(float(logits[token_a] - logits[token_b])),
        "vanilla_rank": int((logits > logits[token_a]).sum()),  # 0: the recomputed argmax
        "method_rank": int((logits > logits[token_b]).sum()),
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    same = common_prefix(a, b)
    return None if same == len(a) == len(b) else same


def check_lossless(
    engine: Engine, questions: list[dict], results: list[dict], bound: float, max_new_tokens: int
) -> dict:
    """Compare every method's tokens with vanilla's, turn by turn, stopping at a question's first
    divergence (later turns have different histories). Each divergence carries the target's logit margin
    at that position; `bug` is True when the two tokens' logit gap exceeds `bound` (not a near-tie), or
    when one output stops early without a differing token."""
    vanilla = {r["question_id"]: r for r in results if r["method"] == "vanilla"}
    if not vanilla:
        raise ValueError("--check-lossless compares against vanilla: add vanilla to --methods")
    by_id = {q["question_id"]: q for q in questions}
    compared, divergences = 0, []
    for r in results:
        if r["method"] in ("vanilla",) + OTHER_TARGETS:
            continue
        ref, question = vanilla[r["question_id"]], by_id[r["question_id"]]
        for turn, (want, got) in enumerate(zip(ref["output_ids"], r["output_ids"])):
            compared += 1
            pos = first_difference(want, got)
            if pos is None:
                continue
            entry = {"question_id": r["question_id"], "category": r["category"], "method": r["method"],
                     "turn": turn, "position": pos}  # fmt: skip
            if pos < len(want) and pos < len(got):
                prompt = turn_prompt(engine, question, ref["text"][:turn], max_new_tokens)
                m = logit_margin(engine, prompt + want[:pos], want[pos], got[pos])
                entry.update(vanilla_token=want[pos], method_token=got[pos], **m, bug=m["gap"] > bound)
            else:
                entry.update(vanilla_token=None, method_token=None, margin=None, gap=None, bug=True,
                             note=f"lengths differ ({len(want)} vs {len(got)}) with no differing token")  # fmt: skip
            divergences.append(entry)
            break
    return {
        "bound": bound,
        "compared_turns": compared,
        "divergences": divergences,
        "bugs": sum(d["bug"] for d in divergences),
    }
