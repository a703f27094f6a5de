"""Label-free choice of TriMix's weights: the fused model's perplexity (or entropy) over a grid.

For a pair (a, b) the fused logit row is ``F = a*A + b*B + (1-a-b)*C`` with A = large-ins,
B = small-cpt and C = small-base, and the prompt's mean negative log-likelihood under F is
``mean_t [logsumexp(F_t) - F_t[x_{t+1}]]``. Done naively that is one logsumexp per pair over every
position and every vocabulary entry: 36 x 500 x 262,144 exponentials for a 500-token prompt with
Gemma's vocabulary. This module does it exactly with far less work:

* ``F = C + a*D1 + b*D2`` with ``D1 = A - C`` and ``D2 = B - C``, so
  ``exp(F - shift) = exp(C - mC) * exp(a*D1 - sa) * exp(b*D2 - sb)``: the exponential factorises
  into one factor per weight value. The sums over the vocabulary for all pairs are then one small
  matrix product ``Ua @ Ub.T`` of (n_alpha x V) by (V x n_beta) per position, and only
  ``1 + n_alpha + n_beta`` exponential passes are needed instead of ``n_alpha * n_beta``.
* When every grid value is a small integer multiple of one step (the paper's grid is multiples of
  0.1), the factors are powers of a single exponential: ``exp(0.3*D1) = exp(0.1*D1)**3``, so the
  alpha and beta factors cost one exponential each plus multiplications.
* Shifts are per-row upper bounds (``a*max(D1)`` for a >= 0, ``a*min(D1)`` for a < 0), so nothing
  overflows; a row whose sum underflows float32 is recomputed densely in float64.
* With numba installed (``pip install 'trimix[fast]'``) each row goes through one compiled pass
  per L1-sized vocabulary block (:mod:`trimix_cpp._gridkernel`): the three exponential factors, the
  power chains and every grid sum per element, with no BLAS call. Without it, numpy processes each
  row in vocabulary blocks of 16k entries, so the ~20 passes of a block stay in the core's own cache
  instead of streaming rows of 1 MB through memory, and the factor rows are padded to a multiple of
  8 (OpenBLAS's small-matrix product with 7 rows took three times as long as with 8 on AVX2).
  ``TRIMIX_SELECTION_KERNEL=numpy`` (or ``kernel="numpy"``) forces the numpy path.
* Rows are independent and can be split across threads (``threads``; numba, numpy and BLAS release
  the GIL). The reduction runs between llama.cpp's decodes, when the cores are free: the compiled
  kernel uses every core up to 4 by default (on 2 cores, 0.88 against 1.41 ms per position), the
  numpy path one (a second thread measured slower, since BLAS brings threads of its own).
* The prompt is evaluated in chunks whose logits are reduced into the running sums before the next
  chunk: memory is bounded by the chunk, never by prompt length x vocabulary.

The pairs (0, 0), (1, 0) and (0, 1) are the single models C, A and B, so the same sums also give
each single model's own perplexity of the prompt.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from types import ModuleType

import numpy as np

from .errors import TrimixError, WeightError
from .finite import json_number, perplexity
from .fusion import LARGE_INS, MAX_WEIGHT, SMALL_BASE, SMALL_CPT, FusionPlan, plan

DEFAULT_GRID = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
# What perplexity selection and scoring may hold at once in logits and scratch rows, in MiB
# (``--max-logits-mib``); a prompt longer than that goes through in chunks.
DEFAULT_MAX_LOGITS_MIB = 512.0
STRATEGIES = ("fixed", "ppl", "ent")
SELECTION_ROLES = (LARGE_INS, SMALL_CPT, SMALL_BASE)
_MAX_POWER = 64  # largest integer multiple of the common step still worth a multiplication chain
_TINY = 1e-30  # a float32 sum below this may have lost its significant terms to underflow
BLOCK = 16384  # vocabulary entries per block: a block's ~20 scratch rows fit in a core's L2
KERNELS = ("numba", "numpy")
KERNEL_BLOCK = 512  # the compiled kernel's block: its 16 factor rows of 2 KiB stay in a 32 KiB L1 cache
KERNEL_TILE = 3  # the compiled kernel sums 3 x 3 cells per sweep (9 accumulators, 6 operands: 15 ymm registers)
KERNEL_ENV = "TRIMIX_SELECTION_KERNEL"  # "numpy" forces the numpy path even where numba is installed


def parse_grid(values: Sequence[float] | str | None) -> tuple[float, ...]:
    """A grid of weights from a list or a comma-separated string; finite, distinct, sorted."""
    if values is None:
        return DEFAULT_GRID
    if isinstance(values, str):
        parts = [p for p in values.replace(" ", "").split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise WeightError(f"a grid is a comma-separated list of numbers, got {values!r}") from None
    grid = tuple(sorted(set(float(v) for v in values)))
    if not grid:
        raise WeightError("the weight grid is empty (give numbers such as 0.1,0.3,0.5)")
    if not all(math.isfinite(v) for v in grid):
        raise WeightError(f"grid weights must be finite numbers, got {values!r}")
    if any(abs(v) > MAX_WEIGHT for v in grid):
        raise WeightError(
            f"grid weights must lie within ±{MAX_WEIGHT:g}, got {values!r} (the paper's grid is 0.1,0.3,...,1)"
        )
    return grid


def _common_step(grid: Sequence[float]) -> tuple[float, list[int]] | None:
    """(step, multiples) when every value is a small non-negative integer multiple of one step."""
    if any(v < 0 for v in grid):
        return None
    for denom in (10, 20, 4, 5, 8, 100):
        step = 1.0 / denom
        ks = [round(v / step) for v in grid]
        if all(abs(k * step - v) < 1e-9 for k, v in zip(ks, grid)) and max(ks) <= _MAX_POWER:
            return step, ks
    return None


class _Factors:
    """Fills ``out[i] = pre * exp(w_i * D - shift_i)`` for every grid weight w_i, in place.

    With a common step, the weights sorted ascending form a chain: each row is the previous one
    times a small power of one exponential, so the prefactor is multiplied in once and the whole
    grid costs one exponential plus one multiplication per weight. Otherwise one exponential per
    weight.
    """

    def __init__(self, grid: Sequence[float]) -> None:
        self.grid = np.asarray(grid, dtype=np.float64)
        self.step = _common_step(grid)
        ks = self.step[1] if self.step else []
        self.gaps = sorted({b - a for a, b in pairwise(ks)} - {1})
        if 0.0 not in grid:
            raise ValueError("the factor grid must contain the weight 0 (its row holds the prefactor)")
        self.zero = list(grid).index(0.0)

    def n_powers(self) -> int:
        return len(self.gaps)

    def shifts(self, dmax: float, dmin: float) -> np.ndarray:
        """Per-weight upper bounds of ``w * D`` over a row (so no factor exceeds 1)."""
        if self.step is not None:
            step, ks = self.step
            return np.asarray(ks, dtype=np.float64) * step * dmax
        return np.where(self.grid >= 0, self.grid * dmax, self.grid * dmin)

    def fill(
        self, d: np.ndarray, out: np.ndarray, base: np.ndarray, tmp: np.ndarray, powers: np.ndarray, shifts: np.ndarray
    ) -> None:
        """Fill every row of ``out`` but the one of weight 0, which must already hold the prefactor.
        ``d`` is a block of one row of D, ``shifts`` come from :meth:`shifts` of the whole row."""
        i0 = self.zero
        if self.step is None:
            for i, w in enumerate(self.grid):
                if i == i0:
                    continue
                np.multiply(d, np.float32(w), out=tmp)
                np.subtract(tmp, np.float32(shifts[i]), out=tmp)
                np.exp(tmp, out=out[i])
                np.multiply(out[i], out[i0], out=out[i])
            return
        step, ks = self.step  # ks[0] == 0: the chain starts from the prefactor row
        # base = exp(step * (d - dmax)) <= 1 and out[i] = pre * base ** k_i: shift_i = k_i * step * dmax
        dmax = shifts[-1] / (ks[-1] * step) if ks[-1] else 0.0
        np.subtract(d, np.float32(dmax), out=tmp)
        np.multiply(tmp, np.float32(step), out=tmp)
        np.exp(tmp, out=base)
        pw = {1: base}
        for g, buf in zip(self.gaps, powers):
            np.multiply(pw[g - 1] if g - 1 in pw else base, base, out=buf)
            for _ in range(g - 2 if g - 1 not in pw else 0):
                np.multiply(buf, base, out=buf)
            pw[g] = buf
        for i in range(1, len(ks)):
            np.multiply(out[i - 1], pw[ks[i] - ks[i - 1]], out=out[i])


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


@dataclass
class _Scratch:
    """Per-thread buffers, each a few vocabulary rows: allocated once, reused for every row."""

    d1: np.ndarray
    d2: np.ndarray
    tmp: np.ndarray
    base: np.ndarray
    ua: np.ndarray
    ub: np.ndarray
    powers: np.ndarray

    @classmethod
    def make(cls, fa: _Factors, fb: _Factors, n_vocab: int) -> _Scratch:
        """Full rows for D1 and D2 (their maxima need the whole row); everything else one vocabulary
        block wide, so a block's passes stay in the core's own cache."""
        e = np.empty
        blk = min(n_vocab, BLOCK)
        return cls(
            e(n_vocab, np.float32),
            e(n_vocab, np.float32),
            e(blk, np.float32),
            e(blk, np.float32),
            # zero rows pad the factors to a multiple of 8: no pass writes them, their sums are unused
            np.zeros((_pad8(len(fa.grid)), blk), np.float32),
            np.zeros((_pad8(len(fb.grid)), blk), np.float32),
            e((max(fa.n_powers(), fb.n_powers(), 1), blk), np.float32),
        ).init(fb)

    def init(self, fb: _Factors) -> _Scratch:
        self.ub[fb.zero] = 1.0  # beta's prefactor is 1; no pass ever writes this row again
        return self


@dataclass
class GridScores:
    """Per-pair NLL of the rows seen so far; the selection's running state across prompt chunks."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    nll_sum: np.ndarray  # (n_alpha, n_beta) float64
    single_sum: dict[str, float] = field(default_factory=dict)
    n_rows: int = 0
    n_dense_fallback: int = 0

    @property
    def mean_nll(self) -> np.ndarray:
        if self.n_rows == 0:
            raise TrimixError("the prompt has a single token, so it has no perplexity (give a longer prompt)")
        return self.nll_sum / self.n_rows

    def single_mean_nll(self) -> dict[str, float]:
        return {r: s / max(self.n_rows, 1) for r, s in self.single_sum.items()}

    def best(self) -> tuple[float, float, float]:
        """The pair with the lowest mean NLL (ties as :func:`choose` breaks them), and that NLL."""
        mean = self.mean_nll
        a, b = choose(self.alphas, self.betas, mean)
        return a, b, float(mean[self.alphas.index(a), self.betas.index(b)])


