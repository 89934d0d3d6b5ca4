"""The benchmark's report files: RESULT.json, a markdown table (RESULT.md) and a chart (RESULT.png)."""

import json
from pathlib import Path


def fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown_report(report: dict) -> str:
    summary, hw, cfg = report["summary"], report["hardware"], report["config"]
    categories = list(dict.fromkeys(c for s in summary.values() for c in s["per_category"]))
    gpu = f", {hw['gpu']}" if hw.get("gpu") else ""
    lines = [
        f"Hardware: {hw['cpu']} ({hw['threads']} threads; {' '.join(hw.get('isa') or []) or 'ISA not recorded'})"
        f"{gpu}; torch {hw['torch']}, transformers {hw['transformers']}. Commit {cfg.get('commit') or 'not recorded'}. "
        f"Model {cfg['model'] or 'default'}, backend {cfg.get('backend') or cfg['dtype']}, {cfg['device']}; "
        f"T={cfg['temperature']}, {cfg['max_new_tokens']} new tokens, {cfg['question_count']} questions; "
        f"tree {cfg['tree']['total_tokens']}/{cfg['tree']['depth']}/{cfg['tree']['top_k']} "
        f"(total tokens/depth/top-k). Peak RSS {fmt(report['memory']['peak_rss_mb'], '.0f', ' MB')}.",
        "",
        f"Command: `{cfg['command']}`",
        "",
        *([f"Backend choice: {cfg['backend_choice']['reason']}.", ""] if cfg.get("backend_choice") else []),
        "| method | tokens/s | speedup vs vanilla | τ | peak GPU memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, s in summary.items():
        o = s["overall"]
        lines.append(
            f"| {method} | {o['tokens_per_s']:.1f} | {fmt(o['speedup_vs_vanilla'], '.2f', 'x')} | "
            f"{o['tau']:.2f} | {fmt(s['peak_memory_mb'], '.0f', ' MB')} |"
        )
    lines += ["", "Speedup vs vanilla per category:", ""]
    lines.append("| method | overall | " + " | ".join(categories) + " |")
    lines.append("|---|" + "---:|" * (len(categories) + 1))
    for method, s in summary.items():
        cells = [fmt(s["overall"]["speedup_vs_vanilla"], ".2f", "x")]
        cells += [fmt(s["per_category"].get(c, {}).get("speedup_vs_vanilla"), ".2f", "x") for c in categories]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    matched = report.get("matched") or []
    if matched:
        lines += [
            "",
            "Speedup on the same text: per turn, each pair of calls timed until the last token both replies",
            "share reached the host (after a near-tie sends two replies apart, they are no longer the same work).",
            "Each row is timed over its own pair's shared text, so rows do not compare with each other:",
            "",
            "| method | against | overall | " + " | ".join(categories) + " |",
            "|---|---|" + "---:|" * (len(categories) + 1),
        ]
        for m in matched:
            cells = [fmt(m["overall"]["speedup"], ".2f", "x")]
            cells += [fmt(m["per_category"].get(c, {}).get("speedup"), ".2f", "x") for c in categories]
            lines.append(f"| {m['method']} | {m['against']} | " + " | ".join(cells) + " |")
    timed = {m: s["overall"] for m, s in summary.items() if "verify_ms_per_cycle" in s["overall"]}
    if timed:
        lines += ["", "Where the engine's time goes (ms; a cycle is one draft plus one verify):", ""]
        lines += [
            "| method | draft per cycle | verify per cycle | prefill per turn | cycles the head drafted |",
            "|---|---:|---:|---:|---:|",
        ]
        for method, o in timed.items():
            head_share = fmt(100 * o["head_share"] if "head_share" in o else None, ".0f", "%")
            lines.append(
                f"| {method} | {o['draft_ms_per_cycle']:.1f} | {o['verify_ms_per_cycle']:.1f} | "
                f"{o['prefill_ms_per_turn']:.1f} | {head_share} |"
            )
    lossless = report.get("lossless")
    if lossless is not None:
        lines += [
            "",
            f"Lossless check: {lossless['compared_turns']} turns compared with vanilla, "
            f"{len(lossless['divergences'])} divergences, {lossless['bugs']} above the near-tie bound "
            f"({lossless['bound']:g} logits).",
        ]
    return "\n".join(lines) + "\n"


def plot_speedups(summary: dict, path: Path, title: str) -> None:
    """Grouped bars: speedup vs vanilla per category (and overall) for every method but vanilla."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m != "vanilla"] or list(summary)
    categories = ["overall"] + list(dict.fromkeys(c for s in summary.values() for c in s["per_category"]))

    def speedup(method, cat):
        stats = summary[method]["overall"] if cat == "overall" else summary[method]["per_category"].get(cat, {})
        return stats.get("speedup_vs_vanilla") or 0.0

    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(categories)), 4.0))
    for i, method in enumerate(methods):
        xs = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(categories))]
        ax.bar(xs, [speedup(method, c) for c in categories], width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_ylabel("speedup vs vanilla (tokens/s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """RESULT.json, RESULT.md beside it, and RESULT.png; returns (md, png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    md.write_text(markdown_report(report))
    plot_speedups(report["summary"], png, chart_title(report))
    return md, png


def chart_title(report: dict) -> str:
    """Model · backend (the dtype for reports without one) · CPU or GPU · temperature."""
    hw, cfg = report["hardware"], report["config"]
    backend = cfg.get("backend") or cfg["dtype"]
    return f"{cfg['model'] or 'default model'} · {backend} · {hw['gpu'] or hw['cpu']} · T={cfg['temperature']}"
