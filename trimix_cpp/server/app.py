"""The HTTP side: an ASGI app (Starlette) with OpenAI's routes, the chat page, auth, limits and the request log.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (JSON, or server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /health`` (200 once the models are loaded), and
the chat page at ``/`` with its files under ``/static/``. With an API key, every ``/v1/`` route needs
``Authorization: Bearer KEY``; the page and ``/health`` stay open so a browser can load the page and
a monitor can poll. Every failure is an OpenAI-style JSON error with its status; nothing a request
sends can raise out of a handler.

Admission: at most ``parallel + queue`` requests are in flight (decoding, or waiting for a
sequence); past that the server answers 503 with ``Retry-After`` at once instead of letting a queue
grow without bound. A client that goes away (a closed stream, or a dropped connection while a
non-streaming request waits) cancels its job, which frees its sequence and KV cells at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import TrimixError
from ..generation import SeqSpec
from ..modelset import ModelSet
from .accesslog import RequestLog, RequestNote, note_of
from .chat import ChatFormat, ChatTemplateError, NoChat, chat_format, messages_from_request, prompt_tokens
from .defaults import ServeDefaults, available_methods
from .errors import APIError, from_trimix, server_error, still_loading
from .guard import HostGuard, refuse_surrogates, require_json
from .responses import Reply
from .schema import ChatRequest, CompletionRequest, Limits, StreamOptions, completion_prompt, parse, seq_spec
from .worker import Accepted, Done, EngineWorker, Event, Failed, Job, Pieces, PromptMaker

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("trimix.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page loads nothing from anywhere else, and the browser is told so.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Gone:
    """The client went away before the job's next event (the job is cancelled)."""


@dataclass(frozen=True)
class ServerConfig:
    """The server's settings (the models are the worker's)."""

    model_name: str = "trimix"
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides the loopback ones (see guard.py)
    body_timeout: float = 60.0  # seconds a client may take to send its whole request body
    queue: int = 16
    max_tokens: int = 256  # when a request gives none
    max_body: int = 1 << 20  # bytes of a request body
    defaults: ServeDefaults = field(default_factory=ServeDefaults)  # method, weights, temperature, the page's mode
    keep_conversations: bool = True  # a conversation's next turn reuses its cached prefix (worker, .conversations)


