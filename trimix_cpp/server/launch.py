"""``trimix serve`` in a child process, started and waited for: what tests, benchmarks and scripts that
drive a real server over HTTP share.

The server listens on a free port (``--port 0``) and says where in its log line ``listening on URL``
(see :mod:`.lifecycle`); the models load after that, so the server is ready once ``/health`` answers 200.
The child's log (stderr) is read on a thread for as long as it runs, so it can never block on a full
pipe, and every line is kept for a failing caller to show.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import TrimixError

TRIMIX = (sys.executable, "-m", "trimix_cli.main")  # the command line, run by this Python
_LISTENING = re.compile(r"listening on (http://\S+)")
# the server is local: never through a proxy the environment may name
_open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


class ServerStartError(TrimixError):
    """``trimix serve`` exited, or did not say where it listens or become ready in time; ``log`` holds
    what it wrote."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class ServerProcess:
    """A running ``trimix serve``: its process, its base URL and its log lines so far."""

    proc: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)

    def log(self) -> str:
        return "\n".join(self.lines)

    def ready(self) -> bool:
        """Whether ``/health`` answers 200 (the models are loaded)."""
        try:
            with _open(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:  # refused, timed out, or an HTTP error status (503 while loading)
            return False

    def stop(self, timeout: float = 60) -> int:
        """Ctrl-C (the server finishes its requests' streams, frees the models and exits); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)


def start_server(
    args: Sequence[str],
    *,
    wait_ready: bool = True,
    command: Sequence[str] = TRIMIX,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 120,
    ready_timeout: float = 300,
) -> ServerProcess:
    """Run ``COMMAND serve --port 0 ARGS`` and wait until it listens and, with ``wait_ready``, until
    its models are loaded. ``env`` replaces the environment (default: this process's). Raises
    :class:`ServerStartError` (the server stopped) when it exits or a timeout passes first."""
    cmd = [*command, "serve", "--port", "0", *args]
    child_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env)
    server = ServerProcess(proc)
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            server.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and not server.url:
                server.url = m.group(1)
                found.set()
        found.set()  # the log ended: the process is gone

    threading.Thread(target=read, name="trimix-serve-log", daemon=True).start()
    found.wait(start_timeout)
    if not server.url:
        server.stop(10)
        raise ServerStartError("trimix serve did not start", server.log())
    deadline = time.monotonic() + ready_timeout
    while wait_ready and not server.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop(10)
            raise ServerStartError("trimix serve never became ready", server.log())
        time.sleep(0.2)
    return server


__all__ = ["TRIMIX", "ServerProcess", "ServerStartError", "start_server"]
