"""Fused generation's public side: what to generate after a prompt, and what comes out.

A :class:`SeqSpec` says how one sequence continues a prompt (weights or a selector, sampling,
limits, stop strings, drafting, log-probabilities). A :class:`Generation` is one sequence's view of
its output: iterate it to stream its text. Iterating drives the engine's scheduler
(:mod:`trimix_cpp.scheduler`), so generations started side by side on one engine all advance, each
buffering its own text until read. A :class:`Session` keeps a conversation's tokens in the cache
between requests.

The loop itself is in :mod:`trimix_cpp.scheduler` (admit, decode, pick, draft, regroup), and what
one sequence does with its logits (fuse, guard, sample, stream, stop) in :mod:`trimix_cpp.sequence`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import TrimixError
from .fusion import FusionPlan
from .sampling import SamplingParams
from .selection import SELECTION_ROLES, GridRows, Selection, Selector
from .speculative import MAX_DRAFT

if TYPE_CHECKING:
    from .scheduler import Scheduler


class NonFiniteLogitsError(TrimixError):
    """The fused logits of a step hold NaN or infinity."""


@dataclass(frozen=True)
class SeqSpec:
    """One sequence to generate after a prompt: its weights (fixed, or a selector that picks them on
    the prompt) and its decoding settings."""

    fusion: FusionPlan | Selector
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    utf8_guard: bool = True
    draft: int = 0  # tokens the small models draft per round for the large ones to check (0: off)
    logprobs: int | None = None  # log-probabilities of each picked token and of this many alternatives (None: off)

    @property
    def roles(self) -> tuple[str, ...]:
        return SELECTION_ROLES if isinstance(self.fusion, Selector) else self.fusion.roles


def check_max_tokens(max_tokens: object) -> None:
    """A whole number of tokens: a float such as NaN would compare false against every count and
    run generation to the end of the context."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise TrimixError("{max_tokens} must be a whole number >= 0, got {got!r}", param="max_tokens", got=max_tokens)


MAX_TOP_LOGPROBS = 20


