"""``trimix serve``: the fused models behind an OpenAI-compatible HTTP API and a chat page.

Parsing and printing only; the server is :mod:`trimix_cpp.server`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

import trimix_cpp as tm
from trimix_cpp import _llama
from trimix_cpp.fusion import ROLES
from trimix_cpp.modelset import ModelSet

from .common import Verbose, err, errors
from .options import EngineArgs, group, grouped, model_set

SERVE_HELP = (
    "Serve the fused models: an OpenAI-compatible API and a chat page, offline.\n\n"
    "Routes: POST /v1/completions and /v1/chat/completions (stream true or false), GET /v1/models, GET /health, "
    "and the chat page at /. A request may choose its own method and weights in an extra object, "
    '"trimix": {"method", "alpha", "beta", "select"}; by default the profile\'s (PPL selection on the request\'s '
    "own prompt), or --method/--alpha/--beta/--select given here; --temperature likewise.\n\n"
    "--parallel requests decode together; up to --queue more wait; beyond that the server answers 503 with "
    "Retry-After. Ctrl-C ends the requests in flight, frees the models and exits."
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


KEY_ENV = "TRIMIX_API_KEY"


def _read_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key from --api-key, --api-key-file or $TRIMIX_API_KEY (the options win over the variable)."""
    if api_key is not None and api_key_file is not None:
        raise tm.TrimixError("give --api-key or --api-key-file, not both")
    if api_key is not None:
        err.print(
            "[yellow]warning:[/] --api-key is visible to every user of this machine (ps shows the command line): "
            f"prefer --api-key-file or the {KEY_ENV} environment variable",
            soft_wrap=True,
        )
    elif api_key_file is None and KEY_ENV in os.environ:
        api_key = os.environ[KEY_ENV]
        if not api_key.strip():
            raise tm.TrimixError(f"{KEY_ENV} is set but empty (unset it to serve without an API key)")
    if api_key_file is not None:
        if not api_key_file.is_file():
            raise tm.TrimixError(f"API key file not found: {api_key_file}")
        try:
            api_key = api_key_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise tm.TrimixError(f"API key file {api_key_file} is not UTF-8 text") from None
        if not api_key:
            raise tm.TrimixError(f"API key file {api_key_file} is empty (write the key on its first line)")
    if api_key is not None:
        api_key = api_key.strip()
        if not api_key or any(c.isspace() for c in api_key) or not api_key.isprintable():
            raise tm.TrimixError("the API key must be printable text without spaces (clients send it in a header)")
    return api_key


def _allowed_hosts(names: list[str]) -> tuple[str, ...]:
    """--allowed-host values: host names (a port, if given, is ignored), checked to be names."""
    out = []
    for name in names:
        n = name.strip()
        if not n or any(c.isspace() or c in "/@?#" for c in n) or not n.isprintable():
            raise tm.TrimixError(f"--allowed-host {name!r} is not a host name (give a name such as mybox.lan)")
        out.append(n)
    return tuple(out)


LargeBase = Annotated[
    Path | None, typer.Option("--large-base", help="GGUF of the large base model (loaded for trimix4 requests).")
]
NCtx = Annotated[
    int | None, typer.Option("--n-ctx", help="Context length of each request (prompt + reply); default 4096.")
]
# The request defaults serve sets (ServeDefaults's fields, see trimix_cpp.server.defaults), worded for a server.
DEFAULTS = {
    "method": Annotated[
        str | None,
        typer.Option("--method", "-m", help="Default method of requests that name none (default: the profile's)."),
    ],
    "alpha": Annotated[float | None, typer.Option(help="Default alpha (fixed weights for the default method).")],
    "beta": Annotated[float | None, typer.Option(help="Default beta (fixed weights for the default method).")],
    "gamma": Annotated[float | None, typer.Option(help="Default gamma (--method trimix4).")],
    "select": Annotated[
        str | None, typer.Option("--select", help="Default weight selection: ppl, ent or fixed (default: profile's).")
    ],
    "temperature": Annotated[
        float | None, typer.Option("--temperature", help="Default temperature (0: greedy; default: profile's, or 0).")
    ],
    "page": Annotated[
        str | None,
        typer.Option(help="The chat page starts in 'chat' or 'complete' (text continuation) mode; default: profile's."),
    ],
}


