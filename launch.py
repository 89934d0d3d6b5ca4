"""Start the chat app: load the model and draft head once, build the engine, serve the Gradio UI and the
OpenAI-compatible API (/v1) from one process.

    python launch.py                      # default model + head, opens the browser
    python launch.py --no-browser --port 7861
    python launch.py --share --auth me:secret

This is the app's command line; the engine and the UI receive built objects. The engine's tools
(engine.bench, engine.autotune, engine.evaluate, engine.train) have command lines of their own, and all of
them read the model, head and hardware flags the same way (engine/cli.py).
"""

import argparse
import socket
import sys
import time
from dataclasses import replace

from engine.config import DEFAULT_LOOKUP, TreeConfig

DESCRIPTION = """\
Chat with a language model made faster by EAGLE-2 speculative decoding, and watch how: a small draft
head proposes a tree of candidate tokens, the model verifies the whole tree in one forward pass, and the
UI draws each cycle's tree, the accepted path and the speed. A Compare tab times two methods side by side.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model", default=None, metavar="ID_OR_PATH",
        help="target model: a Hugging Face id, a local folder (save_pretrained layout) or a .gguf file. "
        "Default: SmolLM2-135M-Instruct, fetched once and cached for offline use.",
    )
    m.add_argument(
        "--head", default=None, metavar="PATH",
        help="EAGLE draft head folder (config.json + model.safetensors, official EAGLE layout). "
        "Default: assets/heads/smollm2-135m-instruct, the head trained for the default model.",
    )
    m.add_argument("--no-head", action="store_true", help="run without a draft head: only vanilla decoding.")
    quant = m.add_mutually_exclusive_group()
    quant.add_argument(
        "--load-in-4bit", action="store_true", help="quantize the target to 4-bit NF4 (bitsandbytes; CPU or CUDA)."
    )
    quant.add_argument(
        "--load-in-8bit", action="store_true", help="quantize the target to 8-bit (bitsandbytes; CPU or CUDA)."
    )
    m.add_argument(
        "--tree",
        default="auto",
        metavar="auto|paper|TOTAL,DEPTH,TOPK",
        help="default draft-tree settings. auto (default): measured on this machine once per model, head, dtype "
        "and device (about a minute the first time, then cached); paper: the EAGLE-2 paper's 60,6,10; "
        "or three numbers, e.g. 40,5,8.",
    )
    m.add_argument(
        "--sampling-tree",
        default="auto",
        metavar="auto|same|TOTAL,DEPTH,TOPK",
        help="the draft tree the app switches to when the temperature is above 0 (sampling accepts fewer "
        "drafts, so a smaller tree pays). auto (default): with --tree auto, tuned on this machine for "
        "sampling at temperature 1 (about two minutes the first time, then cached), else the --tree "
        "settings; same: always the --tree settings; or three numbers.",
    )
    m.add_argument(
        "--lookup", type=int, default=DEFAULT_LOOKUP, metavar="N",
        help="add a prompt-lookup branch of up to N tokens copied from the conversation to every draft tree "
        "(still lossless; helps replies that quote their input). Default: %(default)s; 0 turns it off.",
    )
    m.add_argument(
        "--adaptive", action="store_true",
        help="rest the draft head while its guesses do not pay for their time (on text it cannot predict), "
        "verifying only the copied branch or one token, and probe it again now and then. Greedy output is "
        "unchanged. Off by default: on this project's 2-core CPU it broke even (README, Performance).",
    )
    m.add_argument(
        "--method", default="auto", choices=("auto", "eagle2", "eagle1", "vanilla"),
        help="the decoding method selected when the page opens (the sidebar changes it). auto (default): EAGLE-2, "
        "or vanilla where this machine's measurement found no draft tree faster than vanilla decoding.",
    )
    m.add_argument(
        "--backend", default="auto", choices=("auto", "int8", "fp32", "bf16", "fp16", "bnb-8bit", "bnb-4bit"),
        help="how the target runs. auto (default): on a CPU, int8, fp32 and bf16 are timed on this machine "
        "(seconds, then cached) and the one that gives the most tokens/s is kept, with vanilla decoding as "
        "the default method where no draft tree pays; on CUDA, bf16 (fp16 where unsupported). int8: int8 "
        "weights and activations (CPU); its replies are the int8 model's own. --dtype and --load-in-* also "
        "pick a backend.",
    )
    m.add_argument(
        "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N. Default: auto."
    )
    m.add_argument(
        "--dtype", default="auto",
        help="auto, float32, bfloat16 or float16 (also fp32/bf16/fp16). Default auto: bf16 on CPU and on "
        "CUDA where supported, else fp16.",
    )
    s = p.add_argument_group("server")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 serves your network. Default: 127.0.0.1."
    )
    s.add_argument("--port", type=int, default=7860, help="port to listen on. Default: 7860.")
    s.add_argument(
        "--share", action="store_true",
        help="also create a public Gradio share link (needs internet). Anyone with the link can use your "
        "machine: combine it with --auth.",
    )
    s.add_argument(
        "--auth", default=None, metavar="USER:PASSWORD",
        help="require this login in the browser, the Gradio API and the OpenAI API at /v1 (there as the bearer "
        "token user:password, or HTTP basic authentication).",
    )
    s.add_argument("--no-browser", action="store_true", help="do not open a browser tab on start.")
    s.add_argument("--max-new-tokens", type=int, default=256, help="default reply length in the UI. Default: 256.")
    return p.parse_args(argv)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like user:password (both parts non-empty)")
    return user, password


def parse_tree_arg(value: str, flag: str, words: tuple[str, ...]) -> "str | TreeConfig":
    """One of `words`, or TOTAL,DEPTH,TOPK as a validated TreeConfig; ValueError names the flag."""
    if value in words:
        return value
    expected = f"{flag} {value!r} is not {', '.join(words)} or TOTAL,DEPTH,TOPK"
    parts = value.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{expected} (three whole numbers, e.g. 4,2,4)")
    tree = TreeConfig(*(int(p) for p in parts))
    try:
        tree.validate()
    except ValueError as err:
        raise ValueError(f"{expected} ({err})") from None
    return tree


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (in use, no such address), or None when it can.
    Checked before the model loads, so a busy port costs a second, not the load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
            s.bind(address)
    except OSError as err:
        return str(err.strerror or err)
    return None


def step(message: str) -> float:
    print(f"• {message}…", flush=True)
    return time.perf_counter()


def done(start: float, detail: str = "") -> None:
    print(f"  done in {time.perf_counter() - start:.1f} s{': ' + detail if detail else ''}", flush=True)


def sampled_method(tuned) -> tuple[str | None, str]:
    """What "auto" runs at temperature > 0 given the sampling tune, and why: vanilla where the best
    sampling tree is not expected to beat it by SAMPLED_MARGIN (engine/backend.py), else None (the same
    method as greedy)."""
    from engine.backend import SAMPLED_MARGIN

    if tuned.speedup >= SAMPLED_MARGIN:
        return None, ""
    return "vanilla", (
        f"Auto runs vanilla when sampling: the best sampling tree is expected at {tuned.speedup:.2f}x vanilla "
        f"on this machine, under the {SAMPLED_MARGIN:.2f}x that sampled drafting needs to pay here."
    )


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = parse_auth(args.auth)
    except ValueError as err:
        return fail(str(err))
    if args.share and auth is None:
        print(
            "warning: --share without --auth makes this model public to anyone who has the link; "
            "consider adding --auth user:password",
            file=sys.stderr, flush=True,
        )
    if not 0 < args.port < 65536:
        return fail(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_new_tokens < 1:
        return fail(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.lookup <= 64:
        return fail(f"--lookup must be between 0 (off) and 64 tokens, got {args.lookup}")
    problem = port_problem(args.host, args.port)
    if problem:
        return fail(f"cannot serve on {args.host}:{args.port} ({problem}); pick another --port")
    try:
        tree_arg = parse_tree_arg(args.tree, "--tree", ("auto", "paper"))
        sampling_tree_arg = parse_tree_arg(args.sampling_tree, "--sampling-tree", ("auto", "same"))
    except ValueError as err:
        return fail(str(err))

    t = step("Loading libraries (torch, transformers, gradio)")
    from app import AppOptions, build_ui, load_examples
    from app.openai_api import mount_openai
    from app.serial import EngineLock
    from app.ui import CSS_PATH
    from engine.backend import spec_for
    from engine.checkpoint import load_head
    from engine.cli import head_folder, model_spec
    from engine.decode import Engine
    from engine.models import load_target, resolve_device

    done(t)

    head_path, found = (None, False) if args.no_head else head_folder(args.head)
    if not args.no_head and args.head is None and not found:
        print(
            f"warning: no draft head at {head_path}; only vanilla decoding is available. "
            f"Pass --head PATH to use one (or --no-head to silence this).",
            file=sys.stderr, flush=True,
        )
    spec = model_spec(args)  # a named --backend is applied there
    measure = args.backend == "auto" and spec.dtype == "auto" and spec.quantization is None
    measure = measure and resolve_device(spec.device).type == "cpu"
    if measure:
        spec = spec_for("fp32", spec)  # the candidates are derived from the float32 weights
    t = step(f"Loading the model ({args.model or 'default: SmolLM2-135M-Instruct'})")
    try:
        model, tokenizer = load_target(spec)
    # ModelLoadError is a RuntimeError; ImportError/RuntimeError also cover bitsandbytes without CUDA.
    except (RuntimeError, ValueError, OSError, ImportError) as err:
        return fail(f"could not load the model: {err}")
    done(t)

    head, tuning, backend_note = None, None, ""
    if measure and found:
        from engine.autotune.backends import tune_cpu

        t = step("Choosing the backend and the draft trees for this CPU (timed once, then cached)")
        try:
            engine, tuning = tune_cpu(model, tokenizer, head_path, progress=True)
        except (ValueError, OSError) as err:
            return fail(f"could not load the draft head: {err}")
        del model
        head = engine.head
        backend_note = tuning.choice.reason()
        done(t, backend_note)
    else:
        if measure:  # no head: only vanilla decoding runs, so the fastest one-token step wins
            from engine.autotune.backends import fastest_vanilla

            t = step("Choosing the backend for this CPU (no draft head: the fastest one-token step)")
            model, timings = fastest_vanilla(model)
            backend_note = ", ".join(f"{name} {ms:.1f} ms" for name, ms in timings.items()) + " per token"
            done(t, backend_note)
        if found:
            t = step(f"Loading the draft head ({head_path})")
            try:
                head = load_head(head_path, model)
            except (ValueError, OSError) as err:
                return fail(f"could not load the draft head: {err}")
            done(t)
        engine = Engine(model, tokenizer, head)
    print(f"• Engine ready: {engine.describe()}", flush=True)
    if engine.backend == "int8":
        from engine.kernels import kernel_status

        print(f"• int8 forward: {kernel_status()}", flush=True)
    tree = TreeConfig()
    tree_note = f"EAGLE-2 paper defaults ({tree.describe()})"
    sampling_tree, sampling_note, sampled_result = None, "", None
    default_method = "eagle2" if head is not None else "vanilla"
    if tuning is not None:
        default_method = tuning.choice.method
    if isinstance(tree_arg, TreeConfig):
        tree, tree_note = tree_arg, "set by --tree"
    elif tuning is not None and tree_arg == "auto":
        tree, tree_note = tuning.greedy.tree, tuning.greedy.summary()
        print(f"• {tree_note}", flush=True)
        if sampling_tree_arg == "auto":
            sampling_tree, sampling_note = tuning.sampling.tree, tuning.sampling.summary()
            sampled_result = tuning.sampling
            print(f"• {sampling_note}", flush=True)
    elif head is not None and tree_arg == "auto":
        from engine.autotune.cache import load_or_tune_result
        from engine.config import SamplingConfig

        t = step("Auto-tuning the draft tree for this machine (cached after the first run)")
        tuned = load_or_tune_result(engine, progress=True)
        tree, tree_note = tuned.tree, tuned.summary()
        if tuned.speedup < 1.0:  # never run by default what this machine measured slower than vanilla
            default_method = "vanilla"
        done(t)
        print(f"• {tree_note}", flush=True)
        if sampling_tree_arg == "auto":
            t = step("Auto-tuning the draft tree for sampling at temperature 1 (cached after the first run)")
            tuned = load_or_tune_result(engine, progress=True, sampling=SamplingConfig(temperature=1.0))
            sampling_tree, sampling_note = tuned.tree, tuned.summary()
            sampled_result = tuned
            done(t)
            print(f"• {sampling_note}", flush=True)
    sampling_method, sampling_method_note = None, ""
    if sampling_tree_arg == "auto" and sampled_result is not None and default_method != "vanilla":
        sampling_method, sampling_method_note = sampled_method(sampled_result)
        if sampling_method_note:
            print(f"• {sampling_method_note}", flush=True)
    if isinstance(sampling_tree_arg, TreeConfig):
        sampling_tree, sampling_note = sampling_tree_arg, f"{sampling_tree_arg.describe()}, set by --sampling-tree"
    if args.adaptive:
        tree = replace(tree, adaptive=True)
        tree_note += "; the head rests where it does not pay (--adaptive)"
        if sampling_tree is not None:
            sampling_tree = replace(sampling_tree, adaptive=True)
    if args.lookup:
        tree = replace(tree, lookup=args.lookup)
        tree_note += f"; prompt-lookup branch of {args.lookup} tokens (--lookup)"
        if sampling_tree is not None:
            sampling_tree = replace(sampling_tree, lookup=args.lookup)
    if args.method != "auto":
        if args.method != "vanilla" and head is None:
            return fail(f"--method {args.method} needs a draft head (see --head)")
        default_method, sampling_method = args.method, None
    try:
        examples = load_examples()
    except ValueError as err:
        return fail(str(err))
    options = AppOptions(
        examples=examples, max_new_tokens=args.max_new_tokens, tree=tree, tree_note=tree_note,
        sampling_tree=sampling_tree, sampling_tree_note=sampling_note, default_method=default_method,
        sampling_method=sampling_method, sampling_method_note=sampling_method_note,
        backend_note=backend_note,
    )
    lock = EngineLock()  # one generation at a time, shared by the UI and the OpenAI routes
    demo = build_ui(engine, options, lock)

    t = step(f"Starting the web UI on {args.host}:{args.port}")
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            inbrowser=not args.no_browser,
            css_paths=[CSS_PATH],
            prevent_thread_lock=True,
            footer_links=["api", "gradio"],
            quiet=True,
        )
    except OSError as err:
        return fail(f"could not start the server on {args.host}:{args.port} ({err}); try another --port")
    mount_openai(demo, engine, options, lock)
    done(t)
    print(f"• Serving at {demo.local_url} (OpenAI-compatible API at {demo.local_url.rstrip('/')}/v1)", flush=True)
    if args.share:
        if demo.share_url:
            print(f"• Public share link: {demo.share_url}", flush=True)
        else:
            print(
                "warning: the share link could not be created (no internet, or the Gradio share server is "
                f"unreachable). The app keeps running locally at {demo.local_url}.",
                file=sys.stderr, flush=True,
            )
    print("• Press Ctrl+C to stop.", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
