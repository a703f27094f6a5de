"""Writing an output file safely: beside the target, checked for room, renamed only when complete.

Every writer of a GGUF here goes through :func:`partial_beside` and :func:`publish`, so an
interrupted or failed run (Ctrl-C, a full disk, a damaged checkpoint found half-way) leaves neither
a half-written model under the name the user asked for nor a stray scratch file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import TrimixError

__all__ = ["OutputError", "check_output", "check_room", "gib", "partial_beside", "publish"]


class OutputError(TrimixError):
    """The output path cannot be written: it exists, its folder is missing, or the disk is too full."""


def gib(n: float) -> str:
    """A byte count for people: MiB below a GiB, GiB above."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_output(out_path: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an output that exists (unless ``force``), is a folder, is one of the inputs, or whose
    folder does not exist; return it as a :class:`Path`."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise OutputError(
            f"{out_path} is a folder; give the output file's name (for example {out_path / 'model.gguf'})"
        )
    if not out_path.parent.is_dir():
        raise OutputError(f"the output folder {out_path.parent} does not exist (create it first)")
    for src in inputs:
        if out_path.exists() and src.exists() and os.path.samefile(out_path, src):
            raise OutputError(f"the output {out_path} is the input file; write to another name")
    if out_path.exists() and not force:
        raise OutputError("{path} exists (pass {force} to replace it)", param="force", path=out_path)
    return out_path


def partial_beside(out_path: Path, tag: str = "") -> Path:
    """A hidden scratch name in the output's folder (same file system, so the final rename is atomic)."""
    return out_path.with_name(f".{out_path.name}{tag}.{os.getpid()}.partial")


def check_room(folder: Path, needed: int, what: str) -> None:
    """Fail before writing when the file system holding ``folder`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"not enough disk space in {folder}: {what} needs {gib(needed)} and {gib(free)} is free "
            "(free some space or write the output elsewhere)"
        )


def publish(partial: Path, out_path: Path) -> Path:
    """Move a complete file to its final name in one step."""
    os.replace(partial, out_path)
    return out_path
