"""A bounded load test on loopback: four clients at once, three turns each, across the Gradio `chat` API
(gradio_client) and the OpenAI routes (the `openai` client, streamed and whole), one OpenAI stream closed
and one gradio_client job cancelled mid-reply, against the app served in-process on the tiny random model.

What must hold under that load: every completed reply is whole and equal to the engine's own solo run of
the same request (greedy, or sampled with a fixed seed); a stopped reply is a prefix of its solo run and
its generation ends as cancelled; every client gets exactly its three outcomes; the engine never runs two
generations at once (engine.generate is wrapped to count them); afterwards the engine's line is empty and
both APIs answer as before."""

import threading
from dataclasses import dataclass
from itertools import islice

import openai
from gradio_client import Client
from gradio_client.utils import Status

from app.chat import build_messages
from app.openai_api import mount_openai, parse_request
from app.serial import EngineLock
from app.settings import AppOptions
from app.ui import build_ui
from tests.test_gradio_client import free_port
from tests.test_openai_api import slow_spy, wait_for
from tests.tiny import tiny_engine

SYSTEM = "Be brief."
OPTIONS = AppOptions(poll_s=0.0)
LONG = 300  # a stopped turn asks for this many tokens; it is stopped after a few updates
STOP_AFTER = 3  # non-empty updates (gradio) or chunks (OpenAI) read before stopping


@dataclass(frozen=True)
class Turn:
    prompt: str
    method: str = "eagle2"
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    stop: bool = False  # closed (OpenAI) or cancelled (gradio_client) mid-stream


# Four clients: how each one talks to the app, and its three turns (a conversation: each completed reply
# joins the history of the next turn; a stopped one does not). The tiny model's greedy text hardly depends
# on the prompt, so every turn asks for its own length: a reply handed to the wrong request would show.
CLIENTS = {
    "gradio_predict": [Turn("Hello there", max_tokens=12), Turn("Say more", "vanilla", 14),
                       Turn("And then?", "eagle1", 20)],
    "gradio_stream": [Turn("Count with me"), Turn("Keep going", "vanilla", LONG, stop=True),
                      Turn("Thanks", max_tokens=18)],
    "openai_whole": [Turn("Hi", max_tokens=22), Turn("Pick a word", max_tokens=24, temperature=0.9, seed=11),
                     Turn("Why?", "vanilla", 10)],
    "openai_stream": [Turn("Good day", "eagle1", 26), Turn("Tell a story", "vanilla", LONG, stop=True),
                      Turn("Bye", max_tokens=28, temperature=0.7, seed=5)],
}  # fmt: skip


class WatchedLock(EngineLock):
    """The engine's lock, recording the longest line it had (the holder included)."""

    def __init__(self):
        super().__init__()
        self.longest = 0

    def join(self) -> int:
        ticket = super().join()
        self.longest = max(self.longest, self.ahead(ticket) + 1)
        return ticket


def messages_for(history: list[dict], turn: Turn) -> list[dict]:
    return build_messages(SYSTEM, history, turn.prompt)


def request_body(messages: list[dict], turn: Turn) -> dict:
    body = {"model": "llama", "messages": messages, "max_tokens": turn.max_tokens}
    body.update(temperature=turn.temperature, method=turn.method)
    return body if turn.seed is None else {**body, "seed": turn.seed}


def serve(engine, lock: EngineLock):
    """The app as launch.py serves it (page, `chat` API and OpenAI routes on one lock), no login."""
    demo = build_ui(engine, OPTIONS, lock)
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    mount_openai(demo, engine, OPTIONS, lock)
    return demo


def solo_runs(engine) -> dict[str, list[dict]]:
    """Each client's turns run alone on the engine with the settings the app gives that request: the
    end event of each generation, in turn order."""
    runs = {}
    for name, turns in CLIENTS.items():
        history, ends = [], []
        for turn in turns:
            messages = messages_for(history, turn)
            config = parse_request(request_body(messages, turn), engine, OPTIONS).config
            end = list(engine.generate(engine.chat_ids(messages), config))[-1]
            ends.append(end)
            if not turn.stop:
                history += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": end["text"]}]
        runs[name] = ends
    return runs


