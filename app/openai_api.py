"""The OpenAI-compatible routes on the app's own server: `POST /v1/chat/completions`, `GET /v1/models`.

Any OpenAI client (the `openai` package, chat front ends that speak to llama.cpp, Ollama or vLLM) can use
the running app: `base_url="http://127.0.0.1:7860/v1"`. A completion is streamed as server-sent events
(`"stream": true`) or returned whole. Besides OpenAI's fields, each response carries `"eagle"`: the method,
τ (tokens committed per verify cycle), cycles, tokens/s, the backend, the tree and why the reply ended;
streamed, it rides on the chunk that carries `finish_reason`. An extra request field `"method"` picks
`eagle2`, `eagle1` or `vanilla`, or `auto` where the page offers it (default: the method the page opens with).

Invariants:
  - One generation at a time with the UI: every request holds the engine's `EngineLock` (app/serial.py)
    from its first tokenization to its last event, in the order requests arrived.
  - A bad request gets HTTP 400 with OpenAI's error shape, naming the field, its range and the value
    given, and one line in the server log; a request without the `--auth` login gets 401.
  - A client that goes away (mid-stream or while waiting for its turn) cancels its generation and leaves
    the line, so the engine is free for the next request.
"""

import base64
import binascii
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.chat import ReplyView, check_history, stream_reply
from app.serial import EngineLock
from app.settings import AppOptions, ChatSettings, available_methods, opening_method
from engine.config import GenerationConfig

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_length": "length"}
MAX_STOP_STRINGS = 4  # as OpenAI
WAIT_POLL_S = 0.25  # how often a request waiting for the engine checks that its client is still there
_END = object()


class RequestError(ValueError):
    """A request that cannot run; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    """One validated completion request."""

    model: str
    messages: list[dict]
    config: GenerationConfig
    stream: bool = False
    include_usage: bool = False


def served_model(engine) -> str:
    """The model id this app serves (what `GET /v1/models` lists and `model` must name)."""
    return engine.describe().split(" · ")[0]


def parse_request(body, engine, options: AppOptions) -> ChatRequest:
    """The completion request in `body` (parsed JSON), or RequestError naming the field, range and value."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = served_model(engine)
    if not isinstance(body.get("model"), str) or body["model"].lower() != model.lower():
        raise RequestError(f"model must be {model!r} (the model this app serves), got {body.get('model')!r}", "model")
    methods = available_methods(engine, options)
    method = body.get("method", opening_method(options, methods))
    if method not in methods:
        raise RequestError(f"method must be one of {', '.join(methods)}, got {method!r}", "method")
    if body.get("n", 1) != 1:
        raise RequestError(f"n must be 1 (one reply per request), got {body['n']!r}", "n")
    messages = parse_messages(body.get("messages"))
    length = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    length = options.max_new_tokens if length is None else _number(length, param, whole=True)
    try:
        options.check_reply_length(length, param)
    except ValueError as err:
        raise RequestError(str(err), param) from None
    temperature = _number(body.get("temperature", 1.0), "temperature", low=0.0, high=2.0)
    top_p = _number(body.get("top_p", 1.0), "top_p", low=0.0, high=1.0, open_low=True)
    seed = body.get("seed")
    if seed is not None:
        seed = _number(seed, "seed", whole=True, low=0, high=2**63 - 1)
    settings = ChatSettings.with_tree(
        options.tree_for(temperature), max_new_tokens=length, temperature=temperature, top_p=top_p, seed=seed
    )
    config = replace(settings.config(options.method_for(method, temperature)), stop=parse_stop(body.get("stop")))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError(f"stream_options must be an object, got {stream_options!r}", "stream_options")
    return ChatRequest(model, messages, config, stream, bool(stream_options.get("include_usage", False)))


