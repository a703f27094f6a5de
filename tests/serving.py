"""Helpers for the tests that drive a real ``trimix serve`` over HTTP (test_serve*.py and others).

The server itself is started by :func:`trimix_cpp.server.launch.start_server`, which the serve
benchmark uses too; here it runs llama.cpp on one thread (a shared machine's other work then cannot
stall its decode) and a server that does not start fails the test with its log. Importing this
module skips the importing test module when the ``[serve]`` extra or httpx is missing.
"""

from __future__ import annotations

import json
import os
import time

import pytest

for _mod in ("starlette", "uvicorn", "pydantic", "jinja2", "httpx"):
    pytest.importorskip(_mod, reason="trimix serve's tests need the [serve] extra and httpx ([test])")

import httpx  # noqa: E402

from trimix_cpp.server.launch import ServerProcess, ServerStartError  # noqa: E402
from trimix_cpp.server.launch import start_server as launch  # noqa: E402

# the servers are local: never through a proxy the environment may name
os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))

UG = "ئالاقەداشنى ئۆچۈرۈش"

# headless chromium on a machine with no network: no background connections, no sandbox (root)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def start_server(*args: str, wait_ready: bool = True) -> ServerProcess:
    """``trimix serve --port 0 --threads 1 ARGS``, listening (and with ``wait_ready``, loaded)."""
    try:
        return launch(["--threads", "1", *args], wait_ready=wait_ready)
    except ServerStartError as e:
        pytest.fail(f"{e}:\n{e.log}")


def post(server: ServerProcess, path: str, body: object, **kw) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url + path, content=data, headers=headers, timeout=300, **kw)


def health(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_idle(server: ServerProcess, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if h["in_flight"] == h["active"] == h["queued"] == 0 and h["kv_cells_free"] == h["kv_cells"]:
            return h
        if time.monotonic() > deadline:
            pytest.fail(f"the server still holds requests: {h}")
        time.sleep(0.05)
