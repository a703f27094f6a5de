"""Putting several finished files into the models folder as one step, or not at all.

Pull and install both build everything in a scratch folder inside the models folder (same file
system, so a move is a rename), and only then move the files into place. The moves run with Ctrl-C
held back (a rename takes microseconds; an interruption between two of them would leave a profile
half-installed), and if one fails the ones already made are undone and any file they replaced is
put back.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import TrimixError


@contextmanager
def sigint_held() -> Iterator[list[int]]:
    """Ctrl-C waits until the block ends; the list says whether one came. Outside the main thread
    (where Python delivers signals) there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


def scratch_dir(models_dir: Path, prefix: str) -> Path:
    """A fresh hidden folder inside ``models_dir`` for files on their way in."""
    import tempfile

    models_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=models_dir))


def commit_moves(moves: list[tuple[Path, Path]], backup_dir: Path) -> None:
    """Rename each ``(src, dst)``; a ``dst`` that exists is first moved into ``backup_dir``. All or
    nothing: on any failure every move made so far is undone, then the error is raised."""
    backup_dir.mkdir(parents=True, exist_ok=True)
    done: list[tuple[Path, Path, Path | None]] = []
    try:
        for i, (src, dst) in enumerate(moves):
            backup = None
            if dst.exists() or dst.is_symlink():
                backup = backup_dir / f"{i}-{dst.name}"
                os.replace(dst, backup)
            try:
                os.replace(src, dst)
            except BaseException:
                if backup is not None:
                    os.replace(backup, dst)
                raise
            done.append((src, dst, backup))
    except OSError as e:
        for src, dst, backup in reversed(done):
            os.replace(dst, src)
            if backup is not None:
                os.replace(backup, dst)
        raise TrimixError(
            f"could not move files into {moves[0][1].parent}: {e.strerror or e}; nothing changed"
        ) from None


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds ``path`` (or would: the nearest folder that exists)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
