"""Choosing the next token from fused logits.

``make_sampler`` builds one small callable from the usual knobs (temperature, top-k, top-p, min-p,
seed). Greedy decoding is a plain argmax. Sampling works in preallocated buffers the size of the
vocabulary: the probabilities, a scratch copy for the in-place partition that finds the top-k
threshold, and a float64 cumulative sum that an inverse-CDF draw searches. Only top-p sorts, and it
sorts just the tokens that survived the other filters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import TrimixError

Sampler = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise TrimixError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise TrimixError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise TrimixError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise TrimixError(f"--min-p must be in [0, 1), got {self.min_p}")


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


class _Sampler:
    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.p = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self.probs = np.empty(n_vocab, dtype=np.float32)
        self.scratch = np.empty(n_vocab, dtype=np.float32)
        self.mask = np.empty(n_vocab, dtype=bool)
        self.cdf = np.empty(n_vocab, dtype=np.float64)

    def __call__(self, logits: np.ndarray) -> int:
        p, probs, mask = self.p, self.probs, self.mask
        # Unnormalised probabilities with the maximum at 1, so min-p is a plain threshold.
        np.subtract(logits, logits.max(), out=probs)
        np.multiply(probs, np.float32(1.0 / p.temperature), out=probs)
        np.exp(probs, out=probs)
        if p.top_k and p.top_k < len(probs):
            self.scratch[:] = probs
            k_index = len(probs) - p.top_k
            self.scratch.partition(k_index)
            np.less(probs, self.scratch[k_index], out=mask)
            np.putmask(probs, mask, 0.0)
        if p.min_p > 0.0:
            np.less(probs, np.float32(p.min_p), out=mask)
            np.putmask(probs, mask, 0.0)
        if p.top_p < 1.0:
            keep = np.flatnonzero(probs)
            ordered = keep[np.argsort(-probs[keep], kind="stable")]
            cum = np.cumsum(probs[ordered], dtype=np.float64)
            cut = int(np.searchsorted(cum, p.top_p * cum[-1])) + 1
            probs[ordered[cut:]] = 0.0
        np.cumsum(probs, dtype=np.float64, out=self.cdf)
        u = self.rng.random() * self.cdf[-1]
        return int(min(np.searchsorted(self.cdf, u, side="right"), len(probs) - 1))


def make_sampler(params: SamplingParams, n_vocab: int) -> Sampler:
    """A callable that maps fused logits (masked tokens at -inf) to the next token id."""
    params.validate()
    if params.temperature == 0.0:
        return greedy
    return _Sampler(params, n_vocab)
