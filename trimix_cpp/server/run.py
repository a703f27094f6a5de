"""Running the server: listen, load the models on the engine's thread, serve until Ctrl-C, free everything.

The socket is bound before anything loads, so a port in use is one clear error at once (and port 0
picks a free port, which the "listening" line reports). The models load on the engine's thread while
the server already answers: ``/health`` says 503 until they are ready, and a load that fails stops
the server and is raised to the caller. Ctrl-C (or SIGTERM) first ends every request in flight
(streams get a last error event, waiting requests a 503), then uvicorn closes the connections, then
the engine's thread frees the models, and :func:`serve` returns.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from ..engine import Engine, LoadOptions
from ..errors import TrimixError
from ..modelset import ModelSet
from .app import ServerConfig, TrimixServer
from .worker import EngineWorker

log = logging.getLogger("trimix.server")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


def setup_logging(verbose: bool = False) -> None:
    """The server's log: one line per event on stderr, with the time (``--verbose`` adds tracebacks)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def bind(listen: Listen) -> socket.socket:
    """A listening socket on ``host:port``, or one line saying why not."""
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TrimixError(f"cannot listen on {listen.host!r}: {e.strerror} (give --host an address or name)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise TrimixError(
            f"cannot listen on {listen.host}:{listen.port}: {e.strerror} (another server there? choose another --port)"
        ) from None
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn, told to end the requests in flight as soon as a stop signal arrives, and not to
    re-raise the signal afterwards (so the models are freed before the process ends)."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.worker.draining = True  # a plain flag: safe from a signal handler
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in original.items():
                signal.signal(s, handler)


def serve(
    setup: ModelSet,
    paths: Mapping[str, str | Path],
    options: LoadOptions,
    config: ServerConfig,
    listen: Listen,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve until stopped. Raises the load error if the models cannot be loaded."""
    sock = bind(listen)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    holder: dict[str, _Uvicorn] = {}
    t0 = time.perf_counter()

    def loaded(engine: Engine) -> None:
        app.on_loaded(engine)
        files = ", ".join(f"{r}={m.path.name}" for r, m in engine.models.items())
        log.info(
            "models loaded in %.1f s: %s | n_ctx %d, %d sequences in parallel, queue %d",
            time.perf_counter() - t0,
            files,
            engine.n_ctx,
            engine.scheduler.n_seq,
            config.queue,
        )

    def failed(e: BaseException) -> None:
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    worker = EngineWorker(lambda: Engine(paths, options), loaded, failed, config.keep_conversations)
    app = TrimixServer(setup, worker, config)
    ucfg = uvicorn.Config(
        app.app,
        http="h11",
        ws="none",
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    server = _Uvicorn(ucfg, worker)
    holder["server"] = server
    worker.start()
    if on_listening is not None:
        on_listening(url)
    log.info("listening on %s (%s); loading the models", url, "API key required" if config.api_key else "no API key")
    try:
        server.run(sockets=[sock])
    finally:
        worker.draining = True
        worker.stop()
        sock.close()
    if worker.load_error is not None:
        raise worker.load_error
    log.info("stopped; models freed")
