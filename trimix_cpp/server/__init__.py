"""``trimix serve``: fused generation behind an OpenAI-compatible HTTP API, with a chat page.

One thread owns the engine (:mod:`.worker`) and hands each request's handler typed events; the ASGI
app (:mod:`.app`) validates requests (:mod:`.schema`), formats chats through a sandboxed template
(:mod:`.chat`), streams the engine's text as OpenAI chunks (:mod:`.responses`) and serves the page in
``static/``; :mod:`.guard` keeps other web sites out (Host allow-list, JSON-only bodies);
:mod:`.accesslog` writes one line per request; :mod:`.lifecycle` binds, loads and stops.
Needs the ``[serve]`` extra (starlette, uvicorn, pydantic, jinja2).
"""

from .app import ServerConfig, TrimixServer
from .lifecycle import Listen, setup_logging
from .lifecycle import serve as run_server
from .worker import EngineWorker, Job

__all__ = ["EngineWorker", "Job", "Listen", "ServerConfig", "TrimixServer", "run_server", "setup_logging"]