@grouped
def serve(
    modelset: ModelSet = group(model_set, "lang", *ROLES, own={"large_base": LargeBase}),
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every network; then set an API key).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            help="Require 'Authorization: Bearer KEY' on /v1/ routes (visible in ps: prefer --api-key-file or "
            "$TRIMIX_API_KEY).",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option("--api-key-file", help="Read the API key from this file (first line).")
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Another name clients may reach this server by (the Host header), besides localhost, "
            "IP addresses and --host; repeatable.",
        ),
    ] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-np", help="Requests decoded together.")] = 4,
    queue: Annotated[int, typer.Option(help="Requests that may wait for a free sequence; beyond: 503.")] = 16,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Tokens per reply when a request gives no max_tokens.")
    ] = 256,
    max_body: Annotated[int, typer.Option(help="Largest request body, in bytes.")] = 1 << 20,
    name: Annotated[
        str | None, typer.Option(help="Model name /v1/models lists (default: trimix-LANG, or trimix).")
    ] = None,
    n_ctx: NCtx = None,
    request_defaults: dict[str, Any] = group(dict, *DEFAULTS, own=DEFAULTS),  # built once the server extra imports
    keep_conversations: Annotated[
        bool,
        typer.Option(
            "--keep-conversations/--no-keep-conversations",
            help="Keep each conversation in the KV cache so its next turn evaluates only the new tokens.",
        ),
    ] = True,
    loading: EngineArgs = group(EngineArgs, "threads", "n_gpu_layers"),
    verbose: Verbose = False,
) -> None:
    with errors(verbose):
        try:
            from trimix_cpp.server import Listen, ServerConfig, run_server, setup_logging
            from trimix_cpp.server.defaults import ServeDefaults, roles_to_load
        except ImportError as e:
            raise tm.TrimixError(
                f"trimix serve needs the server extra ({e.name} is missing): pip install 'trimix[serve]'"
            ) from None
        key = _read_key(api_key, api_key_file)
        hosts = _allowed_hosts(allowed_host or [])
        if not _is_loopback(host) and key is None:
            err.print(
                f"[yellow]warning:[/] listening on {escape(host)} without an API key: anyone who can reach this "
                "machine can use the models (set --api-key-file)",
                soft_wrap=True,
            )
        for label, value, low in (("--parallel", parallel, 1), ("--queue", queue, 0), ("--max-tokens", max_tokens, 1)):
            if value < low:
                raise tm.TrimixError(f"{label} must be a whole number >= {low}, got {value}")
        if max_body < 1024:
            raise tm.TrimixError(f"--max-body must be at least 1024 bytes, got {max_body}")
        if not 0 <= port <= 65535:
            raise tm.TrimixError(f"--port must be from 0 to 65535, got {port}")
        defaults = ServeDefaults(**request_defaults).resolved(modelset.profile)
        paths = modelset.paths(roles_to_load(modelset, defaults.method), "trimix serve")
        for p in paths.values():
            _llama.check_gguf_file(Path(p))
        label = name or (f"trimix-{modelset.profile.lang}" if modelset.profile is not None else "trimix")
        config = ServerConfig(
            model_name=label,
            api_key=key,
            queue=queue,
            max_tokens=max_tokens,
            max_body=max_body,
            defaults=defaults,
            keep_conversations=keep_conversations,
        )
        options = dataclasses.replace(loading, n_ctx=n_ctx).options(modelset, verbose, n_seq=parallel)
        setup_logging(verbose)
        run_server(modelset, paths, options, config, Listen(host, port, hosts))
