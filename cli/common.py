"""Pieces every command shares: the stderr console, one-line errors, common options."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

import trimix_cpp as tm
from trimix_cpp.errors import flag

err = Console(stderr=True, highlight=False)

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's log and tracebacks.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def errors(verbose: bool) -> Iterator[None]:
    """Turn any failure into one line on stderr and a non-zero exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except tm.TrimixError as e:
        if verbose:
            traceback.print_exc()
        fail(message(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # a bug, not a user error: still one line unless --verbose
        if verbose:
            traceback.print_exc()
        fail(f"{type(e).__name__}: {e} (rerun with --verbose for the traceback)")


def message(e: tm.TrimixError) -> str:
    """A library error as the command line says it: parameters named by their flags."""
    return e.render(flag)