def check_logprobs(logprobs: object) -> None:
    if logprobs is None:
        return
    whole = isinstance(logprobs, (int, np.integer)) and not isinstance(logprobs, bool)
    if not whole or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise TrimixError(
            "{top_logprobs} must be a whole number from 0 to {hi} (alternatives shown per token), got {got!r}",
            param="top_logprobs",
            hi=MAX_TOP_LOGPROBS,
            got=logprobs,
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A picked token's log-probability under the fused distribution, and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def check_draft(draft: object) -> None:
    if isinstance(draft, bool) or not isinstance(draft, (int, np.integer)) or not 0 <= draft <= MAX_DRAFT:
        raise TrimixError(
            "{draft} must be a whole number from 0 (off) to {hi}, got {got!r}", param="draft", hi=MAX_DRAFT, got=draft
        )


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    decode_s: float = 0.0  # time inside llama_decode during generation (the batch's, all models)
    queued_s: float = 0.0  # time waiting for a free sequence before the prompt was evaluated
    cached_tokens: int = 0  # prompt tokens a conversation's cache already held (not evaluated again)
    draft_tokens: int = 0  # tokens the small models drafted (speculative decoding)
    accepted_tokens: int = 0  # drafted tokens the fused distribution accepted

    @property
    def rejected_tokens(self) -> int:
        return self.draft_tokens - self.accepted_tokens

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def gen_tokens_per_s(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_s": round(self.prompt_s, 6),
            "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 3),
            "gen_tokens": self.gen_tokens,
            "gen_s": round(self.gen_s, 6),
            "gen_tokens_per_s": round(self.gen_tokens_per_s, 3),
            "decode_s": round(self.decode_s, 6),
            "queued_s": round(self.queued_s, 6),
            "cached_tokens": self.cached_tokens,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "rejected_tokens": self.rejected_tokens,
        }


class Generation:
    """One sequence's output. Iterate to stream text pieces; afterwards ``text``, ``token_ids``,
    ``finish_reason`` and ``timings`` describe the run, ``fusion`` is the plan actually used and
    ``selection`` the weight choice, when one was made. The streamed pieces always join to ``text``.
    """

    def __init__(self, scheduler: Scheduler, prompt_tokens: np.ndarray, spec: SeqSpec) -> None:
        self._scheduler = scheduler
        self.prompt_tokens = prompt_tokens
        self.spec = spec
        self.fusion: FusionPlan | Selector = spec.fusion
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.timings = Timings(prompt_tokens=len(prompt_tokens))
        self.selection: Selection | None = None
        self.logprobs: list[TokenLogprob] | None = [] if spec.logprobs is not None else None
        self.error: BaseException | None = None
        self._pieces: deque[str] = deque()
        self.cancelled = False
        self.submitted = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._pieces:
            if self.error is not None:
                raise self.error
            if self.finish_reason is not None:
                raise StopIteration
            self._scheduler.step()
        return self._pieces.popleft()

    def take(self) -> list[str]:
        """The text pieces ready now, without driving the engine (for a loop that steps the
        scheduler itself, such as a server's worker thread)."""
        out = list(self._pieces)
        self._pieces.clear()
        return out

    def emit(self, piece: str) -> None:
        """Add a piece of text to the output and to what the reader has not taken yet (the
        scheduler's side of the stream)."""
        self.text += piece
        self._pieces.append(piece)

    def run(self) -> Generation:
        """Consume the whole generation; returns self for chaining."""
        for _ in self:
            pass
        return self

    def as_dict(self) -> dict[str, object]:
        """What ``trimix generate --json`` prints: text, tokens, weights, why it stopped, timings."""
        fusion = self.fusion
        out: dict[str, object] = {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "method": fusion.method if isinstance(fusion, FusionPlan) else "trimix",
            "weights": dict(fusion.weights) if isinstance(fusion, FusionPlan) else {},
            "finish_reason": self.finish_reason,
            "timings": self.timings.as_dict(),
        }
        if self.selection is not None:
            out["selection"] = self.selection.as_dict()
        if self.logprobs is not None:
            pieces = self._scheduler.engine.vocab.pieces
            out["logprobs"] = [
                {
                    **_token_entry(pieces, lp.token, lp.logprob),
                    "top_logprobs": [_token_entry(pieces, t, v) for t, v in lp.top],
                }
                for lp in self.logprobs
            ]
        return out

    def cancel(self) -> None:
        """Ask for this generation to stop at the next step (safe from any thread)."""
        self.cancelled = True

    def close(self) -> None:
        """Stop now and free the sequence (from the thread that drives the engine)."""
        self.cancelled = True
        self._scheduler.reap()

    def __del__(self) -> None:  # an abandoned generation frees its sequence at the next step
        self.cancelled = True


class Session:
    """A conversation kept in the KV cache of every model between its turns.

    A session owns one llama.cpp sequence id for its whole life. Each request made with it (one
    sequence, see :meth:`Scheduler.submit`) reuses the longest common prefix of its prompt and the
    tokens the cache holds (the previous prompt and the reply generated to it: a chat's next prompt
    repeats both), drops the cells after it, and evaluates only the rest. Perplexity selection still
    scores the whole prompt: the per-position NLL of the grid is kept beside the cells
    (:class:`~trimix_cpp.selection.GridRows`), including the rows of the generated tokens, folded as
    they are picked. Close it (or use it as a context manager) to give the cells and the id back.
    """

    def __init__(self, scheduler: Scheduler, seq_id: int) -> None:
        self._scheduler = scheduler
        self.id = seq_id
        self.tokens = np.zeros(0, dtype=np.int32)  # the history: last prompt and the tokens picked after it
        self.held: dict[str, int] = {}  # leading tokens of the history in each model's cells
        self.grid: GridRows | None = None  # per-position NLL of the last perplexity grid used
        self.cells = 0  # KV cells held between requests
        self.busy = False
        self.closed = False

    def close(self) -> None:
        self._scheduler.close_session(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _token_entry(pieces: Sequence[bytes], token: int, logprob: float) -> dict[str, object]:
    """One token as the OpenAI API shows it: its text, its bytes (a piece may be part of a character)."""
    raw = pieces[token]
    return {"id": token, "token": raw.decode("utf-8", "replace"), "bytes": list(raw), "logprob": logprob}