def parse_messages(messages) -> list[dict]:
    """Chat messages with string content; OpenAI's list of text parts is joined, a `developer` is a system."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} messages", "messages")
    plain = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):  # fmt: skip
                raise RequestError(f"messages[{i}].content may only hold text parts (no images or files)", "messages")
            m = {**m, "content": "".join(p["text"] for p in parts)}
        if isinstance(m, dict) and m.get("role") == "developer":
            m = {**m, "role": "system"}
        plain.append(m)
    try:
        return check_history(plain, ROLES, "messages")
    except ValueError as err:
        raise RequestError(str(err), "messages") from None


def parse_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _number(value, name: str, whole=False, low=None, high=None, open_low=False):
    kind = "a whole number" if whole else "a number"
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (whole and value != int(value)):
        raise RequestError(f"{name} must be {kind}, got {value!r}", name)
    value = int(value) if whole else float(value)
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if open_low else "["
        raise RequestError(f"{name} must be in {left}{low}, {high}], got {value}", name)
    return value


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def eagle_stats(view: ReplyView, engine, config: GenerationConfig) -> dict:
    """The response's extra `eagle` field: how the reply was decoded."""
    totals = view.totals
    cycles = int(totals.get("cycles", 0))
    return {
        "method": view.method,
        "tau": round(float(totals.get("tau", 0.0)), 3),
        "cycles": cycles,
        "tokens_per_s": round(float(totals.get("tokens_per_s", 0.0)), 2),
        "elapsed_s": round(float(totals.get("elapsed_s", 0.0)), 3),
        "draft_ms_per_cycle": round(float(totals.get("draft_ms", 0.0)) / max(cycles, 1), 2),
        "verify_ms_per_cycle": round(float(totals.get("verify_ms", 0.0)) / max(cycles, 1), 2),
        "backend": engine.backend,
        "tree": None if config.method == "vanilla" else config.tree.describe(),
        "finish": view.finish_message,
        "notice": view.notice,
    }


