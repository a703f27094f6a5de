"""The ``trimix`` command line run in a subprocess, as a user runs it: the tests' shared helpers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

TRIO = ("large_ins", "small_cpt", "small_base")


def trimix(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trimix_cli.main", *args], input=stdin, capture_output=True, timeout=300
    )


def run_eval(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trimix_cli.main", "eval", *args], capture_output=True, timeout=600, **kw
    )


def models(trio: Mapping[str, Path]) -> list[str]:
    """The ``--large-ins=PATH --small-cpt=PATH --small-base=PATH`` options for a trio of model files."""
    return [f"--{r.replace('_', '-')}={trio[r]}" for r in TRIO]
