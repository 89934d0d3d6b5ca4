"""The Gradio app: chat tab with the live draft-tree panel, compare tab, and the `chat` API endpoint.

`build_ui(engine, options)` lays out the components and wires their events to the methods of
`app.handlers.Handlers`; it holds no state of its own beyond what it is given. Per-browser state lives in
`gr.State` (a `ChatSession` per session). The one engine is shared by every session through the queue:
all events that run the engine share the concurrency group "engine" with limit 1, so requests run one at
a time and later ones see their queue position; they also hold the engine's `EngineLock`, which orders
them against the OpenAI routes that share the engine (app/serial.py).
"""

import html
import json
from pathlib import Path

import gradio as gr

from app.chat import ChatSession
from app.compare import EXACT_BACKENDS, pane
from app.handlers import Handlers
from app.serial import EngineLock
from app.settings import AppOptions, ChatSettings
from app.stats import method_label
from app.tree_svg import LEGEND, empty_panel
from engine.config import TreeConfig

ENGINE = "engine"  # concurrency group of every event that runs the model
ROOT = Path(__file__).resolve().parent.parent
CSS_PATH = ROOT / "assets" / "style.css"
EXAMPLES_PATH = ROOT / "assets" / "examples.json"


def load_examples(path: str | Path = EXAMPLES_PATH) -> tuple[str, ...]:
    """Example prompts from a JSON list of strings; a missing file means no examples."""
    path = Path(path)
    if not path.exists():
        return ()
    prompts = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{path} must hold a JSON list of strings")
    return tuple(prompts)


# The benchmark's lossless audit per backend (docs/performance.md names the command behind each figure).
AUDITS = {
    "int8": "benchmark audit: 0 of 126 turns differ",
    "bf16": "benchmark audit: 315 of 435 bf16 turns part at a near-tie, none for another reason",
}


def promise(engine) -> str:
    """What greedy decoding guarantees for the backend that runs, in one sentence for the header."""
    name, backend = engine.describe().split(" · ")[0], engine.backend
    audit = f"{AUDITS[backend]}; " if backend in AUDITS else ""
    if backend in EXACT_BACKENDS:  # integer products and float64 attention: batch-independent, bit for bit
        return (
            f"With temperature 0 the reply is identical, token for token, to the one {name} ({backend}) writes "
            f"alone ({audit}docs/performance.md)."
        )
    return (
        f"With temperature 0 the reply is identical to the one {name} ({backend}) writes alone up to rounding "
        f"near-ties: where two tokens tie within {backend} rounding the texts can part ({audit}docs/performance.md)."
    )


def slider_max(trees: list[TreeConfig], field: str, usual: int) -> int:
    """A tree slider's maximum: `usual`, or more when a default tree needs it (so switching trees fits)."""
    return max([usual] + [getattr(t, field) for t in trees])


