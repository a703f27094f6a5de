"""Errors as OpenAI clients expect them: ``{"error": {"message", "type", "param", "code"}}`` and a status.

A library error carries the parameter at fault as data (see :mod:`trimix_cpp.errors`); a client of
the HTTP API sent JSON fields, so the parameters a request can set are named by the field that set
them (``trimix.alpha``), and that field becomes ``param``. Other parameters are the server's own
command-line flags (``--n-ctx``), named as its operator gave them.
"""

from __future__ import annotations

from typing import Any

from ..errors import ContextOverflowError, TrimixError, flag

# Library parameters whose value comes from a request field, and that field.
REQUEST_FIELDS = {
    "alpha": "trimix.alpha",
    "beta": "trimix.beta",
    "gamma": "trimix.gamma",
    "method": "trimix.method",
    "role": "trimix.role",
    "select": "trimix.select",
    "grid_alpha": "trimix.grid_alpha",
    "grid_beta": "trimix.grid_beta",
    "draft": "trimix.draft",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "seed": "seed",
    "max_tokens": "max_tokens",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}


def request_name(name: str) -> str:
    """How the server names a library parameter: its request field, else the server's flag."""
    return REQUEST_FIELDS.get(name) or flag(name)


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


def from_trimix(e: TrimixError, status: int = 400) -> APIError:
    """A user error raised by the library, as a 400 naming the request field that caused it."""
    message, param = e.render(request_name), REQUEST_FIELDS.get(e.param or "")
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
