"""The request log: one line per request, built from a :class:`RequestNote` the handlers fill in.

The outermost ASGI layer (:class:`RequestLog`) puts a fresh note on each HTTP request's scope and
writes the line when the response is over, whatever ended it; everything below it (the Host guard,
the route handlers, the stream) records what only it knows on that note, through :func:`note_of`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError
from .responses import Outcome

log = logging.getLogger("trimix.server")

_SCOPE_KEY = "trimix.log"  # where a request's note sits on its ASGI scope


@dataclass
class RequestNote:
    """What the log line says about a request beyond its method, path, status and time; filled in
    while the request runs, so it is the one mutable record here."""

    stream: bool = False  # a generation answered as server-sent events
    outcome: Outcome | None = None  # a finished generation: method, weights, tokens, why it stopped
    error: APIError | None = None  # the error the client was sent
    ended: bool = False  # the generation's last event reached its handler
    disconnected: bool = False  # the client left before the answer was complete


def note_of(scope: Scope) -> RequestNote:
    """The request's note; a throwaway one when the app runs without :class:`RequestLog` around it."""
    note = scope.get(_SCOPE_KEY)
    return note if isinstance(note, RequestNote) else RequestNote()


class RequestLog:
    """One line per request on the server's log: who, what, status, time, and for generations the
    method, weights, selection, token counts and why it stopped. Polls of ``/health`` are not logged
    (a monitor polls it every few seconds), nor the page's static files unless they fail."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = RequestNote()
        scope[_SCOPE_KEY] = note
        status = 0
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            if path != "/health" and not (path.startswith("/static/") and 0 < status < 400):
                log.info("%s", request_line(scope, status, time.perf_counter() - t0, note))


def request_line(scope: Scope, status: int, seconds: float, note: RequestNote) -> str:
    client = scope.get("client") or ("-", 0)
    head = f'{client[0]} "{scope.get("method", "")} {scope.get("path", "")}" {status or "-"} {seconds:.2f}s'
    bits: list[str] = []
    if note.stream:
        bits.append("stream")
    o = note.outcome
    if o is not None:
        weights = " ".join(f"{r}={w:g}" for r, w in o.weights.items())
        chosen = f" ({o.selection['strategy']})" if o.selection else ""
        rate = o.timings.get("gen_tokens_per_s", 0.0)
        bits.append(
            f"{o.method} {weights}{chosen} | prompt {o.prompt_tokens} tok, generated {o.completion_tokens} tok "
            f"{rate:.1f} tok/s | {o.finish_reason}"
        )
    e = note.error
    if e is not None:
        bits.append(f"{e.code or e.type}: {e.message}")
    if note.disconnected:
        bits.append("client disconnected")
    return head + (" | " + " | ".join(bits) if bits else "")