TIE_NATS = 1e-6


def choose(alphas: Sequence[float], betas: Sequence[float], score: np.ndarray) -> tuple[float, float]:
    """The pair with the lowest score.

    Scores within ``TIE_NATS`` of the minimum are ties (float rounding must not decide), and ties go
    to the smallest alpha, then the smallest beta.
    """
    tied = np.flatnonzero(score.ravel() <= score.min() + TIE_NATS)
    i, j = np.unravel_index(int(tied[0]), score.shape)
    return float(alphas[i]), float(betas[j])


def _auto_threads() -> int:
    """The compiled kernel's default thread count: the cores this process may use, at most 4.

    The reduction runs while llama.cpp's threads wait for the next chunk, so the cores are free; on
    2 cores two threads took 0.88 against 1.41 ms per position. Past a few threads the three 1 MB
    logit rows each position streams from memory, not arithmetic, set the pace.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def compiled_kernel() -> ModuleType | None:
    """The compiled reduction (:mod:`trimix_cpp._gridkernel`), or None where numba is not installed."""
    try:
        from . import _gridkernel
    except ImportError:
        return None
    return _gridkernel


def resolve_kernel(kernel: str | None = None) -> str:
    """``kernel``, else ``$TRIMIX_SELECTION_KERNEL``, else numba when it is installed, else numpy.

    Only looks numba up: importing it takes a second (its registries load on first call), which
    :class:`_Compiled` spends in the background while llama.cpp decodes the first chunk.
    """
    name = kernel or os.environ.get(KERNEL_ENV, "").strip().lower() or None
    if name is not None and name not in KERNELS:
        raise TrimixError(f"unknown selection kernel {name!r} (choose {' or '.join(KERNELS)}; {KERNEL_ENV})")
    if name == "numpy":
        return name
    if importlib.util.find_spec("numba") is not None:
        return "numba"
    if name == "numba":
        raise TrimixError("the numba selection kernel needs numba (pip install 'trimix[fast]')")
    return "numpy"


class _Compiled:
    """The compiled kernel's view of a grid: weights, chains, which cells to sum, per-thread blocks.

    Only the cells selection reads are summed: the user's grid (one rectangle of the extended grid,
    padded to whole 3 x 3 tiles) and the three single models' cells outside it. The kernel module is
    imported, and its cached machine code loaded, on a background thread started here: a prompt's
    first chunk takes seconds to decode, and llama.cpp releases the GIL meanwhile.
    """

    def __init__(
        self, fa: _Factors, fb: _Factors, ia: Sequence[int], ib: Sequence[int], singles: Sequence[tuple[int, int]]
    ) -> None:
        self.wa, self.step_a, self.gaps_a = self._side(fa)
        self.wb, self.step_b, self.gaps_b = self._side(fb)
        self.za, self.zb = fa.zero, fb.zero
        r0, k0 = min(ia), min(ib)
        r1 = r0 + -(-(max(ia) - r0 + 1) // KERNEL_TILE) * KERNEL_TILE
        k1 = k0 + -(-(max(ib) - k0 + 1) // KERNEL_TILE) * KERNEL_TILE
        self.rect = np.array([r0, r1, k0, k1], dtype=np.int64)
        outside = [(i, k) for i, k in singles if not (r0 <= i < r1 and k0 <= k < k1)]
        self.cells = np.array(outside, dtype=np.int64).reshape(-1, 2)
        self.shape = (max(r1, len(fa.grid)), max(k1, len(fb.grid)))
        self._scratch: list[tuple[np.ndarray, ...]] = []
        self._module: ModuleType | None = None
        loader = ThreadPoolExecutor(1)
        self._loading = loader.submit(self._load)
        loader.shutdown(wait=False)

    @staticmethod
    def _side(f: _Factors) -> tuple[np.ndarray, float, np.ndarray]:
        """Weights, common step (0: none) and the steps between consecutive weights."""
        if f.step is None:
            return f.grid.astype(np.float64), 0.0, np.zeros(len(f.grid), np.int64)
        step, ks = f.step
        assert f.zero == 0 and ks[0] == 0  # the chain starts from the prefactor row
        gaps = np.array([0] + [b - a for a, b in pairwise(ks)], dtype=np.int64)
        return np.asarray(ks, np.float64) * step, step, gaps

    def _blocks(self, width: int) -> tuple[np.ndarray, ...]:
        u = np.zeros((self.shape[0], width), np.float32)  # rows past the grid stay zero
        w = np.zeros((self.shape[1], width), np.float32)
        w[self.zb] = 1.0  # beta's prefactor is 1; the kernel never writes this row
        return (u, w, *(np.empty(width, np.float32) for _ in range(3)))

    def _load(self) -> ModuleType:
        from . import _gridkernel

        z = np.zeros((1, 4), np.float32)  # one call with the argument types of the real ones
        self._call(_gridkernel, z, z, z, self._blocks(4))
        return _gridkernel

    def _call(
        self, module: ModuleType, a: np.ndarray, b: np.ndarray, c: np.ndarray, blocks: tuple[np.ndarray, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        sums = np.zeros((len(c), *self.shape))
        stats = np.empty((len(c), 6))
        module.grid_sums(
            a, b, c, 0, len(c), self.wa, self.wb, self.step_a, self.step_b, self.gaps_a, self.gaps_b,
            self.za, self.zb, self.rect, self.cells, *blocks, sums, stats,
        )  # fmt: skip
        return sums, stats

    def ready(self, threads: int) -> None:
        """Wait for the kernel (raises ImportError if numba cannot load) and allocate the per-thread
        blocks: 16 rows of ``KERNEL_BLOCK`` entries each."""
        if self._module is None:
            self._module = self._loading.result()
        while len(self._scratch) < threads:
            self._scratch.append(self._blocks(KERNEL_BLOCK))

    def sums(
        self, k: int, a_rows: np.ndarray, b_rows: np.ndarray, c_rows: np.ndarray, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows lo..hi: (sums over the vocabulary per cell, per-row statistics), see ``grid_sums``."""
        assert self._module is not None
        return self._call(self._module, a_rows[lo:hi], b_rows[lo:hi], c_rows[lo:hi], self._scratch[k])


