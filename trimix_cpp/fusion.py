"""Linear logit fusion: every method is a set of weights over named model roles.

TriMix (Eq. 5 of the paper) is ``a*L_large_ins + b*L_small_cpt + (1-a-b)*L_small_base``; its general
form (Eq. 1) adds a large base model; Proxy Tuning and Contrastive Decoding are special cases. All
of them are a weighted sum of logit rows, so one :class:`Fuser` serves them all, and a
:class:`FusionPlan` says which roles a method needs (only those models are loaded) and with what
weights.

The sum is taken over raw logits. Adding a constant to a model's row (which is what log-softmax does)
changes every fused logit by the same amount, so the fused distribution is the same either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import WeightError

LARGE_INS = "large_ins"
SMALL_CPT = "small_cpt"
SMALL_BASE = "small_base"
LARGE_BASE = "large_base"
ROLES = (LARGE_INS, SMALL_CPT, SMALL_BASE, LARGE_BASE)

METHODS = ("trimix", "trimix4", "proxy", "contrastive", "single")

# Contrastive Decoding's plausibility constraint (Li et al.): keep only tokens whose small-cpt
# probability is at least this fraction of small-cpt's most probable token.
PLAUSIBILITY_ALPHA = 0.1

# The largest weight accepted. The paper's weights lie in [0, 1] and accuracy collapses well before
# 10 (its Table 10); far larger weights only turn float32 logits into infinities.
MAX_WEIGHT = 1000.0


@dataclass(frozen=True)
class FusionPlan:
    """Weights per role, and the role whose distribution gates plausibility (contrastive only)."""

    method: str
    weights: dict[str, float]
    plausibility_role: str | None = None
    plausibility_alpha: float = PLAUSIBILITY_ALPHA
    params: dict[str, float] = field(default_factory=dict)

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles whose models must be loaded, in canonical order."""
        used = set(self.weights) | ({self.plausibility_role} if self.plausibility_role else set())
        return tuple(r for r in ROLES if r in used)


def _finite(name: str, value: float | None) -> float:
    if value is None:
        raise WeightError("{param} is required for this method (give a number, e.g. {param} 0.5)", param=name)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise WeightError("{param} must be a number, got {got!r}", param=name, got=value) from None
    if not math.isfinite(v):
        raise WeightError(
            "{param} must be a finite number, got {got!r} (use a value such as 0.5)", param=name, got=value
        )
    if abs(v) > MAX_WEIGHT:
        raise WeightError(
            "{param} {got!r} is beyond ±{top:g}: the fused logits would overflow "
            "(TriMix's weights lie in [0, 1]; use a value such as 0.5)",
            param=name,
            got=value,
            top=MAX_WEIGHT,
        )
    return v


def _tidy(x: float) -> float:
    """1 - 0.1 - 1.0 is -0.09999999999999998 in binary; report -0.1 (a difference of 1e-17)."""
    return round(x, 12)


def plan(
    method: str,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    role: str = LARGE_INS,
) -> FusionPlan:
    """Turn a method name and its hyper-parameters into role weights.

    ``trimix``: a*LI + b*SC + (1-a-b)*SB (Eq. 5). ``trimix4``: SB + a(LI-LB) + b(SC-SB) + g(LB-SB)
    (Eq. 1). ``proxy``: LI + b(SC-SB), b defaults to 1. ``contrastive``: SC + b(SC-SB), b defaults to
    0.5, with the plausibility constraint on SC. ``single``: one role alone.
    """
    if method == "trimix":
        a, b = _finite("alpha", alpha), _finite("beta", beta)
        w = {LARGE_INS: a, SMALL_CPT: b, SMALL_BASE: _tidy(1.0 - a - b)}
        return FusionPlan(method, w, params={"alpha": a, "beta": b})
    if method == "trimix4":
        a, b, g = _finite("alpha", alpha), _finite("beta", beta), _finite("gamma", gamma)
        w = {LARGE_INS: a, SMALL_CPT: b, SMALL_BASE: _tidy(1.0 - b - g), LARGE_BASE: _tidy(g - a)}
        return FusionPlan(method, w, params={"alpha": a, "beta": b, "gamma": g})
    if method == "proxy":
        b = _finite("beta", 1.0 if beta is None else beta)
        return FusionPlan(method, {LARGE_INS: 1.0, SMALL_CPT: b, SMALL_BASE: -b}, params={"beta": b})
    if method == "contrastive":
        b = _finite("beta", 0.5 if beta is None else beta)
        return FusionPlan(method, {SMALL_CPT: 1.0 + b, SMALL_BASE: -b}, plausibility_role=SMALL_CPT, params={"beta": b})
    if method == "single":
        if role not in ROLES:
            raise WeightError(
                "unknown role {got!r} (choose one of {choices})", param="role", got=role, choices=", ".join(ROLES)
            )
        return FusionPlan(method, {role: 1.0})
    raise WeightError(
        "unknown method {got!r} (choose one of {choices})", param="method", got=method, choices=", ".join(METHODS)
    )


class Fuser:
    """Weighted sum of logit rows into one preallocated float32 buffer.

    The hot path of generation: per step it does a handful of vectorised passes over the vocabulary
    and allocates nothing. Many fusers may share their scratch rows (``tmp``, ``mask``) and write
    into rows of one batch buffer (``out``), which is how a batch of sequences fuses without a
    vocabulary-sized allocation per sequence.
    """

    def __init__(
        self,
        fusion: FusionPlan,
        n_vocab: int,
        out: np.ndarray | None = None,
        tmp: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> None:
        self.plan = fusion
        self.n_vocab = n_vocab
        self.out = np.empty(n_vocab, dtype=np.float32) if out is None else out
        self._tmp = np.empty(n_vocab, dtype=np.float32) if tmp is None else tmp
        self._mask = np.empty(n_vocab, dtype=bool) if mask is None else mask
        self._order = [r for r in fusion.roles if fusion.weights.get(r, 0.0) != 0.0]
        self._log_alpha = np.float32(math.log(fusion.plausibility_alpha))

    def fuse(self, rows: Mapping[str, np.ndarray], constrained: bool = True) -> np.ndarray:
        """Fused logits of one position; ``rows[role]`` may be longer than the shared vocabulary.
        ``constrained=False`` skips the plausibility constraint (the fallback when it and the UTF-8
        guard together leave no token)."""
        n, out, tmp, w = self.n_vocab, self.out, self._tmp, self.plan.weights
        if not self._order:
            out.fill(0.0)
        first = True
        for role in self._order:
            weight = np.float32(w.get(role, 0.0))
            row = rows[role][:n]
            if first:
                np.multiply(row, weight, out=out)
                first = False
            else:
                np.multiply(row, weight, out=tmp)
                np.add(out, tmp, out=out)
        if constrained and self.plan.plausibility_role is not None:
            gate = rows[self.plan.plausibility_role][:n]
            # p_i >= alpha * p_max  <=>  logit_i >= logit_max + log(alpha)
            np.less(gate, gate.max() + self._log_alpha, out=self._mask)
            np.putmask(out, self._mask, -np.inf)
        return out
