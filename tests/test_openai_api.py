"""The OpenAI-compatible routes, driven by the official `openai` client against the app served in-process
on the tiny random model (as tests/test_gradio_client.py): replies equal the engine's own, streamed or
whole; `--auth` is required; bad fields get a 400 that names them; a client that disconnects frees the
engine; OpenAI and Gradio API requests never generate at the same time."""

import threading
import time

import httpx
import openai
import pytest
from gradio_client import Client

from app.openai_api import RequestError, mount_openai, parse_request, served_model
from app.serial import EngineLock
from app.settings import AppOptions
from app.ui import build_ui
from engine.config import GenerationConfig, SamplingConfig
from tests.test_gradio_client import free_port
from tests.tiny import tiny_engine

AUTH = ("me", "secret")
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def serve(engine, options: AppOptions, auth=AUTH):
    lock = EngineLock()
    demo = build_ui(engine, options, lock)
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True, auth=auth)
    mount_openai(demo, engine, options, lock)
    return demo


@pytest.fixture(scope="module")
def served():
    engine = tiny_engine()
    demo = serve(engine, AppOptions(poll_s=0.0))
    base = demo.local_url.rstrip("/")
    try:
        yield engine, base, openai.OpenAI(base_url=f"{base}/v1", api_key=":".join(AUTH), max_retries=0)
    finally:
        demo.close()


def engine_reply(engine, messages, max_new: int, **config) -> dict:
    """The end event of the engine's own generation for `messages` (vanilla greedy unless told)."""
    config = GenerationConfig(**{"method": "vanilla", "max_new_tokens": max_new, **config})
    return list(engine.generate(engine.chat_ids(messages), config))[-1]


def test_models_lists_the_served_model(served):
    engine, _, client = served
    assert [m.id for m in client.models.list()] == [served_model(engine)] == ["llama"]


def test_greedy_reply_is_the_engines_own(served):
    engine, _, client = served
    reply = client.chat.completions.create(model="llama", messages=HELLO, max_tokens=24, temperature=0)
    own = engine_reply(engine, HELLO, 24)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == own["text"]
    assert choice.finish_reason == ("length" if own["finish_reason"] == "max_new_tokens" else "stop")
    prompt = len(engine.chat_ids(HELLO))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, len(own["output_ids"]))
    assert reply.usage.total_tokens == prompt + len(own["output_ids"])
    eagle = reply.model_extra["eagle"]
    assert eagle["method"] == "eagle2" and eagle["backend"] == engine.backend
    assert eagle["cycles"] >= 1 and eagle["tau"] > 1.0  # the oracle head's drafts are accepted
    assert eagle["tokens_per_s"] > 0 and eagle["tree"] == "60 tokens, depth 6, top-k 10"


def test_streaming_gives_the_same_reply_in_pieces(served):
    engine, _, client = served
    chunks = list(
        client.chat.completions.create(
            model="llama", messages=HELLO, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"method": "eagle1"},
        )
    )  # fmt: skip
    own = engine_reply(engine, HELLO, 24)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == own["text"] and sum(1 for d in deltas if d) >= 2
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].model_extra["eagle"]["method"] == "eagle1"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(own["output_ids"])
    assert len({c.id for c in chunks}) == 1


