"""Running the server: listen, load the models on the engine's thread, serve until Ctrl-C, free everything.

The socket is bound before anything loads, so a port in use is one clear error at once (and port 0
picks a free port, which the "listening" line reports). The models load on the engine's thread while
the server already answers: ``/health`` says 503 until they are ready, and a load that fails stops
the server and is raised to the caller. Ctrl-C (or SIGTERM) first ends every request in flight
(streams get a last error event, waiting requests a 503), then uvicorn closes the connections, then
the engine's thread frees the models, and :func:`serve` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from uvicorn.protocols.http.h11_impl import H11Protocol

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
    allowed_hosts: tuple[str, ...] = ()  # more names clients may put in Host (--allowed-host; see guard.py)


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
        raise TrimixError(
            "cannot listen on {given!r}: {why} (give {host} an address or name)",
            param="host",
            given=listen.host,
            why=e.strerror,
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise TrimixError(
            "cannot listen on {given_host}:{given_port}: {why} (another server there? choose another {port})",
            param="port",
            given_host=listen.host,
            given_port=listen.port,
            why=e.strerror,
        ) from None
    return sock


# Seconds a connection may take to send a whole request head (request line and headers), from when it
# opens or its previous response ends; uvicorn itself only times out connections idle after a response.
HEADER_TIMEOUT_S = 10.0
# Seconds a connection may stay idle after a response before it is closed (uvicorn's keep-alive).
KEEP_ALIVE_S = 5


class _H11WithHeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for each request head: a client that opens a
    connection and sends nothing, or drips its headers a byte at a time, is cut off after
    :data:`HEADER_TIMEOUT_S` instead of holding a socket for ever."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request head in %g s", HEADER_TIMEOUT_S)
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a whole request head arrived
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


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
    modelset: ModelSet,
    paths: Mapping[str, str | Path],
    options: LoadOptions,
    config: ServerConfig,
    listen: Listen,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve until stopped. Raises the load error if the models cannot be loaded."""
    sock = bind(listen)
    # the Host names answered: the loopback ones (guard.py), the one listened on, and the user's
    config = dataclasses.replace(config, allowed_hosts=(*config.allowed_hosts, listen.host, *listen.allowed_hosts))
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
    app = TrimixServer(modelset, worker, config)
    ucfg = uvicorn.Config(
        app.app,
        http=_H11WithHeaderTimeout,
        ws="none",
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=64 * 1024,  # the largest request head (h11's default is 16 KiB)
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
    if worker.failure is not None:  # the server stopped because the engine did: not a clean exit
        raise TrimixError(f"the server stopped: its engine failed ({type(worker.failure).__name__}: {worker.failure})")
    log.info("stopped; models freed")
