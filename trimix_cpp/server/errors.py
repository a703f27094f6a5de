"""Errors as OpenAI clients expect them: ``{"error": {"message", "type", "param", "code"}}`` and a status.

The library's messages name command-line flags (``--alpha``), since that is how most people meet
them; a client of the HTTP API sent JSON fields instead, so the flags a request can set are
rewritten to the field that set them (``trimix.alpha``), and the first one becomes ``param``.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ContextOverflowError, TrimixError

# Command-line flags whose value comes from a request field, and that field.
FLAG_FIELDS = {
    "--alpha": "trimix.alpha",
    "--beta": "trimix.beta",
    "--gamma": "trimix.gamma",
    "--method": "trimix.method",
    "--role": "trimix.role",
    "--select": "trimix.select",
    "--grid-alpha": "trimix.grid_alpha",
    "--grid-beta": "trimix.grid_beta",
    "--draft": "trimix.draft",
    "--temperature": "temperature",
    "--top-k": "top_k",
    "--top-p": "top_p",
    "--min-p": "min_p",
    "--seed": "seed",
    "--max-tokens": "max_tokens",
    "--repeat-penalty": "repeat_penalty",
    "--repeat-last-n": "repeat_last_n",
    "--frequency-penalty": "frequency_penalty",
    "--presence-penalty": "presence_penalty",
}
_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


class APIError(Exception):
    """An error response: HTTP status, OpenAI error type, the offending field and a short code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_message(message: str) -> tuple[str, str | None]:
    """A library message with request fields in place of flags, and the first such field."""
    first: list[str] = []

    def swap(m: re.Match[str]) -> str:
        field = FLAG_FIELDS.get(m.group(0))
        if field is None:
            return m.group(0)
        if not first:
            first.append(field)
        return field

    text = _FLAG.sub(swap, message)
    return text, (first[0] if first else None)


def from_trimix(e: TrimixError, status: int = 400) -> APIError:
    """A user error raised by the library, as a 400 naming the field that caused it."""
    message, param = api_message(str(e))
    if isinstance(e, ContextOverflowError):
        return APIError(400, message, param=param or "messages", code="context_length_exceeded")
    return APIError(status, message, param=param, code="invalid_value")


def server_error(message: str = "the server failed to complete this request (see the server's log)") -> APIError:
    """An unexpected failure: a generic message, so that nothing internal reaches the client."""
    return APIError(500, message, type="server_error", code="internal_error")


def shutting_down() -> APIError:
    """A request that arrives or waits while the server stops."""
    return APIError(
        503, "the server is shutting down", type="server_error", code="server_shutdown", headers={"Retry-After": "5"}
    )


def still_loading() -> APIError:
    """A request before the models are loaded: the client may retry shortly."""
    return APIError(
        503,
        "the models are still loading (GET /health answers 200 once they are ready)",
        type="server_error",
        code="loading",
        headers={"Retry-After": "2"},
    )