def test_stop_strings_seed_and_vanilla(served):
    engine, _, client = served
    text = engine_reply(engine, HELLO, 24)["text"]
    stop = text[5:7]
    cut = client.chat.completions.create(model="llama", messages=HELLO, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [
        client.chat.completions.create(
            model="llama", messages=HELLO, max_tokens=16, temperature=1.0, seed=7, extra_body={"method": "vanilla"}
        )
        for _ in range(2)
    ]
    own = engine_reply(engine, HELLO, 16, sampling=SamplingConfig(temperature=1.0), seed=7)["text"]
    assert [r.choices[0].message.content for r in sampled] == [own, own]
    assert sampled[0].model_extra["eagle"]["method"] == "vanilla"


def test_login_is_required(served):
    _, base, _ = served
    for key in ("me:wrong", "secret", "Basic bWU6c2VjcmV0"):  # the last: a password sent as a token
        with pytest.raises(openai.AuthenticationError, match="--auth"):
            openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0).models.list()
    assert httpx.get(f"{base}/v1/models").status_code == 401
    body = {"model": "llama", "messages": HELLO, "max_tokens": 2}
    assert httpx.post(f"{base}/v1/chat/completions", json=body).status_code == 401
    assert httpx.post(f"{base}/v1/chat/completions", json=body, auth=AUTH).status_code == 200  # HTTP basic


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"max_tokens": 10**9}, "max_tokens", "max_tokens must be between 1 and 2048, got 1000000000"),
        ({"max_tokens": 0}, "max_tokens", "between 1 and 2048, got 0"),
        ({"max_tokens": 2.5}, "max_tokens", "max_tokens must be a whole number, got 2.5"),
        ({"temperature": 9}, "temperature", "temperature must be in [0.0, 2.0], got 9.0"),
        ({"top_p": 0}, "top_p", "top_p must be in (0.0, 1.0], got 0.0"),
        ({"seed": "x"}, "seed", "seed must be a whole number, got 'x'"),
        ({"model": "gpt-4o"}, "model", "model must be 'llama' (the model this app serves), got 'gpt-4o'"),
        ({"messages": []}, "messages", "messages must be a non-empty list"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "messages[0].role must be"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages", "messages[0].content must be a string, got int"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop takes at most 4 strings, got 5"),
        ({"method": "medusa"}, "method", "method must be one of eagle2, eagle1, vanilla, got 'medusa'"),
        ({"n": 2}, "n", "n must be 1"),
    ],
)
def test_a_bad_field_gets_a_400_naming_it_and_the_app_still_answers(served, fields, param, says):
    engine, _, client = served
    request = {"model": "llama", "messages": HELLO, "max_tokens": 4, **fields}
    extra = {"method": request.pop("method")} if "method" in request else None  # not an OpenAI field
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request, extra_body=extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert says in error["message"]
    after = client.chat.completions.create(model="llama", messages=HELLO, max_tokens=3, temperature=0)
    assert after.choices[0].message.content == engine_reply(engine, HELLO, 3)["text"] != ""


def test_a_body_that_is_not_json_gets_a_400(served):
    _, base, client = served
    answer = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", auth=AUTH)
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"]
    too_long = [{"role": "user", "content": "word " * 400}]  # about 2,000 characters: past the 512-token context
    with pytest.raises(openai.BadRequestError, match="too long"):
        client.chat.completions.create(model="llama", messages=too_long, max_tokens=4)


def test_parse_request_reads_openai_shapes():
    engine = tiny_engine()
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}]
    body = {"model": "LLAMA", "messages": parts + HELLO[1:], "stop": "x", "temperature": 0, "seed": 3}
    chat = parse_request(body, engine, AppOptions(max_new_tokens=33))
    assert chat.messages == [{"role": "system", "content": "Be brief."}, HELLO[1]]
    assert (chat.config.max_new_tokens, chat.config.stop, chat.config.seed) == (33, ("x",), 3)
    assert chat.config.sampling.greedy and not chat.stream
    with pytest.raises(RequestError, match="text parts"):
        image = [{"role": "user", "content": [{"type": "image_url"}]}]
        parse_request({**body, "messages": image}, engine, AppOptions())
    with pytest.raises(RequestError, match="JSON object"):
        parse_request([body], engine, AppOptions())


def slow_spy(engine, pause_s: float):
    """Replace engine.generate with a copy that pauses between events and records, per generation, its
    finish reason and the most generations ever running at once."""
    generate, seen = engine.generate, {"running": 0, "most": 0, "finishes": []}
    guard = threading.Lock()

    def spy(prompt_ids, config, cancel=None):
        with guard:
            seen["running"] += 1
            seen["most"] = max(seen["most"], seen["running"])
        try:
            for event in generate(prompt_ids, config, cancel):
                time.sleep(pause_s)
                if event["type"] == "end":
                    seen["finishes"].append(event["finish_reason"])
                yield event
        finally:
            with guard:
                seen["running"] -= 1

    engine.generate = spy
    return seen


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_disconnect_mid_stream_cancels_the_generation():
    engine = tiny_engine()
    seen = slow_spy(engine, 0.05)  # a 400-token reply would take 20 s
    demo = serve(engine, AppOptions(poll_s=0.0), auth=None)
    try:
        client = openai.OpenAI(base_url=demo.local_url.rstrip("/") + "/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model="llama", messages=HELLO, max_tokens=400, temperature=0, stream=True
        )
        texts = [c.choices[0].delta.content for c, _ in zip(stream, range(3), strict=False)]
        stream.close()
        assert texts[0] == "" and all(texts[1:])
        wait_for(lambda: seen["finishes"])
        assert seen["finishes"] == ["cancelled"]
        after = client.chat.completions.create(model="llama", messages=HELLO, max_tokens=3, temperature=0)
        assert after.choices[0].message.content == engine_reply(engine, HELLO, 3)["text"]
    finally:
        demo.close()