class TrimixServer:
    """The app and its state: the worker that owns the engine, admission counts, the chat format."""

    def __init__(self, modelset: ModelSet, worker: EngineWorker, config: ServerConfig) -> None:
        self.modelset = modelset
        self.worker = worker
        self.config = config
        self.defaults = config.defaults.resolved(modelset.profile)
        self.chat: ChatFormat = NoChat("the models are still loading")
        self.in_flight = 0
        self.started = int(time.time())
        self._recent_s = 1.0  # a moving average of request durations, for Retry-After
        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
        self.app: ASGIApp = RequestLog(HostGuard(app, config.allowed_hosts))

    def on_loaded(self, engine: Engine) -> None:
        """Runs on the engine's thread once the models are loaded: read the chat template."""
        profile = self.modelset.profile
        self.chat = chat_format(engine, profile.template if profile is not None else None)
        if isinstance(self.chat, NoChat):
            log.warning("chat is off: %s", self.chat.reason)

    # -- routes -----------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    async def health(self, request: Request) -> Response:
        w = self.worker
        if w.load_error is not None:
            return JSONResponse({"status": "error", "message": "the models failed to load"}, status_code=503)
        if not w.loaded:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
        if w.draining:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.config.model_name, "in_flight": self.in_flight, **w.stats})

    async def models(self, request: Request) -> Response:
        return await _guard(request, self._models)

    async def completions(self, request: Request) -> Response:
        return await _guard(request, self._completions)

    async def chat_completions(self, request: Request) -> Response:
        return await _guard(request, self._chat_completions)

    async def _models(self, request: Request) -> Response:
        self._auth(request)
        card: dict[str, Any] = {"id": self.config.model_name, "object": "model", "created": self.started}
        card["owned_by"] = "trimix"
        info = self.worker.info
        if info is not None:
            card["trimix"] = {
                "models": info.files,
                "n_ctx": info.n_ctx,
                "parallel": info.n_seq,
                # what the page offers: only what runs on the loaded models, and where it starts
                "methods": available_methods(info.roles),
                "defaults": self.defaults.as_dict(),
                "chat": not isinstance(self.chat, NoChat),
            }
        return JSONResponse({"object": "list", "data": [card]})

    async def _completions(self, request: Request) -> Response:
        self._auth(request)
        body = await read_json(request, self.config.max_body, self.config.body_timeout)
        req = parse(CompletionRequest, body)
        assert isinstance(req, CompletionRequest)
        spec = seq_spec(req, self._limits())
        prompt = completion_prompt(req)
        modelset = self.modelset

        def make(engine: Engine) -> np.ndarray:
            if isinstance(prompt, str):
                p = modelset.prompt(engine, prompt)
                return engine.tokenize(p) if isinstance(p, str) else p
            ids = np.asarray(prompt, dtype=np.int64)
            bad = ids[(ids < 0) | (ids >= engine.vocab.n_vocab)]
            if len(bad):
                raise APIError(
                    400,
                    f"prompt holds token id {int(bad[0])}, outside the vocabulary (0 to {engine.vocab.n_vocab - 1})",
                    param="prompt",
                    code="invalid_value",
                )
            return ids.astype(np.int32)

        return await self._generate(request, req.stream, req.stream_options, spec, make, chat=False)

    async def _chat_completions(self, request: Request) -> Response:
        self._auth(request)
        body = await read_json(request, self.config.max_body, self.config.body_timeout)
        req = parse(ChatRequest, body)
        assert isinstance(req, ChatRequest)
        spec = seq_spec(req, self._limits())
        messages = messages_from_request(req.messages)
        self._require_loaded()
        try:
            # the template is the model file's code: keep the loop free while it runs
            parts = await asyncio.to_thread(self.chat.parts, messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages", code="chat_template") from None
        return await self._generate(
            request, req.stream, req.stream_options, spec, lambda engine: prompt_tokens(engine, parts), chat=True
        )

    # -- generation -------------------------------------------------------------------------------

    async def _generate(
        self,
        request: Request,
        stream: bool | None,
        options: StreamOptions | None,
        spec: SeqSpec,
        make: PromptMaker,
        *,
        chat: bool,
    ) -> Response:
        note = note_of(request.scope)
        self._admit()
        job = Job(make, spec, asyncio.get_running_loop(), bool(stream), "messages" if chat else "prompt")
        self.worker.submit(job)
        self.in_flight += 1
        started = time.perf_counter()
        reply = Reply(chat, self.config.model_name)
        note.stream = bool(stream)

        def finish() -> None:
            if not note.ended:
                note.disconnected = True
            job.cancel()  # a no-op when the generation is done; frees the sequence otherwise
            self.in_flight -= 1
            self._recent_s = 0.8 * self._recent_s + 0.2 * (time.perf_counter() - started)

        if not stream:
            try:
                event = await _next_event(request, job)
                note.ended = not isinstance(event, Gone)
                match event:
                    case Failed(error):
                        raise error
                    case Done(outcome):
                        note.outcome = outcome
                        return JSONResponse(reply.full(outcome))
                    case _:
                        return Response(status_code=204)  # nobody is there to read it
            finally:
                finish()
        event = await _next_event(request, job)
        if not isinstance(event, Accepted):
            note.ended = not isinstance(event, Gone)
            finish()
            if isinstance(event, Failed):
                raise event.error
            return Response(status_code=204)
        include_usage = bool(options is not None and options.include_usage)
        return EventStream(self._events(job, reply, include_usage, note), on_close=finish)

    async def _events(self, job: Job, reply: Reply, include_usage: bool, note: RequestNote) -> AsyncIterator[bytes]:
        """The stream's bytes: the chat role chunk, one chunk per step's text, the last chunks."""
        first = reply.first()
        if first is not None:
            yield first
        while True:
            match await job.events.get():
                case Pieces(text):
                    yield reply.piece(text)
                case Done(outcome):
                    note.ended = True
                    note.outcome = outcome
                    yield reply.last(outcome, include_usage)
                    return
                case Failed(error):
                    note.ended = True
                    note.error = error
                    yield b"data: " + json.dumps(error.body(), ensure_ascii=False).encode() + b"\n\n"
                    return

    # -- checks -----------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            what = "no API key given" if not given else "incorrect API key"
            raise APIError(
                401,
                f"{what}: send the header 'Authorization: Bearer KEY' with the server's key",
                type="invalid_request_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _require_loaded(self) -> None:
        if not self.worker.loaded:
            raise still_loading()

    def _limits(self) -> Limits:
        self._require_loaded()
        info = self.worker.info
        assert info is not None
        return Limits(
            n_ctx=info.n_ctx,
            default_max_tokens=min(self.config.max_tokens, info.n_ctx),
            profile=self.modelset.profile,
            profile_stops=tuple(self.modelset.stops(None)),
            defaults=self.defaults,
        )

    def _admit(self) -> None:
        info = self.worker.info
        capacity = (info.n_seq if info else 1) + self.config.queue
        if self.in_flight >= capacity:
            wait = max(1, min(60, math.ceil(self._recent_s)))
            raise APIError(
                503,
                f"the server is busy ({self.in_flight} requests decoding or waiting, the most it takes); "
                f"try again in {wait} s",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": str(wait)},
            )


class EventStream(StreamingResponse):
    """A server-sent-event stream that runs ``on_close`` however it ends: finished, failed, or
    cut off by the client (even before its first byte)."""

    def __init__(self, content: Any, on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _next_event(request: Request, job: Job) -> Event | Gone:
    """The job's next event, or :class:`Gone` (and the job cancelled) if the client leaves first."""
    get = asyncio.ensure_future(job.events.get())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (get, gone):
            if not t.done():
                t.cancel()
    if get in done:
        return get.result()
    job.cancel()
    return Gone()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def read_json(request: Request, limit: int, timeout: float = 60.0) -> dict[str, Any]:
    """The body as a JSON object: declared as JSON (415 otherwise, see guard.py), refusing bodies
    over ``limit`` bytes before reading them, and a client that takes over ``timeout`` seconds to
    send it (408); no string in it may hold a lone surrogate."""
    require_json(request.headers.get("content-type"))
    length = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is over the server's limit of {limit} bytes", code="request_too_large")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "the Content-Length header is not a number", code="invalid_header")
        if int(length) > limit:
            raise too_big
    buf = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > limit:
                raise too_big

    try:
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    if not buf:
        raise APIError(400, "the request body is empty (send a JSON object)", code="invalid_json")
    try:
        body = json.loads(bytes(buf))
    except RecursionError:
        raise APIError(400, "the request body nests too deeply to be a request", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        where = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise APIError(400, f"the request body is not valid JSON{where}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    refuse_surrogates(body)
    return body


async def _guard(request: Request, handler: Callable[[Request], Awaitable[Response]]) -> Response:
    """Run a handler; any failure becomes an OpenAI-style error response (and one log entry)."""
    note = note_of(request.scope)
    try:
        return await handler(request)
    except APIError as e:
        note.error = e
        return error_response(e)
    except TrimixError as e:
        err = from_trimix(e)
        note.error = err
        return error_response(err)
    except ClientDisconnect:  # the client left while sending its body: nobody will read an answer
        note.disconnected = True
        return Response(status_code=499)
    except Exception as e:
        log.error(
            "%s %s failed: %s: %s\n%s",
            request.method,
            request.url.path,
            type(e).__name__,
            e,
            traceback.format_exc().rstrip(),
        )
        err = server_error()
        note.error = err
        return error_response(err)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, wrong method) in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    words = {404: "no such route", 405: "method not allowed on this route"}
    message = f"{words.get(exc.status_code, exc.detail)}: {request.method} {request.url.path}"
    err = APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else "method_not_allowed")
    return JSONResponse(err.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))
