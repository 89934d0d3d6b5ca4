"""The Gradio app: chat tab with the live draft-tree panel, compare tab, and the `chat` API endpoint.

`build_ui(engine, options)` lays out the components and wires their events to the methods of
`app.handlers.Handlers`; it holds no state of its own beyond what it is given. Per-browser state lives in
`gr.State` (a `ChatSession` per session). The one engine is shared by every session through the queue:
the events that run the engine wait for the engine's `EngineLock` (app/serial.py), which runs one request at
a time in arrival order across the page, the `chat` API and the OpenAI routes; a waiting chat shows how
many requests are ahead, and Stop takes it out of the line at once.
"""

import html
import json
from pathlib import Path

import gradio as gr

from app.chat import ChatSession
from app.compare import EXACT_BACKENDS, pane
from app.handlers import Handlers
from app.serial import EngineLock
from app.settings import AUTO, AppOptions, ChatSettings, opening_method
from app.stats import method_label
from app.tree_svg import LEGEND, empty_panel

ENGINE = "engine"  # concurrency group of the `chat` API (the lock orders it against the rest)
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


# At 1280x800 and up the chat, the tree panel and the stats line fit in the window: the chat and the tree
# take the height the header, tabs, input and stats leave, with room for a stats line of three rows and a
# header of three (tests/test_e2e_browser.py measures it).
CHAT_HEIGHT = "calc(100vh - 450px)"
TREE_CSS = ".tree-scroll { max-height: calc(100vh - 510px); min-height: 120px; }"
PHONE_PX = 768  # below this width the settings sidebar would cover the page: it starts closed
CLOSE_SIDEBAR_ON_PHONE = f"""() => {{
  const bar = document.querySelector('.sidebar.open');
  if (bar && window.innerWidth < {PHONE_PX}) bar.querySelector('.toggle-button').click();
}}"""

HOW_TO_READ = """
Each **cycle** the draft head guesses a tree of next tokens from the last committed one (the **root**, left);
the model checks the whole tree in one forward pass and keeps the longest path it agrees with.

- **Accepted path** (green outline): drafted tokens the model would have written itself; they join the reply.
  **Rejected** (faded): guesses it disagreed with. **Darker blue** = the head was more confident in that
  path; **teal** = copied from the conversation by the prompt-lookup branch.
- **★ Bonus token** (dashed orange): the model's own next token after the accepted path, computed in the same
  pass. Every cycle adds at least this one token, so a cycle is never worse than a plain decoding step.
- **τ** (tau): tokens committed per cycle on average, accepted drafts plus the bonus; 1.00 for vanilla.
- **draft / verify ms/cycle**: time the head spends guessing and the model spends checking, per cycle;
  tokens/s is new tokens over wall time, the prompt's prefill included.
- **␣** is a space, **↵** a newline, **∅** a token that is only part of a character; names like
  `<|im_end|>` are special tokens (that one ends the reply).
- **Tint tokens** colours the reply: green = accepted drafts, orange = the model's own tokens.
- In the message box, Enter sends and Shift+Enter starts a new line.
"""


def tree_values_note(options: AppOptions) -> str:
    """The sidebar's line on the trees in use: their values, and where they came from."""
    why, sampling_why = html.escape(options.tree_note), html.escape(options.sampling_tree_note)
    note = f"In use at temperature 0: **{options.tree.describe()}** ({why})."
    if options.sampling_tree is not None:
        note += (
            f" Above 0: **{options.sampling_tree.describe()}** ({sampling_why}); the sliders "
            "switch to it unless you have moved them."
        )
    return note


