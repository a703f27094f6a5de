"""The grid reduction of :class:`~trimix_cpp.selection.GridNLL` as one compiled pass per vocabulary block.

Optional: this module needs numba (``pip install 'trimix[fast]'``) and is imported only when a
perplexity selection starts, so ``import trimix_cpp`` never pays for numba. Without numba,
:mod:`trimix_cpp.selection` runs the same sums with numpy.

Why compiled: numpy computes each grid row in its own pass over a vocabulary block (about twenty
passes, three of them exponentials) and hands the sums to BLAS, whose small-matrix product with 7 or
8 rows is slow on AVX2 (OpenBLAS has a fast path for it only with AVX-512). Here a block of
``selection.KERNEL_BLOCK`` entries stays in the core's L1 cache while, for every row:

* one pass over the row finds max C and the extremes of D1 = A - C and D2 = B - C (the shifts);
* per block, one loop computes the three exponential factors exp(C - max C), exp(s*(D1 - max D1))
  and exp(s*(D2 - max D2)) (or one exponential per weight when the grid has no common step), the
  power chains fill the alpha and beta factor rows in place, and register-tiled loops accumulate
  every needed (alpha, beta) sum, in float32 within the block and float64 across blocks.

Everything is float32 like the numpy path, with the same shifts, so both compute the same numbers
up to rounding. The exponential is a Cody-Waite reduction and a degree-6 polynomial with a maximum
relative error of 3e-7 over the whole float32 range, denormals included (numba's own ``exp`` is a
scalar libm call that LLVM cannot vectorise without Intel's SVML).
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

_F32 = np.float32
# Reassociation lets LLVM vectorise the sums; no-NaN and no-infinity are left out so that a NaN in
# the logits reaches the sums and the caller's finiteness check.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693359375)  # ln 2 in two parts (Cody-Waite): the high part has few significant bits
_LN2_LO = _F32(-2.12194440e-4)
_EXP_LO = _F32(-104.0)  # below this exp rounds to 0 in float32


def _declare(module: ir.Module, fnty: ir.FunctionType, name: str) -> ir.Function:
    try:
        return module.get_global(name)
    except KeyError:
        return ir.Function(module, fnty, name=name)


def _float_op(name: str):
    """A float32 LLVM intrinsic of two arguments. numba lowers ``max`` to compare-and-select, whose
    reductions LLVM leaves scalar; ``llvm.maxnum`` reductions it vectorises."""

    @intrinsic
    def op(typingctx, x, y):
        if x != types.float32 or y != types.float32:
            return None

        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
            return builder.call(_declare(builder.module, fnty, name), args)

        return types.float32(types.float32, types.float32), codegen

    return op


_fmax = _float_op("llvm.maxnum.f32")
_fmin = _float_op("llvm.minnum.f32")


@intrinsic
def _ldexp(typingctx, p, n):
    """``p * 2**n`` for -150 <= n <= 127 by writing exponent bits in int32 arithmetic (vectorisable,
    unlike ``math.ldexp``). The power is applied in two halves so that results below 2**-126 come out
    as the denormals a libm ``exp`` returns instead of garbage."""
    if p != types.float32 or not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = args[1]
        if v.type.width > 32:
            v = builder.trunc(v, i32)
        elif v.type.width < 32:
            v = builder.sext(v, i32)
        hi = builder.ashr(v, ir.Constant(i32, 1))
        lo = builder.sub(v, hi)

        def pow2(e):
            bits = builder.shl(builder.add(e, ir.Constant(i32, 127)), ir.Constant(i32, 23))
            return builder.bitcast(bits, ir.FloatType())

        return builder.fmul(builder.fmul(args[0], pow2(hi)), pow2(lo))

    return types.float32(types.float32, n), codegen


@nb.njit(fastmath=_FAST, inline="always", cache=True)
def _exp(x):
    """exp(x) in float32 for x <= 88, maximum relative error 3e-7 (Cephes' expf polynomial)."""
    xc = _fmax(x, _EXP_LO)
    # the nearest integer to x * log2(e) (halves away from zero, by truncation), so |r| <= ln2 / 2
    y = xc * _LOG2E
    n = np.int32(y + (_F32(0.5) if y >= 0 else _F32(-0.5)))
    nf = _F32(n)
    r = xc - nf * _LN2_HI
    r = r - nf * _LN2_LO
    p = _F32(1.9875691500e-4)
    p = p * r + _F32(1.3981999507e-3)
    p = p * r + _F32(8.3334519073e-3)
    p = p * r + _F32(4.1665795894e-2)
    p = p * r + _F32(1.6666665459e-1)
    p = p * r + _F32(5.0000001201e-1)
    p = p * r * r + r + _F32(1.0)
    return _ldexp(p, n)


@nb.njit(fastmath=_FAST, nogil=True, cache=True)
def exp_into(x, out):
    """``out[:] = exp(x)`` with the kernel's exponential (for tests of its accuracy)."""
    for j in range(len(x)):
        out[j] = _exp(x[j])


@nb.njit(fastmath=True, nogil=True, cache=True)
def _row_stats(a, b, c):
    """max C, max and min of A - C and B - C, and the row's plain sum (NaN or infinite when any logit
    is, which the caller checks: maxnum ignores NaN)."""
    mc = c[0]
    d1x = a[0] - c[0]
    d1n = d1x
    d2x = b[0] - c[0]
    d2n = d2x
    total = _F32(0.0)
    for j in range(len(c)):
        cj = c[j]
        d1 = a[j] - cj
        d2 = b[j] - cj
        mc = _fmax(mc, cj)
        d1x = _fmax(d1x, d1)
        d1n = _fmin(d1n, d1)
        d2x = _fmax(d2x, d2)
        d2n = _fmin(d2n, d2)
        total += (cj + a[j]) + b[j]
    return mc, d1x, d1n, d2x, d2n, total


@nb.njit(fastmath=_FAST, nogil=True, cache=True)
def _chain(u, pw, tmp, gaps, n):
    """Rows 1.. of ``u`` from row 0: ``u[i] = u[i-1] * pw**gaps[i]``, each a pass over L1 data."""
    last = 1
    for i in range(1, len(gaps)):
        g = gaps[i]
        dst = u[i]
        src = u[i - 1]
        if g == 1:
            for j in range(n):
                dst[j] = src[j] * pw[j]
            continue
        if g != last:
            for j in range(n):
                tmp[j] = pw[j] * pw[j]
            for _ in range(g - 2):
                for j in range(n):
                    tmp[j] = tmp[j] * pw[j]
            last = g
        for j in range(n):
            dst[j] = src[j] * tmp[j]


@nb.njit(fastmath=_FAST, nogil=True, cache=True)
def _direct(x, c, u, w, shift, zero, n):
    """Every row of ``u`` but ``zero``: ``u[i] = u[zero] * exp(w_i * (x - c) - shift_i)``, for grids
    whose weights share no small common step (negative weights, or values such as 0.37)."""
    base = u[zero]
    for i in range(len(w)):
        if i == zero:
            continue
        wi = _F32(w[i])
        si = _F32(shift[i])
        dst = u[i]
        for j in range(n):
            dst[j] = base[j] * _exp(wi * (x[j] - c[j]) - si)


@nb.njit(fastmath=_FAST, nogil=True, cache=True)
def _tiles(u, w, n, sums, r0, r1, k0, k1):
    """``sums[i, k] += u[i, :n] . w[k, :n]`` over rows r0..r1 and columns k0..k1 (multiples of 3
    apart), 3 x 3 cells per sweep so each loaded operand feeds three multiply-adds."""
    for i in range(r0, r1, 3):
        u0 = u[i]
        u1 = u[i + 1]
        u2 = u[i + 2]
        for k in range(k0, k1, 3):
            w0 = w[k]
            w1 = w[k + 1]
            w2 = w[k + 2]
            s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = _F32(0.0)
            for j in range(n):
                x0 = w0[j]
                x1 = w1[j]
                x2 = w2[j]
                y = u0[j]
                s00 += y * x0
                s01 += y * x1
                s02 += y * x2
                y = u1[j]
                s10 += y * x0
                s11 += y * x1
                s12 += y * x2
                y = u2[j]
                s20 += y * x0
                s21 += y * x1
                s22 += y * x2
            sums[i, k] += s00
            sums[i, k + 1] += s01
            sums[i, k + 2] += s02
            sums[i + 1, k] += s10
            sums[i + 1, k + 1] += s11
            sums[i + 1, k + 2] += s12
            sums[i + 2, k] += s20
            sums[i + 2, k + 1] += s21
            sums[i + 2, k + 2] += s22


@nb.njit(fastmath=_FAST, nogil=True, cache=True)
def _cells(u, w, n, sums, cells):
    """The single cells outside the tiled rectangle (the single models' own sums)."""
    for q in range(len(cells)):
        i = cells[q, 0]
        k = cells[q, 1]
        acc = _F32(0.0)
        ui = u[i]
        wk = w[k]
        for j in range(n):
            acc += ui[j] * wk[j]
        sums[i, k] += acc


@nb.njit(fastmath=_FAST, nogil=True, cache=True)
def grid_sums(
    a_rows, b_rows, c_rows, lo, hi, wa, wb, step_a, step_b, gaps_a, gaps_b, za, zb, rect, cells,
    u, w, pa, pb, tmp, sums, stats,
):  # fmt: skip
    """For rows lo..hi: ``sums[t, i, k] = sum_v exp(C - mc) * exp(wa_i*D1 - sa_i) * exp(wb_k*D2 - sb_k)``
    for the cells of ``rect`` and ``cells``, and ``stats[t] = (mc, max D1, min D1, max D2, min D2,
    row sum)``. The shifts are ``w*max D`` for w >= 0 and ``w*min D`` below 0, so no factor exceeds 1.

    ``step_a > 0`` means every alpha weight is ``k * step_a`` with ``gaps_a`` the steps between
    consecutive ones (zero first); otherwise each weight gets its own exponential. ``u``/``w`` are
    the alpha/beta factor rows of one block (row ``zb`` of ``w`` holds ones and is never written),
    ``pa``, ``pb`` and ``tmp`` one block each. Releases the GIL: threads may take disjoint rows.
    """
    n_vocab = c_rows.shape[1]
    block = u.shape[1]
    na = len(wa)
    nbeta = len(wb)
    sa = np.empty(na)
    sb = np.empty(nbeta)
    chain_a = step_a > 0
    chain_b = step_b > 0
    u0 = u[za]
    for t in range(lo, hi):
        a = a_rows[t]
        b = b_rows[t]
        c = c_rows[t]
        mc, d1x, d1n, d2x, d2n, total = _row_stats(a, b, c)
        stats[t, 0] = mc
        stats[t, 1] = d1x
        stats[t, 2] = d1n
        stats[t, 3] = d2x
        stats[t, 4] = d2n
        stats[t, 5] = total
        for i in range(na):
            sa[i] = wa[i] * d1x if wa[i] >= 0 else wa[i] * d1n
        for k in range(nbeta):
            sb[k] = wb[k] * d2x if wb[k] >= 0 else wb[k] * d2n
        out = sums[t]
        out[:, :] = 0.0
        fmc = _F32(mc)
        fa = _F32(step_a)
        fb = _F32(step_b)
        ma = _F32(d1x)
        mb = _F32(d2x)
        for s0 in range(0, n_vocab, block):
            n = min(block, n_vocab - s0)
            cb = c[s0 : s0 + n]
            ab = a[s0 : s0 + n]
            bb = b[s0 : s0 + n]
            if chain_a and chain_b:
                for j in range(n):
                    cj = cb[j]
                    u0[j] = _exp(cj - fmc)
                    pa[j] = _exp(fa * ((ab[j] - cj) - ma))
                    pb[j] = _exp(fb * ((bb[j] - cj) - mb))
            else:
                for j in range(n):
                    u0[j] = _exp(cb[j] - fmc)
                if chain_a:
                    for j in range(n):
                        pa[j] = _exp(fa * ((ab[j] - cb[j]) - ma))
                if chain_b:
                    for j in range(n):
                        pb[j] = _exp(fb * ((bb[j] - cb[j]) - mb))
            if chain_a:
                _chain(u, pa, tmp, gaps_a, n)
            else:
                _direct(ab, cb, u, wa, sa, za, n)
            if chain_b:
                _chain(w, pb, tmp, gaps_b, n)
            else:
                _direct(bb, cb, w, wb, sb, zb, n)
            _tiles(u, w, n, out, rect[0], rect[1], rect[2], rect[3])
            _cells(u, w, n, out, cells)
