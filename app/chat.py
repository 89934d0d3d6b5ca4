"""One browser session's conversation and the streaming of one reply, without any Gradio.

`ChatSession` holds a session's turns, the cycle events of its last reply (for the tree panel) and the
cancel flag of its running request. `stream_reply` turns the engine's event stream into `ReplyView`
snapshots the UI can draw. `handlers.py` calls these from the Gradio events; tests drive them directly.

Invariants:
  - A turn is added to the history only when its reply ends (finished, stopped or cut by a limit); a
    request that fails leaves the history exactly as it was, and a stopped regeneration leaves the turn it
    was replacing.
  - The prompt always goes through the model's chat template (`engine.chat_ids`); a conversation too
    long for the context loses its oldest turns (`engine.trim_messages`) and the reply carries a notice
    saying how many messages were left out.
"""

import copy
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from app.pump import pump
from app.reply import Piece, pieces_from_cycle, render_tinted
from engine.config import GenerationConfig

# Text past this many characters per context token is refused before tokenizing (tokens average ~4).
CHARS_PER_TOKEN_LIMIT = 8
QUIET_FINISHES = ("eos", "stop_string")


@dataclass
class Turn:
    user: str
    reply: str = ""
    pieces: list[Piece] = field(default_factory=list)
    note: str = ""  # why the reply ended, when that is worth showing (stopped, limit reached)


class ChatSession:
    """Per-browser-session state, kept in a `gr.State`.

    A plain class, not a dataclass: Gradio serialises dataclass values of a State with `asdict`, which
    would try to copy the cancel flag.
    """

    def __init__(self, turns: list[Turn] | None = None, cycles: list[dict] | None = None):
        self.turns: list[Turn] = turns or []
        self.cycles: list[dict] = cycles or []  # cycle events of the last reply (tree panel)
        self.cancel = threading.Event()  # set by Stop; a new one per request, which it identifies
        self.active = False  # a request of this session is queued or running
        self.pending: str | None = None  # the user message waiting for its reply
        self.kind = ""  # what the active request is: "chat" or "compare" (each tab's Stop stops its own)
        self.replacing: Turn | None = None  # the turn a regeneration replaces, given back if it is stopped

    def __deepcopy__(self, memo: dict) -> "ChatSession":
        # gr.State deep-copies its initial value for every new browser session; a copy gets its own
        # cancel flag (threading.Event cannot be copied, and must never be shared between sessions).
        return ChatSession(copy.deepcopy(self.turns, memo), copy.deepcopy(self.cycles, memo))

    def begin(self, message: str, kind: str = "chat", replacing: Turn | None = None) -> None:
        """Claim the session for a new request; raises ValueError while another one is in flight."""
        if self.active:
            raise ValueError("a reply is still being generated: wait for it or press Stop")
        self.active, self.pending, self.kind, self.replacing = True, message, kind, replacing
        self.cancel = threading.Event()

    def owns(self, cancel: threading.Event) -> bool:
        """Whether the request with this cancel flag is still the session's (not cleared, not replaced)."""
        return self.cancel is cancel and self.pending is not None

    def end(self, cancel: threading.Event) -> None:
        """The request with this cancel flag is over; a newer request, begun after Clear, keeps the session."""
        if self.cancel is cancel:
            self.active, self.pending, self.replacing = False, None, None

    def give_back(self) -> None:
        """The request did not run or was stopped: the turn a regeneration was replacing returns to the history."""
        if self.replacing is not None:
            self.turns.append(self.replacing)
            self.replacing = None

    def stop(self, kind: str) -> None:
        """Stop the active request if it is of this kind (the Compare tab's Stop never stops a chat reply)."""
        if self.active and self.kind == kind:
            self.cancel.set()

    def clear(self) -> None:
        """Forget the conversation now; a reply still streaming is stopped and never comes back."""
        self.cancel.set()
        self.turns, self.cycles, self.pending, self.replacing, self.active = [], [], None, None, False


@dataclass
class ReplyView:
    """A snapshot of the reply being streamed; `stream_reply` updates and re-yields one instance."""

    method: str
    text: str = ""
    pieces: list[Piece] = field(default_factory=list)
    cycles: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    notice: str = ""  # e.g. older messages were trimmed
    prompt_tokens: int = 0  # the templated prompt the reply was generated for
    finished: bool = False
    finish_reason: str = ""
    finish_message: str = ""


def check_message(message, context_length: int) -> str:
    """The message to send, or ValueError for an empty or absurdly long one."""
    if not isinstance(message, str) or not message.strip():
        raise ValueError("the message is empty: type something first")
    limit = context_length * CHARS_PER_TOKEN_LIMIT
    if len(message) > limit:
        raise ValueError(
            f"the message is {len(message):,} characters; the model reads at most {context_length:,} tokens "
            f"(roughly {context_length * 4:,} characters). Shorten it."
        )
    return message


