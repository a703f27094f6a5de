"""Perplexity of a text of any length under several fusion methods at once.

Held-out perplexity is how one checks that continued pretraining helped and that a fusion helps
more. Every method is a weighting of the same per-model logits, so each model evaluates the text
once and every method is scored from those logits. Long texts go through in windows of the context
size that overlap by half: every token after the first window is predicted with at least half a
window of context, and each token is scored exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .finite import perplexity
from .fusion import Fuser, FusionPlan
from .selection import GridScores


@dataclass
class MethodScore:
    nll_sum: float = 0.0
    n_tokens: int = 0
    n_masked: int = 0  # targets a plausibility constraint ruled out (infinite NLL)

    @property
    def nll(self) -> float:
        if self.n_masked:
            return math.inf
        return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def ppl(self) -> float:
        nll = self.nll
        return perplexity(nll) if math.isfinite(nll) else math.inf


def score_rows(scores: Mapping[str, MethodScore], grid: GridScores | None = None) -> list[dict[str, object]]:
    """One row per method (``method``, ``nll``, ``ppl``, ``tokens``, ``masked``); with a grid's
    scores, a last row for its best pair, chosen on this text (``trimix-ppl@A:B``, with ``alpha``
    and ``beta``): the perplexity PPL selection would reach on it."""
    rows: list[dict[str, object]] = [
        {"method": name, "nll": s.nll, "ppl": s.ppl, "tokens": s.n_tokens, "masked": s.n_masked}
        for name, s in scores.items()
    ]
    if grid is not None:
        a, b, nll = grid.best()
        rows.append(
            {
                "method": f"trimix-ppl@{a:g}:{b:g}",
                "nll": nll,
                "ppl": perplexity(nll),
                "tokens": grid.n_rows,
                "masked": 0,
                "alpha": a,
                "beta": b,
            }
        )
    return rows


@dataclass
class PerplexityScorer:
    """Folds rows of per-model logits into every method's NLL sum, one row at a time."""

    plans: Mapping[str, FusionPlan]
    n_vocab: int
    scores: dict[str, MethodScore] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._fusers = {name: Fuser(p, self.n_vocab) for name, p in self.plans.items()}
        self._buf = np.empty(self.n_vocab, dtype=np.float32)
        self.scores = {name: MethodScore() for name in self.plans}

    def add(self, rows: Mapping[str, np.ndarray], targets: np.ndarray) -> None:
        for i, tgt in enumerate(targets.tolist()):
            row = {r: x[i] for r, x in rows.items()}
            for name, fuser in self._fusers.items():
                fused = fuser.fuse(row)
                s = self.scores[name]
                if not np.isfinite(fused[tgt]):
                    s.n_masked += 1
                    s.n_tokens += 1
                    continue
                m = float(fused.max())
                np.subtract(fused, np.float32(m), out=self._buf)
                np.exp(self._buf, out=self._buf)
                lse = m + math.log(float(self._buf.sum(dtype=np.float64)))
                s.nll_sum += lse - float(fused[tgt])
                s.n_tokens += 1


def windows(n_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """(start, end, first_new) of each window over ``n_tokens`` tokens.

    Windows of ``window`` tokens advance by half a window; ``first_new`` is the first token index
    whose prediction no earlier window scored, so every token is scored exactly once.
    """
    if n_tokens <= window:
        return [(0, n_tokens, 0)]
    stride = max(1, window // 2)
    out, start, first_new = [], 0, 0
    while True:
        end = min(n_tokens, start + window)
        out.append((start, end, first_new))
        first_new = end
        if end == n_tokens:
            return out
        start += stride
