"""Conversations kept in the KV cache between turns, as llama.cpp's server keeps its slots' prompts.

A chat's next request repeats the whole conversation so far: the earlier turns and the reply the
server itself wrote. Evaluating all of it again makes every turn slower than the last. The engine's
:class:`~trimix_cpp.generation.Session` keeps one conversation's tokens in every model's cells and
evaluates only what a new prompt adds (perplexity selection still covers the whole prompt). The
server does not know which conversation a request continues (OpenAI's API sends no id), so, like
llama-server, it matches prompts by their tokens: a request goes to the idle session whose cached
tokens share the longest prefix with its prompt, when that prefix is most of what the session holds;
otherwise to a new session while sequences are free, else to the least recently used idle one (whose
cells past the common prefix are dropped).

Idle sessions hold sequences and cells that other requests may need, so they are lent, not owned:
before every step, while the scheduler's next request cannot start for want of a sequence or cells,
the least recently used idle session is closed. Everything here runs on the engine's thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..generation import Session

if TYPE_CHECKING:
    from ..engine import Engine

# A session is reused for a prompt that repeats at least this share of its cached tokens.
REUSE_SHARE = 0.5


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


class ConversationCache:
    """The sessions of one engine, least recently used first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions: list[Session] = []

    def pick(self, tokens: np.ndarray) -> Session | None:
        """The session to run ``tokens`` in, or None (every session busy and no sequence free)."""
        sched = self.engine.scheduler
        self.sessions = [s for s in self.sessions if not s.closed]
        idle = [s for s in self.sessions if not s.busy]
        best, shared = None, 0
        for s in idle:
            n = common_prefix(s.tokens, tokens)
            if n > shared:
                best, shared = s, n
        chosen: Session | None = None
        if best is not None and shared >= REUSE_SHARE * len(best.tokens):
            chosen = best
        elif sched.free_ids:
            chosen = self.engine.session()
            self.sessions.append(chosen)
        elif idle:
            chosen = idle[0]  # the least recently used: its cells past the common prefix go
        if chosen is not None:
            self.sessions.remove(chosen)
            self.sessions.append(chosen)
        return chosen

    def make_room(self) -> None:
        """Close idle sessions, oldest first, while the next queued request cannot start without
        their sequence or cells (the scheduler would otherwise wait for them forever)."""
        sched = self.engine.scheduler
        while sched.queue:
            head = sched.queue[0]
            own = head.session
            ids = len(head.gens) - (own is not None)
            cells = head.cells - (own.cells if own is not None else 0)
            if ids <= len(sched.free_ids) and cells <= sched.cells_free:
                return
            idle = [s for s in self.sessions if not s.busy and not s.closed and s is not own]
            if not idle:
                return
            idle[0].close()
            self.sessions.remove(idle[0])

    @property
    def cached_cells(self) -> int:
        """Cells idle sessions hold (given back on demand)."""
        return sum(s.cells for s in self.sessions if not s.closed and not s.busy)

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.sessions = []