def check_history(history, roles: tuple[str, ...] = ("user", "assistant"), name: str = "history") -> list[dict]:
    """`history` as a list of {"role", "content"} dicts, or ValueError naming the first bad message."""
    if not isinstance(history, list):
        got = type(history).__name__
        raise ValueError(f'{name} must be a list of {{"role": ..., "content": ...}} messages, got {got}')
    choices = " or ".join(f'"{r}"' for r in roles)
    for i, m in enumerate(history):
        if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
            raise ValueError(f'{name}[{i}] must be a {{"role": ..., "content": ...}} message, got {m!r:.80}')
        if m["role"] not in roles:
            raise ValueError(f"{name}[{i}].role must be {choices}, got {m['role']!r:.40}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{name}[{i}].content must be a string, got {type(m['content']).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in history]


def build_messages(system_prompt: str, history: list[dict], user: str) -> list[dict]:
    """Chat-template messages: optional system prompt, earlier turns, then the new user message."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    messages += [{"role": m["role"], "content": m["content"]} for m in history]
    return messages + [{"role": "user", "content": user}]


def session_history(turns: list[Turn]) -> list[dict]:
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.reply}]
    return messages


def trim_notice(dropped: int, context_length: int) -> str:
    if dropped <= 0:
        return ""
    what = "message was" if dropped == 1 else f"{dropped} messages were"
    return (
        f"The conversation is longer than the model's {context_length:,}-token context: the oldest "
        f"{what} left out of this reply's prompt (the system prompt is kept)."
    )


def stream_reply(
    engine, messages: list[dict], config: GenerationConfig, cancel: threading.Event, poll_s: float = 0.08
) -> Iterator[ReplyView]:
    """Trim, template and generate; yields the same ReplyView, updated, about every poll_s seconds.

    Raises ValueError (from trimming or the engine) before the first yield when the request cannot run.
    Stopped before it starts (`cancel` already set), it yields one finished view and reads nothing.
    """
    view = ReplyView(config.method)
    if cancel.is_set():
        view.finished, view.finish_reason = True, "cancelled"
        view.finish_message = "stopped by the user before it started"
        yield view
        return
    kept, dropped = engine.trim_messages(messages, config.max_new_tokens)
    view.notice = trim_notice(dropped, engine.context_length)
    prompt_ids = engine.chat_ids(kept)
    view.prompt_tokens = len(prompt_ids)
    for batch in pump(engine.generate(prompt_ids, config, cancel), cancel, poll_s):
        for event in batch:
            if event["type"] == "cycle":
                view.text += event["text"]
                view.pieces += pieces_from_cycle(event, engine.token_texts)
                view.cycles.append(event)
                view.totals = event["totals"]
            elif event["type"] == "end":
                view.totals = event["totals"]
                view.text = event["text"]
                view.finished = True
                view.finish_reason, view.finish_message = event["finish_reason"], event["message"]
        yield view


def finish_note(view: ReplyView) -> str:
    return "" if view.finish_reason in QUIET_FINISHES else view.finish_message


_CODE = re.compile(r"(```.*?(?:```|$)|`[^`\n]+`)", re.DOTALL)


def as_text(markdown: str) -> str:
    """Chat text for the Markdown renderer with HTML characters escaped outside code.

    The chat shows what was typed or generated, never markup: '<b>' stays visible as '<b>' ('&' and '<'
    are enough to stop HTML; '>' stays so Markdown quotes still work). Inside code spans and fences
    Markdown already shows characters literally, so those are left alone.
    """
    parts = _CODE.split(markdown)
    return "".join(p if i % 2 else p.replace("&", "&amp;").replace("<", "&lt;") for i, p in enumerate(parts))


def reply_content(reply: str, pieces: list[Piece], note: str, tint: bool) -> str:
    """What the chat bubble shows for a reply: Markdown text, or tinted HTML when `tint` is on."""
    body = render_tinted(pieces) if tint and pieces else as_text(reply)
    if not body:
        body = "*(no text)*"
    return f"{body}\n\n*— {note}*" if note else body


def chatbot_messages(
    turns: list[Turn], tint: bool, pending: str | None = None, live: ReplyView | None = None
) -> list[dict]:
    """The Chatbot value: committed turns, then the pending user message and the reply streaming for it."""
    shown = []
    for turn in turns:
        shown.append({"role": "user", "content": as_text(turn.user)})
        shown.append({"role": "assistant", "content": reply_content(turn.reply, turn.pieces, turn.note, tint)})
    if pending is not None:
        shown.append({"role": "user", "content": as_text(pending)})
        if live is not None and (live.text or live.finished):
            note = finish_note(live) if live.finished else ""
            shown.append({"role": "assistant", "content": reply_content(live.text, live.pieces, note, tint)})
    return shown
