"""The GPU check's markdown summary (scripts/gpu_check.py): one table per step's numbers."""


def _f(value, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


def lossless_md(r: dict) -> list[str]:
    rows = [[m, f"{x['equal']}/{x['prompts']}", f"{x['tau']:.2f}", x["first_divergence"]]
            for m, x in r["methods"].items()]  # fmt: skip
    return [f"{r['model']}, {r['dtype']}, {r['new_tokens']} new tokens; passed: **{r['passed']}**", "",
            *_table(["method", "equal to vanilla", "τ", "first divergence"], rows)]  # fmt: skip


def bench_md(r: dict) -> list[str]:
    keys = ("tokens_per_s", "speedup_vs_vanilla", "tau", "ms_per_cycle", "draft_ms_per_cycle",
            "draft_ms_per_head_cycle", "verify_ms_per_cycle", "head_share")  # fmt: skip
    rows = [[m] + [_f(x.get(k), ".2f") for k in keys] for m, x in r["methods"].items()]
    lossless = f"; lossless audit: {r['lossless']}" if "lossless" in r else ""
    return [f"{r['questions']} questions, {r['new_tokens']} new tokens, tree {r['tree']}; report "
            f"{r['report']}{lossless}", "", *_table(["method", "tokens/s", "vs vanilla", "τ", "ms/cycle",
            "draft ms/cycle", "draft ms/head cycle", "verify ms/cycle", "head share"], rows)]  # fmt: skip


SPLIT = ("ms_per_cycle", "draft_ms_per_cycle", "draft_ms_per_head_cycle", "verify_ms_per_cycle", "host_ms_per_cycle",
         "cycles", "head_cycles", "tau")  # fmt: skip


def profile_md(r: dict) -> list[str]:
    runs = dict(r["methods"]) | {"eagle2, no cuDNN SDPA": r["eagle2_without_cudnn_sdpa"]}
    rows = [[m] + [_f(x[k], ".2f") if isinstance(x[k], float) else x[k] for k in SPLIT] for m, x in runs.items()]
    lines = [f"{r['model']}, {r['dtype']}, {r['new_tokens']} new tokens (ms; all tables in profile-*.txt)", "",
             *_table(["run", "per cycle", "draft", "draft per head cycle", "verify", "host", "cycles",
                      "head cycles", "τ"], rows)]  # fmt: skip
    for m, x in r["methods"].items():
        ops = [[f"`{o['name']}`", o["calls"], _f(o["self_cpu_ms"], ".2f"), _f(o["self_device_ms"], ".2f")]
               for o in x["top_ops"]]  # fmt: skip
        lines += ["", f"Top ops, {m}:", "", *_table(["op", "calls", "self CPU ms", "self device ms"], ops)]
    return lines


def verify_md(r: dict) -> list[str]:
    curves = {k: v for k, v in r.items() if k != "model"}
    sizes = next(iter(curves.values()))["verify_ms"]  # the tree sizes measured, in order
    rows = [[n] + [_f(c["verify_ms"].get(n), ".2f") for c in curves.values()] for n in sizes]
    rows.append(["draft, tree's depth and top-k"] + [_f(c["draft_ms"], ".2f") for c in curves.values()])
    context = next(iter(curves.values()))["context"]
    return [f"{r['model']}; ms per target forward after {context} tokens", "", *_table(["tree nodes", *curves], rows)]


def probe_md(r: dict) -> list[str]:
    runs = [k for k in ("engine_vanilla", "hf_static", "hf_static_compiled") if k in r]
    rows = [[k, _f(r[k]["tokens_per_s"]), _f(r[k]["decode_ms_per_token"], ".2f")] for k in runs]
    lines = [f"random {r['config']} Llama ({r['weights']}), {r['prompt_tokens']}-token prompt, {r['new_tokens']} "
             "new tokens", "", *_table(["run", "tokens/s (prefill incl.)", "decode ms/token"], rows)]  # fmt: skip
    if "verify" in r:
        v = r["verify"]
        row = ["verify ms", *(f"{ms:.2f}" for ms in v["verify_ms"].values())]
        lines += ["", *_table(["tree nodes", *v["verify_ms"]], [row]),
                  "", f"64-node verify / 1-token step: {_f(v['ratio_64_to_1'], '.2f')}x; draft of the tree "
                  f"{v['draft_ms']:.2f} ms"]  # fmt: skip
    return lines


def render(summary: dict, renderers: dict) -> str:
    """The markdown summary: the steps table, then each step's numbers (`renderers`: step name -> the
    function that turns its numbers into markdown lines)."""
    env, config = summary["environment"], summary["config"]
    lines = [f"# GPU check — {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, bitsandbytes {env['bitsandbytes']}, "
             f"commit {env['commit']}; {summary['total_s']:.0f} s of a {config['budget_s']:.0f} s budget.", "",
             f"`{config['command']}`", "", *(f"- {note}" for note in config["notes"]), ""]  # fmt: skip
    notes = [[s["name"], s["status"], f"{s['seconds']:.1f}", s.get("reason") or s.get("error") or ""]
             for s in summary["steps"]]  # fmt: skip
    lines += _table(["step", "status", "seconds", "note"], notes)
    for s in summary["steps"]:
        if s.get("result"):
            lines += ["", f"## {s['name']}", "", *renderers[s["name"]](s["result"])]
    return "\n".join(lines) + "\n"
