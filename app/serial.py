"""One generation at a time: the first-come, first-served lock that every caller of the engine holds.

The engine is single-threaded (one KV cache, one stopwatch), so the chat, the Compare tab, the Gradio
`chat` API and the OpenAI routes (app/openai_api.py) each hold `EngineLock` for the whole of a request
that tokenizes or generates. The lock alone orders the browser's requests (they wait here, not in Gradio's
queue, so Stop takes a waiting request out of the line at once and the page shows how many are ahead),
the Gradio `chat` API and the OpenAI requests.

Invariants: holders are served in the order they joined; a waiter whose `cancel` is set leaves the line
without ever holding the lock; the lock may be released from another thread than the one that took it
(Gradio runs each step of a generator handler in whichever worker thread is free).
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class EngineLock:
    def __init__(self):
        self._changed = threading.Condition()
        self._issued = 0  # tickets handed out
        self._serving = 0  # the ticket that holds the lock (or may take it now)
        self._left: set[int] = set()  # tickets that gave up waiting

    def join(self) -> int:
        """Take a ticket: a place in the line."""
        with self._changed:
            self._issued += 1
            return self._issued - 1

    def wait(self, ticket: int, timeout: float | None = None) -> bool:
        """Whether `ticket` holds the lock, waiting up to `timeout` seconds for its turn."""
        with self._changed:
            return self._changed.wait_for(lambda: self._serving == ticket, timeout)

    def ahead(self, ticket: int) -> int:
        """How many holders are before `ticket`: the one holding the lock and those still waiting."""
        with self._changed:
            return sum(1 for t in range(self._serving, ticket) if t not in self._left)

    def leave(self, ticket: int) -> None:
        """Release the lock held by `ticket`, or give up its place in the line."""
        with self._changed:
            if ticket != self._serving:
                self._left.add(ticket)
                return
            self._serving += 1
            while self._serving in self._left:
                self._left.remove(self._serving)
                self._serving += 1
            self._changed.notify_all()

    @contextmanager
    def hold(self, cancel: threading.Event, poll_s: float = 0.1) -> Iterator[bool]:
        """Block until this caller's turn; the value is False when `cancel` was set first (lock not held)."""
        ticket = self.join()
        try:
            held = False
            while not held and not cancel.is_set():
                held = self.wait(ticket, poll_s)
            yield held
        finally:
            self.leave(ticket)
