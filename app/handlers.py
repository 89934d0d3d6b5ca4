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
from app.settings import AppOptions, ChatSettings, available_methods, sidebar_ranges, tree_for_temperature
from app.stats import method_label, stats_line
from app.tree_svg import empty_panel, render_cycle

log = logging.getLogger(__name__)
WAIT_POLL_S = 0.25  # how often a request waiting for the engine checks Stop and redraws its place in line

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
        self.methods = available_methods(engine, options)
        self.ranges = sidebar_ranges(options)  # the sidebar's number fields: label and range

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
            session.begin(session.turns[-1].user, replacing=session.turns[-1])
        except ValueError as err:
            raise refused(err, 6) from None
        session.turns.pop()
        return session

    def show_pending(self, session: ChatSession, tint: bool):
        return "", chatbot_messages(session.turns, tint, session.pending)

    def stream_chat(self, session: ChatSession, system_prompt: str, tint: bool, method: str, *settings):
        """Outputs: textbox, chatbot, session, tree panel, stats line, notice, cycle slider.

        The request is the one begun with `session.cancel` as it is now; once Clear (or a newer request)
        takes the session, this one stops drawing and leaves the session alone. The history the model is
        given is the one on screen: the session's turns, which only a finished reply extends.
        """
        cancel, message = session.cancel, session.pending
        if message is None:  # nothing claimed the session (e.g. a stale chained event)
            return
        keep = gr.update()
        ticket = None
        try:
            checked = ChatSettings(*settings).check(self.ranges)
            config = checked.config(self.options.method_for(method, checked.temperature))
            messages = build_messages(system_prompt, session_history(session.turns), message)
            ticket = self.lock.join()
            while not self.lock.wait(ticket, WAIT_POLL_S) and not cancel.is_set():
                ahead = self.lock.ahead(ticket)
                waiting = f"Waiting for the engine: {ahead} request{'s' if ahead != 1 else ''} ahead (Stop leaves)"
                yield keep, keep, session, keep, waiting, keep, keep
            view = None
            if not cancel.is_set():
                for view in stream_reply(self.engine, messages, config, cancel, self.options.poll_s):
                    if not session.owns(cancel):  # cleared: add nothing, and end on the cleared page
                        yield self._cleared(session, tint)
                        return
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
            if not session.owns(cancel):
                yield self._cleared(session, tint)
                return
            if view is None or (view.finish_reason == "cancelled" and not view.cycles):  # stopped before it ran
                regenerating = session.replacing is not None
                session.give_back()
                if regenerating:  # its message is still in the history: the box stays as the user left it
                    stopped = "Stopped before it started: the earlier reply is back."
                    yield keep, chatbot_messages(session.turns, tint), session, keep, stopped, "", keep
                    return
                stopped = "Stopped before it started: your message is back in the box."
                yield message, chatbot_messages(session.turns, tint), session, keep, stopped, "", keep
                return
            if view.finish_reason == "cancelled" and session.replacing is not None:  # a regeneration stopped
                session.give_back()  # the earlier reply, and its tree, come back; the partial one is dropped
                tree = render_cycle(session.cycles[-1], self.engine.token_texts) if session.cycles else empty_panel()
                back, chat = f"{status_line(view)}; the earlier reply is back", chatbot_messages(session.turns, tint)
                yield keep, chat, session, tree, back, "", cycle_slider(len(session.cycles))
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
            if session.owns(cancel):
                session.give_back()
                yield message, chatbot_messages(session.turns, tint), session, keep, f"Not sent: {err}", "", keep
        except Exception as err:  # a model failure must not take the app down; history stays intact
            log.exception("generation failed")
            gr.Warning(f"The model failed: {err}. Your conversation is unchanged; try again.", duration=12)
            if session.owns(cancel):
                session.give_back()
                yield message, chatbot_messages(session.turns, tint), session, keep, f"Model error: {err}", "", keep
        finally:
            if ticket is not None:
                self.lock.leave(ticket)
            session.end(cancel)

    def _cleared(self, session: ChatSession, tint: bool):
        """The last outputs of a request that Clear took the session from: the page as Clear left it. (Gradio
        shows a generator's last outputs again when it ends, so ending without them would redraw the turn.)"""
        chat = chatbot_messages(session.turns, tint, session.pending)  # a request sent after Clear shows
        return gr.update(), chat, session, empty_panel(), "", "", cycle_slider(0)

    def stop_chat(self, session: ChatSession) -> None:
        session.stop("chat")

    def stop_compare(self, session: ChatSession) -> None:
        session.stop("compare")

    def clear_chat(self, session: ChatSession):
        session.clear()
        return [], session, empty_panel(), "", "", cycle_slider(0)

    def retint(self, session: ChatSession, tint: bool):
        legend = TINT_LEGEND if tint else ""
        return chatbot_messages(session.turns, tint, session.pending), legend

    def follow_temperature(self, temperature, total, depth, tree_top_k) -> tuple[int, int, int]:
        """Any temperature above 0 samples, one out of range too (check_field says what is wrong with it)."""
        greedy, sampling = self.options.tree, self.options.sampling_tree
        return tree_for_temperature(temperature, total, depth, tree_top_k, greedy, sampling)

    def check_field(self, name: str) -> Callable[[object], None]:
        """The change listener of one number field: a warning naming the field, its range and the value."""
        field = self.ranges[name]

        def check(value) -> None:
            try:
                field.check(value)
            except ValueError as err:  # the page puts the nearest end of the range in the box: say so
                log.warning("setting refused: %s", err)
                number = float(value) if isinstance(value, int | float) else None
                where = "" if number is None else f"; it is set to {min(max(number, field.low), field.high):g}"
                gr.Warning(f"{err}{where}", duration=10)

        return check

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
            session.begin(prompt, kind="compare")
        except ValueError as err:
            raise refused(err, 8) from None
        return session

    def compare_measure(self, session: ChatSession, system_prompt: str, method_a: str, method_b: str, *settings):
        """Outputs: left pane, right pane, summary, the measured runs (for the replay)."""
        cancel, prompt = session.cancel, session.pending
        if prompt is None:
            return
        try:
            # One seed for both sides, so a sampled comparison differs only by method.
            seeded = ChatSettings(*settings).check(self.ranges).with_fixed_seed()
            method_a, method_b = (self.options.method_for(m, seeded.temperature) for m in (method_a, method_b))
            la, lb = method_label(method_a), method_label(method_b)
            configs = (seeded.config(method_a), seeded.config(method_b))
            note = MEASURED_NOTE.format(warmup=WARMUP_TOKENS, a=la, b=lb)
            with self.lock.hold(cancel) as held:
                if not held:  # stopped while waiting for the engine
                    yield pane(None, la, "stopped"), pane(None, lb, "stopped"), "Stopped before it started.", None
                    return
                prompt_ids = self.engine.chat_ids(build_messages(system_prompt, [], prompt))
                runs = measure(self.engine, prompt_ids, configs, cancel, self.options.poll_s)
                for run_a, run_b, phase in runs:
                    if phase == "warm-up":
                        yield pane(None, la, "warming up…"), pane(None, lb, "waiting"), note, None
                    elif phase == "running":
                        status_a = "measured" if run_a.end else "running alone…"
                        status_b = "waiting for the left run to finish" if run_b is None else "running alone…"
                        yield pane(run_a, la, status_a), pane(run_b, lb, status_b), note, None
                    else:
                        measured = (run_a, run_b, configs[0].sampling.greedy)
                        if stopped(run_a) or stopped(run_b):  # nothing to replay: say so on both panes
                            text = note + "\n\n" + summary(run_a, run_b, True)
                            yield pane(run_a, la, "stopped"), pane(run_b, lb, "stopped"), text, None
                            return
                        replaying = note + "\n\nReplaying both at their measured speeds…"
                        yield pane(run_a, la, "measured"), pane(run_b, lb, "measured"), replaying, measured
            if cancel.is_set():  # stopped during the warm-up: measure ended without a last phase
                yield pane(None, la, "stopped"), pane(None, lb, "stopped"), "Stopped before it finished.", None
        except ValueError as err:
            log.warning("comparison refused: %s", err)
            gr.Warning(str(err), duration=10)
            yield gr.update(), gr.update(), f"Not run: {err}", None
        except Exception as err:  # a model failure must not take the app down
            log.exception("comparison failed")
            gr.Warning(f"The model failed: {err}", duration=12)
            yield gr.update(), gr.update(), f"Model error: {err}", None
        finally:
            session.end(cancel)

    def compare_replay(self, runs, tint: bool):
        """Outputs: left pane, right pane, summary."""
        if runs is None:  # nothing measured (stopped, refused): leave the panes as they are
            yield gr.update(), gr.update(), gr.update()
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

            Yields the reply text so far, once per update. method: eagle2, eagle1 or vanilla (or auto where
            the app offers it: the method measured fastest on this machine at that temperature).
            """
            try:
                message = check_message(message, engine.context_length)
                length = options.check_reply_length(max_new_tokens, "max_new_tokens")
                sampling = dict(max_new_tokens=length, temperature=temperature, top_p=top_p, top_k=top_k)
                chosen = options.method_for(method, temperature)
                config = ChatSettings.with_tree(options.tree_for(temperature), **sampling).config(chosen)
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


def stopped(run) -> bool:
    """Whether a compare run was stopped before it finished."""
    return run is None or run.end is None or run.end["finish_reason"] == "cancelled"


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
