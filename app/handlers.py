"""The Gradio callbacks: what each button, textbox and slider of the UI does.

`Handlers(engine, options, lock)` holds the one engine, the app's options and the engine's lock
(app/serial.py, held while the engine runs); `ui.build_ui` lays out the components and wires their events
to its methods. Per-browser state comes in and goes out as the `ChatSession` of a `gr.State`; a handler
keeps nothing between calls. The sidebar's generation settings arrive as the components' values in
`ChatSettings` order and become one `ChatSettings` at the start of the handler that runs the engine.

Sending is three chained steps: claim the session (raises gr.Error on bad input; its only output is the
State, so no visible component is marked as failed), show the pending message, then stream. A request
that cannot run (bad settings, a prompt too long, a model error) shows a warning and leaves the session's
history as it was; the typed message is put back in the textbox.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator

import gradio as gr

from app.chat import (
    ChatSession,
    Turn,
    build_messages,
    chatbot_messages,
    check_history,
    check_message,
    finish_note,
    session_history,
    stream_reply,
)
from app.compare import MEASURED_NOTE, WARMUP_TOKENS, measure, pane, replay_times, summary
from app.serial import EngineLock
from app.settings import AppOptions, ChatSettings, available_methods, tree_for_temperature
from app.stats import method_label, stats_line
from app.tree_svg import empty_panel, render_cycle

log = logging.getLogger(__name__)

TINT_LEGEND = (
    '<div class="tint-legend"><span class="tok tok-draft cyc-odd">accepted draft tokens</span> '
    '<span class="tok tok-target cyc-odd">the target\'s own tokens (bonus / vanilla)</span> '
    "— shading alternates from one cycle to the next; hover a token for its cycle.</div>"
)


def cycle_slider(count: int, at: int | None = None, interactive: bool = True) -> dict:
    """Cycle slider over positions 0..count-1 (the engine numbers cycles from 0, the prefill's token).

    Gradio needs minimum < maximum, so an empty or one-cycle reply still gets a 0..1 range, disabled.
    """
    last = max(count - 1, 0)
    at = last if at is None else min(max(at, 0), last)
    return gr.update(minimum=0, maximum=max(last, 1), value=at, step=1, interactive=interactive and count > 1)


class Handlers:
    """One method per UI event (the `chat` endpoint comes from `chat_api`), over one shared engine."""

    def __init__(self, engine, options: AppOptions, lock: EngineLock):
        self.engine = engine
        self.options = options
        self.lock = lock  # held while the engine runs, shared with the OpenAI routes (app/serial.py)
        self.methods = available_methods(engine)

    # ---- chat ---------------------------------------------------------------------------------

    def accept_message(self, message: str, session: ChatSession) -> ChatSession:
        try:
            session.begin(check_message(message, self.engine.context_length))
        except ValueError as err:
            raise refused(err, 8) from None
        return session

    def accept_regenerate(self, session: ChatSession) -> ChatSession:
        if not session.turns:
            raise refused(ValueError("nothing to regenerate yet: send a message first"), 6)
        try:
            session.begin(session.turns[-1].user)
        except ValueError as err:
            raise refused(err, 6) from None
        session.turns.pop()
        return session

    def show_pending(self, session: ChatSession, tint: bool):
        return "", chatbot_messages(session.turns, tint, session.pending)

    def stream_chat(self, session: ChatSession, system_prompt: str, tint: bool, method: str, *settings):
        """Outputs: textbox, chatbot, session, tree panel, stats line, notice, cycle slider."""
        message = session.pending
        if message is None:  # nothing claimed the session (e.g. a stale chained event)
            session.active = False
            return
        keep = gr.update()
        try:
            config = ChatSettings(*settings).config(method)
            messages = build_messages(system_prompt, session_history(session.turns), message)
            view = None
            with self.lock.hold(session.cancel):  # not held only after Stop: then stream_reply reads nothing
                for view in stream_reply(self.engine, messages, config, session.cancel, self.options.poll_s):
                    tree = render_cycle(view.cycles[-1], self.engine.token_texts) if view.cycles else keep
                    yield (
                        keep,
                        chatbot_messages(session.turns, tint, message, view),
                        session,
                        tree,
                        status_line(view),
                        view.notice,
                        cycle_slider(len(view.cycles), interactive=False),
                    )
            if session.pending is None:  # Clear was pressed meanwhile: keep the conversation cleared
                return
            session.turns.append(Turn(message, view.text, view.pieces, finish_note(view)))
            session.cycles = view.cycles
            if view.notice:
                gr.Info(view.notice, duration=8)
            final = chatbot_messages(session.turns, tint)
            yield keep, final, session, keep, status_line(view), view.notice, cycle_slider(len(view.cycles))
        except ValueError as err:  # the request cannot run: settings, prompt length, missing head
            log.warning("chat request refused: %s", err)
            gr.Warning(str(err), duration=10)
            yield message, chatbot_messages(session.turns, tint), session, keep, f"Not sent: {err}", "", keep
        except Exception as err:  # a model failure must not take the app down; history stays intact
            log.exception("generation failed")
            gr.Warning(f"The model failed: {err}. Your conversation is unchanged; try again.", duration=12)
            yield message, chatbot_messages(session.turns, tint), session, keep, f"Model error: {err}", "", keep
        finally:
            session.active, session.pending = False, None

    def stop(self, session: ChatSession) -> None:
        session.cancel.set()

    def clear_chat(self, session: ChatSession):
        session.clear()
        return [], session, empty_panel(), "", "", cycle_slider(0)

    def retint(self, session: ChatSession, tint: bool):
        legend = TINT_LEGEND if tint else ""
        return chatbot_messages(session.turns, tint, session.pending), legend

    def follow_temperature(self, temperature, total, depth, tree_top_k) -> tuple[int, int, int]:
        greedy, sampling = self.options.tree, self.options.sampling_tree
        return tree_for_temperature(temperature, total, depth, tree_top_k, greedy, sampling)

    # ---- tree panel ---------------------------------------------------------------------------

    def show_cycle(self, session: ChatSession, position):
        return self._step(session, position, 0)

    def previous_cycle(self, session: ChatSession, position):
        return self._step(session, position, -1)

    def next_cycle(self, session: ChatSession, position):
        return self._step(session, position, +1)

    def _step(self, session: ChatSession, position, delta: int):
        """The tree panel and the slider at `delta` cycles from `position`, kept within the last reply."""
        count = len(session.cycles)
        position = min(max(int(position) + delta, 0), max(count - 1, 0))
        tree = render_cycle(session.cycles[position], self.engine.token_texts) if count else empty_panel()
        return tree, cycle_slider(count, position)

    # ---- compare ------------------------------------------------------------------------------

    def accept_compare(self, prompt: str, session: ChatSession) -> ChatSession:
        try:
            prompt = check_message(prompt, self.engine.context_length)
            session.begin(prompt)
        except ValueError as err:
            raise refused(err, 8) from None
        return session

    def compare_measure(self, session: ChatSession, system_prompt: str, method_a: str, method_b: str, *settings):
        """Outputs: left pane, right pane, summary, the measured runs (for the replay)."""
        prompt = session.pending
        if prompt is None:
            session.active = False
            return
        la, lb = method_label(method_a), method_label(method_b)
        try:
            # One seed for both sides, so a sampled comparison differs only by method.
            seeded = ChatSettings(*settings).with_fixed_seed()
            configs = (seeded.config(method_a), seeded.config(method_b))
            note = MEASURED_NOTE.format(warmup=WARMUP_TOKENS, a=la, b=lb)
            with self.lock.hold(session.cancel) as held:
                if not held:  # stopped while an OpenAI request had the engine
                    yield pane(None, la, "stopped"), pane(None, lb, "stopped"), "Stopped before it started.", None
                    return
                prompt_ids = self.engine.chat_ids(build_messages(system_prompt, [], prompt))
                runs = measure(self.engine, prompt_ids, configs, session.cancel, self.options.poll_s)
                for run_a, run_b, phase in runs:
                    if phase == "warm-up":
                        yield pane(None, la, "warming up…"), pane(None, lb, "waiting"), note, None
                    elif phase == "running":
                        status_a = "measured" if run_a.end else "running alone…"
                        status_b = "waiting for the left run to finish" if run_b is None else "running alone…"
                        yield pane(run_a, la, status_a), pane(run_b, lb, status_b), note, None
                    else:
                        measured = (run_a, run_b, configs[0].sampling.greedy)
                        replaying = note + "\n\nReplaying both at their measured speeds…"
                        yield pane(run_a, la, "measured"), pane(run_b, lb, "measured"), replaying, measured
        except ValueError as err:
            log.warning("comparison refused: %s", err)
            gr.Warning(str(err), duration=10)
            yield gr.update(), gr.update(), f"Not run: {err}", None
        except Exception as err:  # a model failure must not take the app down
            log.exception("comparison failed")
            gr.Warning(f"The model failed: {err}", duration=12)
            yield gr.update(), gr.update(), f"Model error: {err}", None
        finally:
            session.active, session.pending = False, None

    def compare_replay(self, runs, tint: bool):
        """Outputs: left pane, right pane, summary."""
        if runs is None:
            return
        run_a, run_b, greedy = runs
        la, lb = method_label(run_a.method), method_label(run_b.method)
        clock = _Clock()
        for t in replay_times(run_a, run_b):
            clock.sleep_until(t)
            status = f"replay {t:.1f} s"
            yield pane(run_a, la, status, t, tint), pane(run_b, lb, status, t, tint), gr.update()
        note = MEASURED_NOTE.format(warmup=WARMUP_TOKENS, a=la, b=lb)
        yield (
            pane(run_a, la, "finished", None, tint),
            pane(run_b, lb, "finished", None, tint),
            note + "\n\n" + summary(run_a, run_b, greedy, self.engine.backend),
        )

    # ---- API ----------------------------------------------------------------------------------

    def chat_api(self) -> Callable[..., Iterator[str]]:
        """The public `chat` endpoint. gr.api reads its parameters, types and defaults from the signature,
        and two defaults belong to this app (the first method, the reply length), so it is made here."""
        engine, options, lock = self.engine, self.options, self.lock

        def chat(
            message: str,
            history: list[dict] | None = None,
            system_prompt: str = "",
            method: str = self.methods[0],
            temperature: float = 0.0,
            top_p: float = 1.0,
            top_k: int = 0,
            max_new_tokens: int = options.max_new_tokens,
        ) -> Iterator[str]:
            """Stream a reply to `message`, given earlier `history` as [{"role": "user"|"assistant", "content": str}].

            Yields the reply text so far, once per update. method: eagle2, eagle1 or vanilla.
            """
            try:
                message = check_message(message, engine.context_length)
                length = options.check_reply_length(max_new_tokens, "max_new_tokens")
                sampling = dict(max_new_tokens=length, temperature=temperature, top_p=top_p, top_k=top_k)
                config = ChatSettings.with_tree(options.tree_for(temperature), **sampling).config(method)
                messages = build_messages(system_prompt, check_history(history or []), message)
                cancel = threading.Event()  # set by app.pump when Gradio closes this stream early
                with lock.hold(cancel):
                    for view in stream_reply(engine, messages, config, cancel, options.poll_s):
                        yield view.text
            except ValueError as err:
                raise refused(err) from None

        return chat


def refused(err: ValueError, duration: float = 10) -> gr.Error:
    """The browser's message for a request that cannot run; the server log gets one line, not a traceback."""
    log.warning("request refused: %s", err)
    return gr.Error(str(err), duration=duration, print_exception=False)


def status_line(view) -> str:
    line = stats_line(view.totals, view.method) if view.totals else f"{method_label(view.method)}: starting…"
    if view.finished:
        line += f" — {view.finish_message}"
    return line


class _Clock:
    """Paces a replay: sleep until t seconds after the clock was made."""

    def __init__(self):
        self._start = time.monotonic()

    def sleep_until(self, t: float) -> None:
        wait = self._start + t - time.monotonic()
        if wait > 0:
            time.sleep(wait)
