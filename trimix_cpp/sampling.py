"""Choosing the next token from fused logits.

``make_sampler`` builds one small callable from the usual knobs (temperature, top-k, top-p, min-p,
seed). Greedy decoding is a plain argmax. Sampling follows llama.cpp's sampler chain, in its order:
the repetition penalties (:class:`Penalties`, applied to the fused logits before greedy decoding
too), then top-k, then top-p, then min-p (all three judged on the distribution at temperature 1),
then the temperature, then the draw. The same settings therefore keep the same tokens as
llama.cpp's own samplers would.

Everything works in preallocated buffers the size of the vocabulary: the kept probabilities, a
scratch copy for the in-place partition that finds the top-k threshold, a mask, and a float64
cumulative sum that an inverse-CDF draw searches. Only top-p sorts, and it sorts just the tokens
that survived top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import TrimixError

Sampler = Callable[[np.ndarray], int]

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    repeat_penalty: float = 1.0  # llama.cpp's: divide a positive logit (multiply a negative one) by it
    repeat_last_n: int = 64  # tokens (prompt included) the penalties look back over; -1: the whole context
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the window
    presence_penalty: float = 0.0  # subtracted once for any occurrence in the window

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any repetition penalty changes the logits."""
        on = self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        return on and self.repeat_last_n != 0

    def validate(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise TrimixError(
                "{temperature} must be a finite number >= 0 (0 is greedy), got {got!r}", param="temperature", got=t
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise TrimixError(
                "{top_k} must be a whole number >= 0 (0 turns it off), got {got!r}", param="top_k", got=self.top_k
            )
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise TrimixError("{top_p} must be in (0, 1] (1 turns it off), got {got!r}", param="top_p", got=self.top_p)
        if not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p < 1.0):
            raise TrimixError("{min_p} must be in [0, 1) (0 turns it off), got {got!r}", param="min_p", got=self.min_p)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise TrimixError(
                "{seed} must be a whole number from 0 to 2**64-1, got {got!r}", param="seed", got=self.seed
            )
        r = self.repeat_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise TrimixError(
                "{repeat_penalty} must be a finite number > 0 (1 turns it off), got {got!r}",
                param="repeat_penalty",
                got=r,
            )
        n = self.repeat_last_n
        if isinstance(n, bool) or not isinstance(n, int) or n < -1:
            raise TrimixError(
                "{repeat_last_n} must be a whole number >= -1 (-1: the whole context), got {got!r}",
                param="repeat_last_n",
                got=n,
            )
        for name, v in (("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 100:
                raise TrimixError(
                    "{param} must be a number from -100 to 100 (0 turns it off), got {got!r}", param=name, got=v
                )


class Penalties:
    """llama.cpp's repetition penalties (its ``penalties`` sampler) on one sequence's fused logits.

    For every token among the last ``repeat_last_n`` tokens of the sequence (its prompt included, as
    llama.cpp's tools feed the prompt to the sampler), occurring ``c`` times there: a logit ``l``
    becomes ``l / repeat_penalty`` when positive and ``l * repeat_penalty`` otherwise, then
    ``c * frequency_penalty + presence_penalty`` is subtracted. Only the window's tokens are touched
    (numpy on their ids), never the whole vocabulary.
    """

    def __init__(self, params: SamplingParams, n_ctx: int, history: np.ndarray) -> None:
        n = params.repeat_last_n if params.repeat_last_n >= 0 else n_ctx
        self.size = max(0, n)
        self.ring = np.zeros(max(1, self.size), dtype=np.int64)
        self.filled = 0
        self.next = 0
        self.repeat = np.float32(params.repeat_penalty)
        self.freq = np.float32(params.frequency_penalty)
        self.present = np.float32(params.presence_penalty)
        tail = np.asarray(history[max(0, len(history) - self.size) :] if self.size else history[:0], dtype=np.int64)
        self.ring[: len(tail)] = tail
        self.filled = len(tail)
        self.next = len(tail) % max(1, self.size)

    def push(self, token: int) -> None:
        """A token joins the window (the oldest leaves when it is full)."""
        if not self.size:
            return
        self.ring[self.next] = token
        self.next = (self.next + 1) % self.size
        self.filled = min(self.filled + 1, self.size)

    def apply(self, logits: np.ndarray) -> None:
        """Penalise ``logits`` in place."""
        if not self.filled:
            return
        ids, counts = np.unique(self.ring[: self.filled], return_counts=True)
        ids = ids[ids < len(logits)]
        counts = counts[: len(ids)]
        v = logits[ids]
        v = np.where(v <= 0, v * self.repeat, v / self.repeat).astype(np.float32)
        v -= counts.astype(np.float32) * self.freq + self.present
        logits[ids] = v


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


class TokenSampler:
    """A seeded sampler over one vocabulary; :meth:`distribution` is the exact distribution that
    :meth:`__call__` draws from (speculative decoding and the tests need it as a vector)."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        params.validate()
        self.p = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self.probs = np.empty(n_vocab, dtype=np.float32)
        self.scratch = np.empty(n_vocab, dtype=np.float32)
        self.mask = np.empty(n_vocab, dtype=bool)
        self.cdf = np.empty(n_vocab, dtype=np.float64)
        # 1/T, kept finite and nonzero: a temperature so small that 1/T overflows float32 still
        # means "only the most likely tokens", which (l - max) * F32_MAX gives without a NaN; one so
        # large that 1/T underflows to 0 still means "every kept token alike", which the smallest
        # normal float32 gives, where 0 would turn the masked tokens' -inf into NaN (-inf * 0).
        t = params.temperature
        self._inv_t = np.float32(min(max(1.0 / t, _F32_TINY), _F32_MAX)) if t > 0 else None

    def keep_mask(self, logits: np.ndarray) -> np.ndarray:
        """``self.mask``: True for every token top-k, top-p and min-p drop (judged at T = 1)."""
        p, w, mask = self.p, self.probs, self.mask
        np.subtract(logits, logits.max(), out=w)
        np.exp(w, out=w)  # unnormalised probabilities at T = 1, the maximum at 1
        np.equal(logits, -np.inf, out=mask)  # masked tokens (not merely improbable ones: T may be high)
        if p.top_k and p.top_k < len(w):
            self.scratch[:] = w
            k_index = len(w) - p.top_k
            self.scratch.partition(k_index)
            mask |= w < self.scratch[k_index]
        if p.top_p < 1.0:
            keep = np.flatnonzero(~mask)
            ordered = keep[np.argsort(-w[keep], kind="stable")]
            cum = np.cumsum(w[ordered], dtype=np.float64)
            cut = int(np.searchsorted(cum, p.top_p * cum[-1])) + 1  # the first prefix holding top_p
            mask[ordered[cut:]] = True
        if p.min_p > 0.0:
            mask |= w < np.float32(p.min_p)
        return mask

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The normalised probabilities (float32, in ``self.probs``) the next draw uses."""
        mask = self.keep_mask(logits)
        w = self.probs
        np.subtract(logits, logits.max(), out=w)
        with np.errstate(over="ignore"):  # a tiny temperature sends all but the top tokens to -inf
            np.multiply(w, self._inv_t, out=w)
        np.exp(w, out=w)
        np.putmask(w, mask, 0.0)
        total = w.sum(dtype=np.float64)
        np.multiply(w, np.float32(1.0 / total), out=w)
        return w

    def draw(self, probs: np.ndarray) -> int:
        """One token from ``probs`` (normalised or not), with this sampler's random stream."""
        np.cumsum(probs, dtype=np.float64, out=self.cdf)
        u = self.rng.random() * self.cdf[-1]
        return int(min(np.searchsorted(self.cdf, u, side="right"), len(probs) - 1))

    def __call__(self, logits: np.ndarray) -> int:
        return self.draw(self.distribution(logits))


def make_sampler(params: SamplingParams, n_vocab: int) -> Sampler:
    """A callable that maps fused logits (masked tokens at -inf) to the next token id."""
    params.validate()
    if params.greedy:
        return greedy
    return TokenSampler(params, n_vocab)