class GridRows:
    """The NLL of every pair of a grid at each position of a token history, kept beside a cached
    prefix (see :class:`~trimix_cpp.generation.Session`).

    Row j holds the NLL of token j+1 given tokens 0..j, for every pair of the grid extended with
    the weights 0 and 1 (so the single models ride along). Perplexity selection is a mean over
    positions, so a later prompt that continues the history needs only its new positions' rows:
    the kept rows of the common prefix are summed in instead of evaluating it again. Rows are kept
    one by one rather than as a running sum so that a prompt that diverges from the history
    part-way can still reuse the rows before the divergence.
    """

    def __init__(self, alphas: Sequence[float], betas: Sequence[float]) -> None:
        self.alphas, self.betas = tuple(alphas), tuple(betas)
        ga = sorted(set(self.alphas) | {0.0, 1.0})
        gb = sorted(set(self.betas) | {0.0, 1.0})
        self.rows = np.zeros((0, len(ga), len(gb)))
        self.n = 0

    def matches(self, alphas: Sequence[float], betas: Sequence[float]) -> bool:
        return self.alphas == tuple(alphas) and self.betas == tuple(betas)

    def truncate(self, n: int) -> None:
        """Forget the rows from ``n`` on (their tokens left the history)."""
        self.n = max(0, min(self.n, n))

    def append(self, block: np.ndarray) -> None:
        """Add rows after the first ``n`` (growing the store by doubling: one copy per doubling)."""
        need = self.n + len(block)
        if need > len(self.rows):
            grown = np.zeros((max(need, 2 * len(self.rows), 64), *self.rows.shape[1:]))
            grown[: self.n] = self.rows[: self.n]
            self.rows = grown
        self.rows[self.n : need] = block
        self.n = need