def test_openai_and_gradio_requests_take_turns():
    engine = tiny_engine()
    solo = {n: engine_reply(engine, HELLO, n)["text"] for n in (6, 8)}
    seen = slow_spy(engine, 0.005)
    demo = serve(engine, AppOptions(poll_s=0.0), auth=None)
    replies, errors = {}, []

    def openai_turn(i):
        client = openai.OpenAI(base_url=demo.local_url.rstrip("/") + "/v1", api_key="none", max_retries=0)
        request = dict(model="llama", messages=HELLO, max_tokens=6, temperature=0)
        if i % 2:
            reply = client.chat.completions.create(**request).choices[0].message.content
        else:
            chunks = client.chat.completions.create(**request, stream=True)
            reply = "".join(c.choices[0].delta.content or "" for c in chunks)
        replies[f"openai{i}"] = reply

    def gradio_turn(i):
        client = Client(demo.local_url, verbose=False)
        replies[f"gradio{i}"] = client.predict(
            message="Hello there", system_prompt="Be brief.", method="eagle2", max_new_tokens=8, api_name="/chat"
        )

    def run(turn, i):
        try:
            turn(i)
        except Exception as err:  # reported below, with the others
            errors.append(err)

    try:
        threads = [threading.Thread(target=run, args=(t, i)) for i in range(3) for t in (openai_turn, gradio_turn)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        demo.close()
    assert not errors
    assert replies == {**{f"openai{i}": solo[6] for i in range(3)}, **{f"gradio{i}": solo[8] for i in range(3)}}
    assert seen["most"] == 1 and len(seen["finishes"]) == 6


def test_the_lock_serves_in_order_and_skips_who_left():
    lock = EngineLock()
    first, second, third = lock.join(), lock.join(), lock.join()
    assert lock.wait(first, 0) and not lock.wait(second, 0)
    lock.leave(second)  # gives up its place while waiting
    lock.leave(first)
    assert lock.wait(third, 0)
    cancel = threading.Event()
    cancel.set()
    with lock.hold(cancel) as held:
        assert not held
    lock.leave(third)
    with lock.hold(threading.Event()) as held:
        assert held


def test_auto_runs_the_method_measured_fastest_at_each_temperature():
    """Where launch.py measured that sampled drafting does not pay, "auto" (the default) runs vanilla at
    temperature > 0 and EAGLE-2 at 0; a method named in the request runs as named."""
    engine = tiny_engine()
    options = AppOptions(default_method="eagle2", sampling_method="vanilla", sampling_method_note="measured")
    body = {"model": "llama", "messages": HELLO[1:]}
    assert parse_request({**body, "temperature": 0}, engine, options).config.method == "eagle2"
    assert parse_request({**body, "temperature": 0.7}, engine, options).config.method == "vanilla"
    assert parse_request({**body, "temperature": 0.7, "method": "eagle2"}, engine, options).config.method == "eagle2"
    assert parse_request({**body, "temperature": 0.7, "method": "auto"}, engine, options).config.method == "vanilla"
    plain = AppOptions(default_method="eagle2")  # no measured difference: no "auto", EAGLE-2 at every temperature
    assert parse_request({**body, "temperature": 0.7}, engine, plain).config.method == "eagle2"
    with pytest.raises(RequestError, match="method must be one of eagle2, eagle1, vanilla, got 'auto'"):
        parse_request({**body, "method": "auto"}, engine, plain)