def build_ui(engine, options: AppOptions | None = None, lock: EngineLock | None = None) -> gr.Blocks:
    """The app's Blocks; `lock` is the engine's, to share with the OpenAI routes (app/openai_api.py)."""
    options = options or AppOptions()
    h = Handlers(engine, options, lock or EngineLock())
    methods = h.methods
    def label(m: str) -> str:
        return options.auto_label() if m == AUTO else method_label(m)

    choices = [(label(m), m) for m in methods]
    first = opening_method(options, methods)
    ranges = h.ranges

    def slider(name: str, value, **kw) -> gr.Slider:  # bounds and label from the one table of ranges
        field = ranges[name]
        return gr.Slider(field.low, field.high, value=value, label=field.label, **kw)

    # ---- layout -------------------------------------------------------------------------------

    with gr.Blocks(title=options.title, analytics_enabled=False, fill_width=True) as demo:
        session = gr.State(ChatSession())
        compare_runs = gr.State(None)
        gr.Markdown(
            f"### {options.title}\n<span class='engine-line'>{engine.describe()}</span> — {promise(engine)}",
            elem_id="header",
        )
        with gr.Sidebar(label="Settings", open=True, width=310):
            system_prompt = gr.Textbox(label="System prompt", value=options.system_prompt, lines=3)
            method = gr.Dropdown(choices, value=first, label="Method (chat)", elem_id="method")
            max_new = slider("max_new_tokens", options.max_new_tokens, step=1, elem_id="max-new")
            exact = "token for token" if engine.backend in EXACT_BACKENDS else "up to rounding near-ties"
            temperature = slider(
                "temperature", 0.0, step=0.05, info=f"0 = greedy: vanilla's text, {exact}", elem_id="temperature"
            )
            top_p = slider("top_p", 1.0, step=0.01, elem_id="top-p")
            top_k = slider("top_k", 0, step=1, info="0 = off", elem_id="top-k")
            seed = gr.Number(-1, precision=0, label="Seed", info="-1 = random (used when temperature > 0)")
            if options.backend_note:
                backend = html.escape(options.backend_note)
                gr.Markdown(f"<small>Measured on this CPU: {backend}</small>", elem_id="backend-note")
            if AUTO in methods and options.sampling_method_note:
                note = html.escape(options.sampling_method_note)
                gr.Markdown(f"<small>{note}</small>", elem_id="method-note")
            with gr.Accordion("Draft tree", open=True):
                gr.Markdown(tree_values_note(options), elem_id="tree-note", elem_classes=["small-note"])
                t = options.tree
                total = slider("total_tokens", t.total_tokens, step=1, info="EAGLE-2 paper: 60", elem_id="tree-total")
                depth = slider("depth", t.depth, step=1, info="EAGLE-2 paper: 6", elem_id="tree-depth")
                tree_k = slider("tree_top_k", t.top_k, step=1, info="EAGLE-2 only; paper: 10", elem_id="tree-k")
                lookup = slider(
                    "lookup", t.lookup, step=1, elem_id="lookup",
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
                    with gr.Column(scale=3, min_width=320):
                        chatbot = gr.Chatbot(
                            label="Chat", height=CHAT_HEIGHT, min_height=240, elem_id="chatbot",
                            feedback_options=None, buttons=["copy"],
                        )
                        notice = gr.Markdown(elem_id="notice", elem_classes=["notice"])
                        with gr.Row():
                            msg = gr.Textbox(
                                placeholder="Type a message", show_label=False, lines=1, max_lines=8,
                                scale=6, min_width=150, elem_id="msg", autofocus=True,
                            )
                            button = dict(size="md", scale=1, min_width=64)
                            send = gr.Button("Send", variant="primary", elem_id="send", **button)
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", **button)
                        with gr.Row():
                            regen = gr.Button("Regenerate", size="sm", min_width=90, elem_id="regenerate")
                            clear = gr.Button("Clear", size="sm", min_width=60, elem_id="clear")
                            tint = gr.Checkbox(
                                label="Tint tokens", value=False, container=False, min_width=110, elem_id="tint"
                            )
                        stats = gr.Markdown(elem_id="stats", elem_classes=["stats"])
                        tint_legend = gr.HTML("", js_on_load=None)
                    with gr.Column(scale=2, min_width=280, elem_id="tree-column"):
                        with gr.Row(equal_height=True):
                            prev = gr.Button("◀", size="sm", min_width=40, scale=0, elem_id="prev-cycle")
                            cycle = gr.Slider(
                                0, 1, value=0, step=1, label="Cycle", interactive=False,
                                elem_id="cycle-slider", scale=3,
                            )
                            nxt = gr.Button("▶", size="sm", min_width=40, scale=0, elem_id="next-cycle")
                        tree = gr.HTML(empty_panel(), elem_id="tree-panel", js_on_load=None, css_template=TREE_CSS)
                        gr.HTML(LEGEND, js_on_load=None)
                        with gr.Accordion("How to read this", open=False, elem_id="how-to-read"):
                            gr.Markdown(HOW_TO_READ)
                if options.examples:  # below both columns, so a narrow window stacks chat, tree, then these
                    gr.Examples([[e] for e in options.examples], inputs=[msg], label="Example prompts")

            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "One prompt, two methods, same settings (sidebar). Each method is timed running **alone**, "
                    "one after the other; then both runs are replayed side by side at their measured speeds."
                )
                cmp_prompt = gr.Textbox(label="Prompt", lines=3, elem_id="cmp-prompt")
                with gr.Row():
                    method_a = gr.Dropdown(choices, value="vanilla", label="Left", min_width=290, elem_id="method-a")
                    method_b = gr.Dropdown(choices, value=methods[0], label="Right", min_width=290, elem_id="method-b")
                with gr.Row():
                    cmp_run = gr.Button("Run comparison", variant="primary", elem_id="cmp-run")
                    cmp_stop = gr.Button("Stop", variant="stop", elem_id="cmp-stop")
                    cmp_replay = gr.Button("Replay", elem_id="cmp-replay")
                with gr.Row(equal_height=True):
                    pane_a = gr.HTML(pane(None, method_label("vanilla"), "idle"), elem_id="pane-a", js_on_load=None)
                    pane_b = gr.HTML(pane(None, label(methods[0]), "idle"), elem_id="pane-b", js_on_load=None)
                cmp_summary = gr.Markdown(elem_id="cmp-summary")
                if options.examples:
                    gr.Examples([[e] for e in options.examples], inputs=[cmp_prompt], label="Example prompts")

        # ---- events ---------------------------------------------------------------------------
        private = dict(api_visibility="private")
        # Events that run the engine wait in the EngineLock's line, not in Gradio's queue (app/serial.py).
        engine_run = dict(concurrency_limit=None, **private)
        # Steps that do not run the engine (input checks, showing the pending message, replays): queued,
        # so errors and warnings reach the browser as messages, but never waiting behind a generation.
        quick = dict(concurrency_limit=None, show_progress="hidden", **private)
        stream_outputs = [msg, chatbot, session, tree, stats, notice, cycle]
        stream_inputs = [session, system_prompt, tint, method, *settings]

        def then_stream(accepted) -> None:  # a claimed session: show the pending message, then stream
            accepted.success(h.show_pending, [session, tint], [msg, chatbot], **quick).success(
                h.stream_chat, stream_inputs, stream_outputs, show_progress="minimal", show_progress_on=[chatbot],
                preprocess=False, **engine_run,
            )  # fmt: skip

        then_stream(gr.on([msg.submit, send.click], h.accept_message, [msg, session], [session], **quick))
        then_stream(regen.click(h.accept_regenerate, [session], [session], **quick))
        stop_btn.click(h.stop_chat, [session], None, queue=False, **private)
        clear.click(h.clear_chat, [session], [chatbot, session, tree, stats, notice, cycle], queue=False, **private)
        tint.change(h.retint, [session, tint], [chatbot, tint_legend], queue=False, **private)
        # A number typed outside its slider's range gets a message naming the field, the range and the
        # value; preprocess=False hands the handlers the value as typed (Gradio's own check names no field).
        for name in ranges:
            panel[name].change(h.check_field(name), [panel[name]], None, preprocess=False, **quick)
        if options.sampling_tree is not None:
            temperature.change(
                h.follow_temperature, [temperature, total, depth, tree_k], [total, depth, tree_k], queue=False,
                preprocess=False, **private,
            )
        demo.load(None, None, None, js=CLOSE_SIDEBAR_ON_PHONE)
        cycle.input(h.show_cycle, [session, cycle], [tree, cycle], queue=False, **private)
        prev.click(h.previous_cycle, [session, cycle], [tree, cycle], queue=False, **private)
        nxt.click(h.next_cycle, [session, cycle], [tree, cycle], queue=False, **private)

        cmp_run.click(h.accept_compare, [cmp_prompt, session], [session], **quick).success(
            h.compare_measure,
            [session, system_prompt, method_a, method_b, *settings],
            [pane_a, pane_b, cmp_summary, compare_runs],
            show_progress="minimal",
            show_progress_on=[pane_a, pane_b],
            preprocess=False,
            **engine_run,
        ).success(h.compare_replay, [compare_runs, tint], [pane_a, pane_b, cmp_summary], **quick)
        cmp_stop.click(h.stop_compare, [session], None, queue=False, **private)
        cmp_replay.click(h.compare_replay, [compare_runs, tint], [pane_a, pane_b, cmp_summary], **quick)

        gr.api(h.chat_api(), api_name="chat", concurrency_id=ENGINE, concurrency_limit=1)

    demo.queue(default_concurrency_limit=1)
    return demo