class GridNLL:
    """Accumulates, over chunks of prompt positions, the fused NLL of every grid pair.

    ``add`` takes each model's logits at a run of consecutive positions and the token that follows
    each position; it never keeps a reference to them, so the caller may decode the next chunk into
    the same llama.cpp buffers as soon as ``add`` returns. ``kernel`` picks the compiled or the
    numpy reduction (see :func:`resolve_kernel`); both compute the same sums. With ``rows`` (a
    :class:`GridRows` of the same grid) the sums start from its kept rows and every row added is
    kept there too.
    """

    def __init__(
        self,
        alphas: Sequence[float],
        betas: Sequence[float],
        n_vocab: int,
        threads: int | None = None,
        kernel: str | None = None,
        rows: GridRows | None = None,
    ) -> None:
        self.alphas, self.betas = tuple(alphas), tuple(betas)
        # the singles ride along: alpha 0 and 1, beta 0 and 1 (then (0,0)=C, (1,0)=A, (0,1)=B)
        self._ga = tuple(sorted(set(self.alphas) | {0.0, 1.0}))
        self._gb = tuple(sorted(set(self.betas) | {0.0, 1.0}))
        self._ia = [self._ga.index(a) for a in self.alphas]
        self._ib = [self._gb.index(b) for b in self.betas]
        self._fa, self._fb = _Factors(self._ga), _Factors(self._gb)
        self._a64 = np.asarray(self._ga, dtype=np.float64)
        self._b64 = np.asarray(self._gb, dtype=np.float64)
        self.n_vocab = n_vocab
        self.kernel = resolve_kernel(kernel)
        self.threads = max(1, threads or (_auto_threads() if self.kernel == "numba" else 1))
        ga, gb = self._ga, self._gb
        # (0,0) = C, (1,0) = A, (0,1) = B
        self._singles = [(ga.index(0.0), gb.index(0.0)), (ga.index(1.0), gb.index(0.0)), (ga.index(0.0), gb.index(1.0))]
        self._needed = np.zeros((len(ga), len(gb)), dtype=bool)
        self._needed[np.ix_(self._ia, self._ib)] = True
        for cell in self._singles:
            self._needed[cell] = True
        self._threads_given = threads
        self._explicit = (kernel or os.environ.get(KERNEL_ENV, "")).strip().lower() == "numba"
        self._scratch: list[_Scratch] = []
        if self.kernel == "numba":
            self._compiled = _Compiled(self._fa, self._fb, self._ia, self._ib, self._singles)
        else:
            self._scratch = [_Scratch.make(self._fa, self._fb, n_vocab) for _ in range(self.threads)]
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.scores = GridScores(self.alphas, self.betas, np.zeros((len(self.alphas), len(self.betas))))
        self.scores.single_sum = {LARGE_INS: 0.0, SMALL_CPT: 0.0, SMALL_BASE: 0.0}
        self.kept = rows
        if rows is not None:
            if not rows.matches(self.alphas, self.betas):
                raise ValueError("the kept rows belong to another grid")
            if rows.n:
                self._fold(rows.rows[: rows.n].sum(axis=0), rows.n)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> GridNLL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, a_rows: np.ndarray, b_rows: np.ndarray, c_rows: np.ndarray, targets: np.ndarray) -> None:
        """Fold in positions whose logits are the rows of A (large-ins), B (small-cpt), C (small-base)
        and whose next tokens are ``targets``."""
        n = len(targets)
        if n == 0:
            return
        v = self.n_vocab
        a_rows, b_rows, c_rows = a_rows[:n, :v], b_rows[:n, :v], c_rows[:n, :v]
        if self.kernel == "numba":
            try:
                self._compiled.ready(self.threads)
            except ImportError:
                if self._explicit:
                    raise
                # numba is installed but does not load (say, built for another numpy): same sums in numpy
                self.kernel = "numpy"
                if not self._threads_given and self._pool is not None:  # the numpy path is fastest on one thread
                    self._pool.shutdown()
                    self._pool, self.threads = None, 1
                self._scratch = [_Scratch.make(self._fa, self._fb, v) for _ in range(self.threads)]
        reduce = self._rows_compiled if self.kernel == "numba" else self._rows
        if self._pool is None:
            parts = [reduce(0, a_rows, b_rows, c_rows, targets, 0, n)]
        else:
            bounds = np.linspace(0, n, self.threads + 1).astype(int)
            futures = [
                self._pool.submit(reduce, k, a_rows, b_rows, c_rows, targets, bounds[k], bounds[k + 1])
                for k in range(self.threads)
                if bounds[k + 1] > bounds[k]
            ]
            parts = [f.result() for f in futures]
        per_row = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        if self.kept is not None:
            self.kept.append(per_row)
        self._fold(per_row.sum(axis=0), n)
        self.scores.n_dense_fallback += sum(p[1] for p in parts)

    def _fold(self, full: np.ndarray, n: int) -> None:
        """Add the NLL sums ``full`` of ``n`` rows over the extended grid to the scores."""
        s = self.scores
        s.nll_sum += full[np.ix_(self._ia, self._ib)]
        for role, cell in zip((SMALL_BASE, LARGE_INS, SMALL_CPT), self._singles):
            s.single_sum[role] += float(full[cell])
        s.n_rows += n

    def _rows(
        self, k: int, a_rows: np.ndarray, b_rows: np.ndarray, c_rows: np.ndarray, targets: np.ndarray, lo: int, hi: int
    ) -> tuple[np.ndarray, int]:
        """NLL of rows lo..hi, one (extended grid) array per row (float64)."""
        sc = self._scratch[k]
        total = np.zeros((hi - lo, len(self._ga), len(self._gb)))
        fallbacks = 0
        fa, fb = self._fa, self._fb
        for t in range(lo, hi):
            a, b, c = a_rows[t], b_rows[t], c_rows[t]
            np.subtract(a, c, out=sc.d1)
            np.subtract(b, c, out=sc.d2)
            m_c = float(c.max())
            shift_a = fa.shifts(float(sc.d1.max()), float(sc.d1.min()) if fa.step is None else 0.0)
            shift_b = fb.shifts(float(sc.d2.max()), float(sc.d2.min()) if fb.step is None else 0.0)
            sums = np.zeros((len(sc.ua), len(sc.ub)))
            for s in range(0, len(c), BLOCK):
                n = min(BLOCK, len(c) - s)
                ua, ub = sc.ua[:, :n], sc.ub[:, :n]
                ec = ua[fa.zero]  # the alpha = 0 row is exp(C - max C), every alpha row's prefactor
                np.subtract(c[s : s + n], np.float32(m_c), out=ec)
                np.exp(ec, out=ec)
                fa.fill(sc.d1[s : s + n], ua, sc.base[:n], sc.tmp[:n], sc.powers[:, :n], shift_a)
                fb.fill(sc.d2[s : s + n], ub, sc.base[:n], sc.tmp[:n], sc.powers[:, :n], shift_b)
                sums += ua @ ub.T
            sums = sums[: len(fa.grid), : len(fb.grid)]
            x = int(targets[t])
            target = float(c[x]) + self._a64[:, None] * float(sc.d1[x]) + self._b64[None, :] * float(sc.d2[x])
            if not np.all(np.isfinite(sums)) or sums.min() < _TINY:
                lse = _dense_lse(a, b, c, self._a64, self._b64)
                fallbacks += 1
            else:
                lse = np.log(sums) + m_c + shift_a[:, None] + shift_b[None, :]
            total[t - lo] = lse - target
        return total, fallbacks

    def _rows_compiled(
        self, k: int, a_rows: np.ndarray, b_rows: np.ndarray, c_rows: np.ndarray, targets: np.ndarray, lo: int, hi: int
    ) -> tuple[np.ndarray, int]:
        """:meth:`_rows` with the compiled kernel: the same shifts and the same dense float64 fallback
        for a row whose sums are not finite or may have underflowed, for the cells that are read."""
        cp = self._compiled
        sums, stats = cp.sums(k, a_rows, b_rows, c_rows, lo, hi)
        sums = sums[:, : len(self._ga), : len(self._gb)]
        mc, d1x, d1n, d2x, d2n, total = stats.T
        rows = np.arange(lo, hi)
        x = np.asarray(targets[lo:hi], dtype=np.intp)
        c_x = c_rows[rows, x]
        d1_x = (a_rows[rows, x] - c_x).astype(np.float64)  # float32 differences, as the numpy path
        d2_x = (b_rows[rows, x] - c_x).astype(np.float64)
        target = c_x.astype(np.float64)[:, None, None] + self._a64[:, None] * d1_x[:, None, None]
        target = target + self._b64[None, :] * d2_x[:, None, None]
        read = sums[:, self._needed]
        bad = ~np.isfinite(total) | ~np.all(np.isfinite(read), axis=1) | ~(read.min(axis=1) >= _TINY)
        safe = np.where(self._needed & ~bad[:, None, None], sums, 1.0)
        with np.errstate(invalid="ignore", over="ignore"):  # rows with non-finite logits are redone below
            shift_a = np.where(cp.wa >= 0, cp.wa * d1x[:, None], cp.wa * d1n[:, None])
            shift_b = np.where(cp.wb >= 0, cp.wb * d2x[:, None], cp.wb * d2n[:, None])
            lse = np.log(safe) + mc[:, None, None] + shift_a[:, :, None] + shift_b[:, None, :]
        for t in np.flatnonzero(bad):
            r = lo + t
            lse[t] = _dense_lse(a_rows[r], b_rows[r], c_rows[r], self._a64, self._b64)
        nll = np.where(self._needed, lse - target, 0.0)
        return nll, int(bad.sum())


