"""Runs an engine event stream in a worker thread and hands the UI batches of events.

Why a thread: the engine measures wall time between its own yields. If the UI iterated the generator
directly, the time Gradio spends rendering each update would be counted as decoding time. With the
stream drained by a worker, the engine runs at its own pace and the UI picks up whatever arrived every
`poll_s` seconds.

Invariants: every event is delivered exactly once and in order; an exception raised by the stream is
re-raised in the consumer after the events before it; if the consumer stops early (the browser went
away, the generator is closed) `cancel` is set and the worker is joined, so the engine is never left
running behind the queue's back.
"""

import queue
import threading
import time
from collections.abc import Iterator

_DONE = object()


class _Failure:
    def __init__(self, error: Exception):
        self.error = error


def pump(events: Iterator[dict], cancel: threading.Event, poll_s: float = 0.08) -> Iterator[list[dict]]:
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        try:
            for event in events:
                inbox.put(event)
        except Exception as err:  # handed to the consumer, which re-raises it
            inbox.put(_Failure(err))
        finally:
            inbox.put(_DONE)

    worker = threading.Thread(target=work, name="engine-generate", daemon=True)
    worker.start()
    finished = False
    try:
        batch: list[dict] = []
        last_yield = -float("inf")
        while True:
            if not batch:
                item = inbox.get()
            else:
                wait = last_yield + poll_s - time.monotonic()
                if wait <= 0:
                    yield batch
                    batch, last_yield = [], time.monotonic()
                    continue
                try:
                    item = inbox.get(timeout=wait)
                except queue.Empty:
                    continue
            if item is _DONE:
                finished = True
                if batch:
                    yield batch
                return
            if isinstance(item, _Failure):
                finished = True
                if batch:
                    yield batch
                raise item.error
            batch.append(item)
    finally:
        if not finished:
            cancel.set()
        worker.join()
