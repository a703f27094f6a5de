"""What keeps other web sites and odd requests out: the Host allow-list, JSON-only bodies, no lone surrogates.

A server on 127.0.0.1 without an API key is reachable from every web page its user opens. Two things
keep those pages from using it:

* A cross-site page may send a "simple" POST (``Content-Type: text/plain``) without asking the
  browser first; only ``application/json`` needs the browser's CORS preflight, which this server
  never grants. So every POST body must say ``application/json`` (else 415).
* A page whose DNS name is rebound to 127.0.0.1 is same-origin with the server in the browser's eyes
  and could read the replies; its requests still carry its own name in ``Host``. So ``Host`` must be
  a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``), the name the server listens on, a name
  the user allowed (``--allowed-host``), or an IP address: an address cannot be rebound, so a Host
  that is one can only come from a client that dialled that address itself (403 otherwise).

Strings with lone UTF-16 surrogates (``"\\ud800"``) are valid JSON but not text: nothing can encode
them, so they are refused with a 400 naming the field before anything else reads the request.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .accesslog import note_of
from .errors import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(value: str) -> str:
    """The name in a Host header (or a ``--host``/``--allowed-host`` value), without port, brackets,
    trailing dot or case: ``[::1]:8080`` -> ``::1``, ``LocalHost.:80`` -> ``localhost``."""
    v = value.strip().lower()
    if v.startswith("["):  # [v6]:port
        end = v.find("]")
        v = v[1:end] if end > 0 else v[1:]
    elif v.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        v = v.partition(":")[0]
    return v.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """Refuses (403) every request whose ``Host`` is a name not on the allow-list; the refusal goes
    into the request log's note (see :mod:`.accesslog`)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in (*LOOPBACK_NAMES, *allowed) if host_name(h))

    def allows(self, host: str | None) -> bool:
        if host is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = host_name(host)
        return name in self.allowed or _is_address(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = [v for k, v in scope.get("headers", []) if k == b"host"]
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        if len(hosts) > 1 or not self.allows(host):
            shown = host if host is not None else "several Host headers"
            err = APIError(
                403,
                f"Host {shown!r} is not allowed: this server answers requests for localhost, its own address and "
                "the names given with --allowed-host (start it with --allowed-host NAME to add one)",
                type="invalid_request_error",
                code="host_not_allowed",
            )
            note_of(scope).error = err
            await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def require_json(content_type: str | None) -> None:
    """A 415 unless the body is declared as ``application/json`` (any charset parameter is fine)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json":
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise APIError(
            415,
            f"the request body must be JSON sent with 'Content-Type: application/json' (got {got})",
            code="unsupported_media_type",
        )


def refuse_surrogates(body: dict[str, Any]) -> None:
    """A 400 naming the first field whose key or text holds a lone surrogate, which no encoding can write."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return  # the common case, checked in C
    except UnicodeEncodeError:
        pass
    # walk without recursion: the body may nest as deep as the JSON parser allowed
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                raise _surrogate_error(path or "body")
        elif isinstance(value, dict):
            for key in value:
                if not _encodable(key):
                    shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
                    raise _surrogate_error(f"{path}.{shown}" if path else shown)
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_error(param: str) -> APIError:
    return APIError(
        400,
        f"{param} holds a lone UTF-16 surrogate (such as \\ud800), which is not text: send valid Unicode",
        param=param,
        code="invalid_unicode",
    )