class OpenAIRoutes:
    """The two routes over one engine; `auth` is Gradio's: a list of (user, password) pairs, a callable
    or None."""

    def __init__(self, engine, options: AppOptions, lock: EngineLock, auth=None):
        self.engine, self.options, self.lock, self.auth = engine, options, lock, auth

    def mount(self, app) -> None:
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])

    # ---- routes -------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        if not self.authorized(request):
            return unauthorized()
        model = {"id": served_model(self.engine), "object": "model", "created": 0, "owned_by": "eagle-chat"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: Request) -> Response:
        if not self.authorized(request):
            return unauthorized()
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as err:
                raise RequestError(f"the request body is not valid JSON: {err}") from None
            chat = parse_request(body, self.engine, self.options)
        except ValueError as err:
            return bad_request(err)
        cancel = threading.Event()
        replies = self._replies(chat, cancel)
        try:
            first = await self._first_view(request, replies, cancel)
        except ValueError as err:  # the prompt cannot run (too long for the context)
            await _close(replies)
            return bad_request(err)
        except Exception as err:  # a model failure must not take the app down
            await _close(replies)
            log.exception("OpenAI request failed")
            return JSONResponse(error_body(f"the model failed: {err}", kind="server_error"), status_code=500)
        if first is None:  # the client went away while waiting for its turn
            await _close(replies)
            return Response(status_code=499)
        if chat.stream:
            events = self._stream(chat, replies, first, cancel)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._whole(request, chat, replies, first, cancel)

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the `--auth` login: as a bearer token `user:password`, or HTTP basic."""
        if not self.auth:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        user, sep, password = value.strip().partition(":")
        if not sep:
            return False
        if callable(self.auth):
            return bool(self.auth(user, password))
        given = f"{user}:{password}".encode()
        return any(hmac.compare_digest(given, f"{u}:{p}".encode()) for u, p in self.auth)

    # ---- generation ---------------------------------------------------------------------------

    def _replies(self, chat: ChatRequest, cancel: threading.Event) -> Iterator[ReplyView | None]:
        """None while waiting for the engine (every WAIT_POLL_S), then the reply's views; holds the lock
        from its turn until the generator ends or is closed."""
        ticket = self.lock.join()
        try:
            while not self.lock.wait(ticket, WAIT_POLL_S):
                yield None
            yield from stream_reply(self.engine, chat.messages, chat.config, cancel, self.options.poll_s)
        finally:
            self.lock.leave(ticket)

    async def _first_view(self, request: Request, replies, cancel: threading.Event) -> ReplyView | None:
        """The reply's first view, or None when the client went away first (then `cancel` is set)."""
        while True:
            item = await _next(replies)
            if item is _END:
                raise RuntimeError("the reply ended before it began")
            if item is not None:
                return item
            if await request.is_disconnected():
                cancel.set()
                return None

    async def _whole(self, request: Request, chat: ChatRequest, replies, view: ReplyView, cancel) -> Response:
        try:
            while (item := await _next(replies)) is not _END:
                view = item
                if await request.is_disconnected():
                    cancel.set()
                    return Response(status_code=499)
        except Exception as err:
            log.exception("OpenAI request failed")
            return JSONResponse(error_body(f"the model failed: {err}", kind="server_error"), status_code=500)
        finally:
            cancel.set()
            await _close(replies)
        message = {"role": "assistant", "content": view.text}
        body = self._envelope(chat, "chat.completion")
        body["choices"] = [{"index": 0, "message": message, "finish_reason": _finish(view), "logprobs": None}]
        body["usage"] = _usage(view)
        body["eagle"] = eagle_stats(view, self.engine, chat.config)
        return JSONResponse(body)

    async def _stream(self, chat: ChatRequest, replies, view: ReplyView, cancel) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, text deltas, the finish chunk (with `eagle`), usage, [DONE].
        Closed early (the client disconnected), it cancels the generation and waits for the engine to stop."""
        envelope = self._envelope(chat, "chat.completion.chunk")

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _sse({**envelope, "choices": [choice], **extra})

        try:
            yield chunk({"role": "assistant", "content": ""})
            sent = 0
            item = view
            while item is not _END:
                view = item
                if len(view.text) > sent:
                    yield chunk({"content": view.text[sent:]})
                    sent = len(view.text)
                item = await _next(replies)
            yield chunk({}, _finish(view), eagle=eagle_stats(view, self.engine, chat.config))
            if chat.include_usage:
                yield _sse({**envelope, "choices": [], "usage": _usage(view)})
            yield "data: [DONE]\n\n"
        except Exception as err:  # the model failed mid-stream: the client gets an error event
            log.exception("OpenAI stream failed")
            yield _sse(error_body(f"the model failed: {err}", kind="server_error"))
        finally:
            cancel.set()
            with anyio.CancelScope(shield=True):  # also when the response task was cancelled
                await _close(replies)

    def _envelope(self, chat: ChatRequest, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": chat.model}


def mount_openai(demo, engine, options: AppOptions, lock: EngineLock) -> OpenAIRoutes:
    """Serve the routes on a launched Gradio app (Gradio builds its FastAPI server in `launch()`), with
    the same login as the page; `lock` must be the one the UI was built with."""
    if not getattr(demo, "is_running", False):
        raise RuntimeError("launch the Gradio app before mounting the OpenAI routes on its server")
    routes = OpenAIRoutes(engine, options, lock, demo.auth)
    routes.mount(demo.app)
    return routes


def bad_request(err: ValueError) -> JSONResponse:
    param = getattr(err, "param", None)
    log.warning("OpenAI request refused%s: %s", f" ({param})" if param else "", err)
    return JSONResponse(error_body(str(err), param), status_code=400)


def unauthorized() -> JSONResponse:
    message = (
        "this app was started with --auth: send the login as a bearer token 'user:password' "
        "(the openai client's api_key) or with HTTP basic authentication"
    )
    body = error_body(message, kind="authentication_error", code="invalid_api_key")
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="eagle-chat"'})


async def _next(replies):
    return await anyio.to_thread.run_sync(next, replies, _END)


async def _close(replies) -> None:
    await anyio.to_thread.run_sync(replies.close)


def _finish(view: ReplyView) -> str:
    return FINISH_REASONS.get(view.finish_reason, "stop")


def _usage(view: ReplyView) -> dict:
    completion = int(view.totals.get("new_tokens", 0))
    return {"prompt_tokens": view.prompt_tokens, "completion_tokens": completion,
            "total_tokens": view.prompt_tokens + completion}  # fmt: skip


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
