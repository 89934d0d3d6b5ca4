"""The `chat` API endpoint through gradio_client, against the app served in-process on the tiny random
model: it streams the reply, takes history and settings, and reports bad input as a clear error."""

import socket
import threading

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.chat import build_messages, stream_reply
from app.settings import make_config
from app.ui import AppOptions, build_ui
from engine.config import TreeConfig
from tests.tiny import tiny_engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    engine = tiny_engine()
    demo = build_ui(engine, AppOptions(poll_s=0.0))
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield engine, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def expected_reply(engine, messages, method, max_new):
    config = make_config(method, max_new, 0.0, 1.0, 0, 60, 6, 10)
    return list(stream_reply(engine, messages, config, threading.Event(), 0.0))[-1].text


def test_chat_streams_the_reply(served):
    engine, client = served
    job = client.submit("Hello <there>", None, "Be brief.", "eagle2", 0.0, 1.0, 0, 24, api_name="/chat")
    updates = list(job)
    final = job.result()
    assert updates and updates[-1] == final
    assert all(final.startswith(u) for u in updates)
    assert final == expected_reply(engine, build_messages("Be brief.", [], "Hello <there>"), "vanilla", 24)


def test_chat_keyword_arguments_and_history(served):
    engine, client = served
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    final = client.predict(message="and now?", history=history, method="vanilla", max_new_tokens=12, api_name="/chat")
    assert final == expected_reply(engine, build_messages("", history, "and now?"), "vanilla", 12)


def test_chat_reports_bad_input(served):
    _, client = served
    with pytest.raises(AppError, match="empty"):
        client.predict(message="   ", api_name="/chat")
    with pytest.raises(AppError, match="temperature"):
        client.predict(message="hi", temperature=99.0, api_name="/chat")
    with pytest.raises(AppError, match="history"):
        client.predict(message="hi", history=[{"text": "no role"}], api_name="/chat")


def test_chat_names_the_field_the_range_and_the_value(served, caplog, capfd):
    _, client = served
    bad = [
        (dict(max_new_tokens=10**9), "max_new_tokens must be between 1 and 2048, got 1000000000"),
        (dict(history=[{"role": "user", "content": ["hi"]}]), "history[0].content must be a string, got list"),
        (dict(history=[{"role": "wizard", "content": "hi"}]), "history[0].role must be \"user\" or \"assistant\""),
        (dict(history="hi"), "history must be a list"),
    ]
    capfd.readouterr()
    for fields, says in bad:
        with pytest.raises(AppError) as caught:
            client.predict(message="hi", api_name="/chat", **fields)
        assert says in str(caught.value)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == len(bad) and all(says in line for line, (_, says) in zip(refusals, bad, strict=True))
    assert "Traceback" not in capfd.readouterr().err  # one log line per refusal, no traceback
    assert client.predict(message="hi", max_new_tokens=3, api_name="/chat")  # still answering


def test_only_chat_is_public(served):
    _, client = served
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/chat"]


def test_chat_drafts_with_the_sampling_tree_when_sampling():
    engine = tiny_engine()
    greedy, sampling = TreeConfig(12, 4, 4, adaptive=True), TreeConfig(5, 2, 3)  # the API keeps the whole tree
    used, generate = [], engine.generate

    def spy(prompt_ids, config, *args, **kwargs):
        used.append(config.tree)
        return generate(prompt_ids, config, *args, **kwargs)

    engine.generate = spy
    options = AppOptions(poll_s=0.0, tree=greedy, sampling_tree=sampling, sampling_tree_note="a test tree")
    demo = build_ui(engine, options)
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        client.predict(message="hi", temperature=0.0, max_new_tokens=4, api_name="/chat")
        client.predict(message="hi", temperature=0.8, max_new_tokens=4, api_name="/chat")
    finally:
        demo.close()
    assert used == [greedy, sampling]
