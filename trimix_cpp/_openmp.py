"""How llama.cpp's OpenMP threads wait, chosen before the OpenMP runtime starts.

llama.cpp's CPU backend meets its threads at a barrier after every operation of a decode, hundreds
of times per token. GNU OpenMP's threads spin at a barrier before they sleep (300,000 turns by
default). On an idle machine spinning is what makes a decode fast. On a busy one it is ruinous: a
thread spins on a core while the sibling it waits for is descheduled behind another process, so
every barrier costs a scheduler time slice. On a 2-core machine with one CPU-bound process beside
it, a SmolLM2-135M decode with 2 threads took 2,300-3,000 ms instead of 10-18 ms.

A short spin keeps the idle speed (the waits between operations of a decode are microseconds) and
gives the core away soon when the wait is long. The runtime reads its settings once, when it is
loaded with llama.cpp's library, so this module runs before ``llama_cpp`` is imported. Whatever the
user set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is left alone.
"""

from __future__ import annotations

import os

# Turns a waiting thread spins before it sleeps (benchmarks/bench_busy.py measures the choice).
SPIN_COUNT = 10_000


def apply_defaults() -> None:
    """Set ``GOMP_SPINCOUNT`` unless the user chose how OpenMP threads wait."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


apply_defaults()