def gradio_turn(client: Client, history: list[dict], turn: Turn) -> tuple[str, str]:
    """("reply", text) or, for a turn stopped mid-stream, ("cancelled", the text seen before stopping)."""
    job = client.submit(
        message=turn.prompt, history=history, system_prompt=SYSTEM, method=turn.method,
        temperature=turn.temperature, max_new_tokens=turn.max_tokens, api_name="/chat",
    )  # fmt: skip
    if not turn.stop:
        updates = list(job)
        final = job.result()
        assert updates[-1] == final and all(final.startswith(u) for u in updates)  # the stream grew, intact
        return "reply", final
    seen = list(islice(filter(None, job), STOP_AFTER))  # the first STOP_AFTER non-empty updates, then stop
    job.cancel()
    wait_for(lambda: job.status().code == Status.CANCELLED)  # the documented outcome of a cancelled job
    return "cancelled", seen[-1]


def openai_turn(client: openai.OpenAI, messages: list[dict], turn: Turn, stream: bool) -> tuple[str, str]:
    body = request_body(messages, turn)
    extra = {"method": body.pop("method")}
    if not stream:
        reply = client.chat.completions.create(**body, extra_body=extra)
        return "reply", reply.choices[0].message.content
    chunks = client.chat.completions.create(**body, stream=True, extra_body=extra)
    text = ""
    for n, chunk in enumerate(chunks, 1):
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if turn.stop and n == STOP_AFTER:
            chunks.close()  # the client goes away mid-reply
            return "cancelled", text
    return "reply", text


def converse(name: str, base_url: str, outcomes: list) -> None:
    """One client's three turns, in order, each completed reply joining the history."""
    gradio = Client(base_url, verbose=False) if name.startswith("gradio") else None
    api = openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key="none", max_retries=0)
    history: list[dict] = []
    for turn in CLIENTS[name]:
        if gradio is not None:
            outcome = gradio_turn(gradio, history, turn)
        else:
            outcome = openai_turn(api, messages_for(history, turn), turn, stream=name == "openai_stream")
        outcomes.append(outcome)
        if outcome[0] == "reply":
            history += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": outcome[1]}]


def test_four_clients_three_turns_each_with_stops():
    engine = tiny_engine()
    solo = solo_runs(engine)
    ends = [(turn, end) for name, turns in CLIENTS.items() for turn, end in zip(turns, solo[name], strict=True)]
    assert all(end["finish_reason"] == "max_new_tokens" for turn, end in ends if turn.stop)  # more to say
    completed = [end["text"] for turn, end in ends if not turn.stop]
    assert len(set(completed)) == len(completed)  # no two requests have the same reply
    seen = slow_spy(engine, 0.01)  # slows each event, so that the four clients' requests overlap
    lock = WatchedLock()
    demo = serve(engine, lock)
    outcomes: dict[str, list] = {name: [] for name in CLIENTS}
    errors: list[tuple[str, Exception]] = []

    def run(name: str) -> None:
        try:
            converse(name, demo.local_url, outcomes[name])
        except Exception as err:  # reported below, with the client's name
            errors.append((name, err))

    try:
        threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in CLIENTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads), f"a client hung: {outcomes}"
        assert not errors

        for name, turns in CLIENTS.items():
            assert len(outcomes[name]) == len(turns), name  # nothing lost, nothing extra
            for i, (turn, (kind, text), end) in enumerate(zip(turns, outcomes[name], solo[name], strict=True)):
                if turn.stop:
                    assert kind == "cancelled" and text and end["text"].startswith(text), (name, i)
                    assert len(text) < len(end["text"]), (name, i)
                else:
                    assert (kind, text) == ("reply", end["text"]), (name, i)

        stops = sum(t.stop for turns in CLIENTS.values() for t in turns)
        turns_run = sum(len(turns) for turns in CLIENTS.values())
        wait_for(lambda: len(seen["finishes"]) == turns_run, 30)  # the stopped generations end too
        assert seen["most"] == 1  # never two generations at once
        assert seen["finishes"].count("cancelled") == stops and seen["running"] == 0
        assert lock.longest >= 3, lock.longest  # the load was real: requests waited in line for the engine

        ticket = lock.join()  # the line is empty: a newcomer holds the engine at once
        assert lock.wait(ticket, 5)
        lock.leave(ticket)

        gradio = Client(demo.local_url, verbose=False)
        api = openai.OpenAI(base_url=f"{demo.local_url.rstrip('/')}/v1", api_key="none", max_retries=0)
        first, again = CLIENTS["gradio_predict"][0], ("reply", solo["gradio_predict"][0]["text"])
        assert gradio_turn(gradio, [], first) == again
        assert openai_turn(api, messages_for([], first), first, stream=True) == again
    finally:
        demo.close()