def build_ui(engine, options: AppOptions | None = None, lock: EngineLock | None = None) -> gr.Blocks:
    """The app's Blocks; `lock` is the engine's, to share with the OpenAI routes (app/openai_api.py)."""
    options = options or AppOptions()
    h = Handlers(engine, options, lock or EngineLock())
    methods = h.methods
    choices = [(method_label(m), m) for m in methods]
    first = options.default_method if options.default_method in methods else methods[0]

    # ---- layout -------------------------------------------------------------------------------

    with gr.Blocks(title=options.title, analytics_enabled=False, fill_width=True) as demo:
        session = gr.State(ChatSession())
        compare_runs = gr.State(None)
        gr.Markdown(
            f"## {options.title}\n"
            f"<span class='engine-line'>{engine.describe()}</span> — a small draft head guesses a tree of "
            "next tokens; the model checks the whole tree in one pass and keeps the longest path it agrees "
            f"with. {promise(engine)}"
        )
        with gr.Sidebar(label="Settings", open=True, width=310):
            system_prompt = gr.Textbox(label="System prompt", value=options.system_prompt, lines=3)
            method = gr.Dropdown(choices, value=first, label="Method (chat)", elem_id="method")
            max_new = gr.Slider(
                1, options.max_new_tokens_limit, value=options.max_new_tokens, step=1, label="Max new tokens"
            )
            temperature = gr.Slider(
                0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                info="0 = greedy: the same text as vanilla decoding", elem_id="temperature",
            )
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p")
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 = off")
            seed = gr.Number(-1, precision=0, label="Seed", info="-1 = random (used when temperature > 0)")
            if options.backend_note:
                backend = html.escape(options.backend_note)
                gr.Markdown(f"<small>Measured on this CPU: {backend}</small>", elem_id="backend-note")
            with gr.Accordion("Draft tree", open=True):
                note = f"Defaults: {options.tree_note}"
                if options.sampling_tree is not None:
                    note += (
                        ". When the temperature is above 0 the sliders switch to the sampling tree "
                        f"(unless you have moved them): {options.sampling_tree_note}"
                    )
                gr.Markdown(f"<small>{html.escape(note)}</small>", elem_id="tree-note")
                t = options.tree
                trees = [t] + ([options.sampling_tree] if options.sampling_tree is not None else [])
                total = gr.Slider(
                    1, slider_max(trees, "total_tokens", 128), value=t.total_tokens, step=1,
                    label="Total drafted tokens",
                    info="EAGLE-2 paper: 60", elem_id="tree-total",
                )
                depth = gr.Slider(
                    1, slider_max(trees, "depth", 12), value=t.depth, step=1, label="Depth",
                    info="EAGLE-2 paper: 6", elem_id="tree-depth",
                )
                tree_k = gr.Slider(
                    1, slider_max(trees, "top_k", 20), value=t.top_k, step=1, label="Top-k per expansion",
                    info="EAGLE-2 only; paper: 10",
                )
                lookup = gr.Slider(
                    0, 32, value=t.lookup, step=1, label="Prompt-lookup branch (tokens)", elem_id="lookup",
                    info="0 = off. Adds tokens copied from the conversation (teal in the tree); still lossless",
                )
                adaptive = gr.Checkbox(
                    value=t.adaptive, label="Rest the draft head when it does not pay", elem_id="adaptive",
                    info="Where the head's guesses are rarely accepted, verify only the copied branch (or one "
                    "token) and try the head again now and then. Greedy text is unchanged",
                )
        # The settings components' values reach the handlers in ChatSettings's field order.
        panel = dict(
            max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k, total_tokens=total,
            depth=depth, tree_top_k=tree_k, seed=seed, lookup=lookup, adaptive=adaptive,
        )
        settings = [panel[name] for name in ChatSettings.names()]

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, min_width=420):
                        chatbot = gr.Chatbot(
                            label="Chat", height=500, elem_id="chatbot", feedback_options=None, buttons=["copy"]
                        )
                        notice = gr.Markdown(elem_id="notice", elem_classes=["notice"])
                        with gr.Row():
                            msg = gr.Textbox(
                                placeholder="Message the model (Enter sends, Shift+Enter for a new line)",
                                show_label=False, lines=1, max_lines=8, scale=6, elem_id="msg", autofocus=True,
                            )
                            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
                            stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
                        with gr.Row():
                            regen = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                            clear = gr.Button("Clear", size="sm", elem_id="clear")
                            tint = gr.Checkbox(
                                label="Tint tokens: accepted drafts vs target", value=False, elem_id="tint"
                            )
                        stats = gr.Markdown(elem_id="stats", elem_classes=["stats"])
                        tint_legend = gr.HTML("", js_on_load=None)
                        if options.examples:
                            gr.Examples([[e] for e in options.examples], inputs=[msg], label="Example prompts")
                    with gr.Column(scale=2, min_width=360):
                        gr.Markdown("### Draft tree, cycle by cycle")
                        with gr.Row(equal_height=True):
                            prev = gr.Button("◀ Previous", size="sm", min_width=60, elem_id="prev-cycle")
                            cycle = gr.Slider(
                                0, 1, value=0, step=1, label="Cycle of the last reply", interactive=False,
                                elem_id="cycle-slider", scale=3,
                            )
                            nxt = gr.Button("Next ▶", size="sm", min_width=60, elem_id="next-cycle")
                        tree = gr.HTML(empty_panel(), elem_id="tree-panel", js_on_load=None)
                        gr.HTML(LEGEND, js_on_load=None)

            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "One prompt, two methods, same settings (sidebar). Each method is timed running **alone**, "
                    "one after the other; then both runs are replayed side by side at their measured speeds."
                )
                cmp_prompt = gr.Textbox(label="Prompt", lines=3, elem_id="cmp-prompt")
                with gr.Row():
                    method_a = gr.Dropdown(choices, value="vanilla", label="Left", elem_id="method-a")
                    method_b = gr.Dropdown(choices, value=methods[0], label="Right", elem_id="method-b")
                    cmp_run = gr.Button("Run comparison", variant="primary", elem_id="cmp-run")
                    cmp_stop = gr.Button("Stop", variant="stop", elem_id="cmp-stop")
                    cmp_replay = gr.Button("Replay", elem_id="cmp-replay")
                with gr.Row(equal_height=True):
                    pane_a = gr.HTML(pane(None, method_label("vanilla"), "idle"), elem_id="pane-a", js_on_load=None)
                    pane_b = gr.HTML(pane(None, method_label(methods[0]), "idle"), elem_id="pane-b", js_on_load=None)
                cmp_summary = gr.Markdown(elem_id="cmp-summary")
                if options.examples:
                    gr.Examples([[e] for e in options.examples], inputs=[cmp_prompt], label="Example prompts")

        # ---- events ---------------------------------------------------------------------------
        private = dict(api_visibility="private")
        engine_run = dict(concurrency_id=ENGINE, concurrency_limit=1, **private)
        # Steps that do not run the engine (input checks, showing the pending message, replays): queued,
        # so errors and warnings reach the browser as messages, but never waiting behind a generation.
        quick = dict(concurrency_limit=None, show_progress="hidden", **private)
        stream_outputs = [msg, chatbot, session, tree, stats, notice, cycle]
        stream_inputs = [session, system_prompt, tint, method, *settings]

        def then_stream(accepted) -> None:  # a claimed session: show the pending message, then stream
            accepted.success(h.show_pending, [session, tint], [msg, chatbot], **quick).success(
                h.stream_chat, stream_inputs, stream_outputs, show_progress="minimal", show_progress_on=[chatbot],
                **engine_run,
            )  # fmt: skip

        then_stream(gr.on([msg.submit, send.click], h.accept_message, [msg, session], [session], **quick))
        then_stream(regen.click(h.accept_regenerate, [session], [session], **quick))
        stop_btn.click(h.stop, [session], None, queue=False, **private)
        clear.click(h.clear_chat, [session], [chatbot, session, tree, stats, notice, cycle], queue=False, **private)
        tint.change(h.retint, [session, tint], [chatbot, tint_legend], queue=False, **private)
        if options.sampling_tree is not None:
            temperature.change(
                h.follow_temperature, [temperature, total, depth, tree_k], [total, depth, tree_k], queue=False,
                **private,
            )
        cycle.input(h.show_cycle, [session, cycle], [tree, cycle], queue=False, **private)
        prev.click(h.previous_cycle, [session, cycle], [tree, cycle], queue=False, **private)
        nxt.click(h.next_cycle, [session, cycle], [tree, cycle], queue=False, **private)

        cmp_run.click(h.accept_compare, [cmp_prompt, session], [session], **quick).success(
            h.compare_measure,
            [session, system_prompt, method_a, method_b, *settings],
            [pane_a, pane_b, cmp_summary, compare_runs],
            show_progress="minimal",
            show_progress_on=[pane_a, pane_b],
            **engine_run,
        ).success(h.compare_replay, [compare_runs, tint], [pane_a, pane_b, cmp_summary], **quick)
        cmp_stop.click(h.stop, [session], None, queue=False, **private)
        cmp_replay.click(h.compare_replay, [compare_runs, tint], [pane_a, pane_b, cmp_summary], **quick)

        gr.api(h.chat_api(), api_name="chat", concurrency_id=ENGINE, concurrency_limit=1)

    demo.queue(default_concurrency_limit=1)
    return demo