def _dense_lse(a: np.ndarray, b: np.ndarray, c: np.ndarray, alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """logsumexp of the fused row for every pair, the plain way, in float64 (the rare fallback)."""
    a64, b64, c64 = (x.astype(np.float64) for x in (a, b, c))
    out = np.empty((len(alphas), len(betas)))
    for i, al in enumerate(alphas):
        for j, be in enumerate(betas):
            f = c64 + al * (a64 - c64) + be * (b64 - c64)
            m = f.max()
            out[i, j] = m + math.log(np.exp(f - m).sum())
    return out


def entropy_grid(a: np.ndarray, b: np.ndarray, c: np.ndarray, alphas: Sequence[float], betas: Sequence[float]):
    """Entropy (nats) of the fused next-token distribution of one position, for every pair."""
    a64, b64, c64 = (np.asarray(x, dtype=np.float64) for x in (a, b, c))
    d1, d2 = a64 - c64, b64 - c64
    out = np.empty((len(alphas), len(betas)))
    for i, al in enumerate(alphas):
        for j, be in enumerate(betas):
            f = c64 + al * d1 + be * d2
            f -= f.max()
            p = np.exp(f)
            z = p.sum()
            out[i, j] = math.log(z) - float(p @ f) / z
    return out


@dataclass(frozen=True)
class Selector:
    """How to pick (alpha, beta): ``ppl`` or ``ent`` over the grid, per prompt.

    ``max_logits_mib`` bounds the extra memory of a ``ppl`` selection: llama.cpp's logits buffers
    for one chunk of prompt positions (every model) plus this module's per-thread scratch rows.
    """

    strategy: str = "ppl"
    alphas: tuple[float, ...] = DEFAULT_GRID
    betas: tuple[float, ...] = DEFAULT_GRID
    max_logits_mib: float = DEFAULT_MAX_LOGITS_MIB
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", parse_grid(self.alphas))
        object.__setattr__(self, "betas", parse_grid(self.betas))
        if self.strategy not in ("ppl", "ent"):
            raise WeightError(
                "unknown selection strategy {got!r} (choose fixed, ppl or ent)", param="strategy", got=self.strategy
            )
        if not (self.max_logits_mib > 0 and math.isfinite(self.max_logits_mib)):
            raise WeightError(
                "{max_logits_mib} must be a positive number, got {got}", param="max_logits_mib", got=self.max_logits_mib
            )

    def scratch_bytes(self, n_vocab: int) -> int:
        blk = min(n_vocab, BLOCK)
        per_thread = 2 * n_vocab * 4 + (4 + 2 * max(len(self.alphas), len(self.betas)) + 4) * blk * 4
        return per_thread * self._threads()

    def _threads(self) -> int:
        return max(1, self.threads or 1)

    def chunk_rows(self, n_vocab: int, vocab_sizes: Sequence[int], n_batch: int) -> int:
        """Prompt positions per chunk so that logits plus scratch stay within the memory bound."""
        budget = self.max_logits_mib * 2**20 - self.scratch_bytes(n_vocab)
        per_row = 4 * sum(vocab_sizes)
        return int(max(1, min(n_batch, budget // per_row)))


@dataclass
class Selection:
    """The outcome of a selection: a score per grid pair (mean NLL in nats per token for ``ppl``,
    entropy in nats for ``ent``), the chosen pair, and each single model's own prompt NLL."""

    strategy: str
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    scores: np.ndarray
    chosen: tuple[float, float]
    single_nll: dict[str, float]
    n_tokens: int
    seconds: float = 0.0
    dense_fallbacks: int = 0
    requested: str = ""  # the strategy asked for; differs from ``strategy`` when it could not apply
    note: str | None = None  # why, in one line

    def plan(self) -> FusionPlan:
        """TriMix with the chosen pair: what a selector's sequence runs once the choice is made."""
        a, b = self.chosen
        return plan("trimix", alpha=a, beta=b)

    def grid(self) -> list[dict[str, float | None]]:
        """Every pair's score; a perplexity past the largest float (or any non-finite value) is None."""
        out = []
        for i, a in enumerate(self.alphas):
            for j, b in enumerate(self.betas):
                v = float(self.scores[i, j])
                cell = {"alpha": a, "beta": b}
                if self.strategy == "ppl":
                    cell |= {"nll": json_number(v), "ppl": json_number(perplexity(v))}
                else:
                    cell |= {"entropy": json_number(v)}
                out.append(cell)
        return out

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "strategy": self.strategy,
            "chosen": {"alpha": self.chosen[0], "beta": self.chosen[1]},
            "grid": self.grid(),
            "single_ppl": {r: json_number(perplexity(v)) for r, v in self.single_nll.items()},
            "prompt_tokens": self.n_tokens,
        }
        if self.note:
            out |= {"requested": self.requested, "note": self.note}
        return out
