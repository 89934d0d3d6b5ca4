"""The benchmark's numbers: tokens/s, speedup over vanilla and τ per method and category, and matched
timing, each of this engine's methods against another method over the text both replies share."""

from engine.bench.methods import BASELINES
from engine.decode import common_prefix


def _rates(rows: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    cycles = sum(r["cycles"] for r in rows)
    turns = sum(r["turns"] for r in rows)
    rates = {
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "tau": (tokens - turns) / cycles if cycles else 0.0,
        "new_tokens": tokens,
        "wall_s": wall,
    }
    if rows and cycles and all("phase_ms" in r for r in rows):
        rates["draft_ms_per_cycle"] = sum(r["phase_ms"]["draft_ms"] for r in rows) / cycles
        rates["verify_ms_per_cycle"] = sum(r["phase_ms"]["verify_ms"] for r in rows) / cycles
        rates["prefill_ms_per_turn"] = sum(r["phase_ms"]["prefill_ms"] for r in rows) / turns
        if all("head_cycles" in r for r in rows):  # results from before the adaptive head lack it
            rates["head_share"] = sum(r["head_cycles"] for r in rows) / cycles
    return rates


def summarize(results: list[dict], memory_mb: dict[str, float] | None = None) -> dict:
    """Per method, overall and per category: tokens/s, speedup over vanilla on the same questions, tau."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    categories = list(dict.fromkeys(r["category"] for r in results))

    def group(method, category=None):
        return [r for r in results if r["method"] == method and category in (None, r["category"])]

    summary = {}
    for method in methods:
        overall = _rates(group(method))
        per_category = {c: _rates(group(method, c)) for c in categories if group(method, c)}
        for cat, stats in [(None, overall), *per_category.items()]:
            base = _rates(group("vanilla", cat)) if "vanilla" in methods else None
            stats["speedup_vs_vanilla"] = (
                stats["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] > 0 else None
            )
        summary[method] = {
            "overall": overall,
            "per_category": per_category,
            "peak_memory_mb": (memory_mb or {}).get(method),
        }
    return summary


def _time_to(marks: list[list], tokens: int) -> float | None:
    """Seconds until a reply had at least `tokens` tokens on the host (None if its marks never got there)."""
    return next((t for n, t in marks if n >= tokens), None)


def _matched_stats(pairs: list[tuple[dict, dict, int]]) -> dict:
    """Totals over (method row, against row, turn) of the shared tokens and the seconds each call took to
    deliver them (from its start, prefill included: a first forward may bring several tokens at once)."""
    tokens, method_s, against_s, shared_turns = 0, 0.0, 0.0, 0
    for a, b, turn in pairs:
        shared = common_prefix(a["output_ids"][turn], b["output_ids"][turn])
        times = [_time_to(row["emit_marks"][turn], shared) for row in (a, b)]
        if shared == 0 or None in times:  # nothing shared (or marks cut short: nothing to time)
            continue
        tokens, shared_turns = tokens + shared, shared_turns + 1
        method_s, against_s = method_s + times[0], against_s + times[1]
    return {
        "turns": len(pairs),
        "shared_turns": shared_turns,
        "tokens": tokens,
        "method_s": method_s,
        "against_s": against_s,
        "speedup": against_s / method_s if method_s > 0 else None,
    }


def matched_speedups(results: list[dict], against: list[str] | None = None) -> list[dict]:
    """Each of this engine's methods against each method in `against` (default: vanilla and the
    baselines), timed over the text both replies share (per turn; a later turn only where every earlier
    reply was the same, so that the prompt is).

    Rows without emit marks (answers resumed from an older checkpoint) are left out."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    rows = {(r["question_id"], r["method"]): r for r in results if "emit_marks" in r}
    if against is None:
        against = [m for m in methods if m == "vanilla" or m in BASELINES]
    out = []
    for method in methods:
        for other in against:
            if other == method or method in BASELINES:  # this engine's methods against the others
                continue
            pairs = {}  # category -> [(method row, against row, turn)]
            for (qid, name), row in rows.items():
                twin = rows.get((qid, other))
                if name == method and twin is not None:  # a later turn counts only after the same history
                    same = [t for t in range(row["turns"]) if row["output_ids"][:t] == twin["output_ids"][:t]]
                    pairs.setdefault(row["category"], []).extend((row, twin, t) for t in same)
            if pairs:
                out.append({
                    "method": method,
                    "against": other,
                    "overall": _matched_stats([p for ps in pairs.values() for p in ps]),
                    "per_category": {c: _matched_stats(ps) for c, ps in pairs.items()},
                })
    return out
