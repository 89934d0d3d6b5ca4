"""The one-line speed summary shown under the chat and in each compare pane.

Numbers come straight from the engine's running `totals` (see engine/events.py): tokens/s is new tokens
over wall time since generation started (prefill included), τ is the mean number of tokens committed per
cycle (accepted drafts + bonus token; 1.0 for vanilla), draft and verify times are per-cycle means. Where
the engine started from the KV cache of the last request, the line says how many prompt tokens it reused.
"""

METHOD_LABELS = {
    "eagle2": "EAGLE-2 (dynamic tree)",
    "eagle1": "EAGLE-1 (static tree)",
    "vanilla": "Vanilla (one token per forward)",
}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def stats_line(totals: dict, method: str | None = None) -> str:
    cycles = int(totals.get("cycles", 0))
    per_cycle = max(cycles, 1)
    parts = [
        f"{totals.get('tokens_per_s', 0.0):.1f} tokens/s",
        f"τ {totals.get('tau', 0.0):.2f}",
        f"{cycles} cycle{'s' if cycles != 1 else ''}",
        f"draft {totals.get('draft_ms', 0.0) / per_cycle:.1f} ms/cycle",
        f"verify {totals.get('verify_ms', 0.0) / per_cycle:.1f} ms/cycle",
        f"{int(totals.get('new_tokens', 0))} tokens in {totals.get('elapsed_s', 0.0):.2f} s",
    ]
    cached = int(totals.get("cached_tokens", 0))
    if cached:  # the earlier turns' K/V were kept: only the new part of the prompt was prefilled
        parts.append(f"{cached} prompt tokens cached")
    prefix = f"{method_label(method)}: " if method else ""
    return prefix + " · ".join(parts)


def speedup_line(tokens_per_s_a: float, tokens_per_s_b: float, label_a: str, label_b: str) -> str:
    if tokens_per_s_a <= 0:
        return f"{label_b}: {tokens_per_s_b:.1f} tokens/s ({label_a} produced no tokens)"
    ratio = tokens_per_s_b / tokens_per_s_a
    verdict = f"{ratio:.2f}× speed-up" if ratio >= 1 else f"{ratio:.2f}× (slower)"
    return (
        f"{label_b} ran at {tokens_per_s_b:.1f} tokens/s vs {tokens_per_s_a:.1f} tokens/s for {label_a}: {verdict}"
    )
