"""Backend "numba": CPU kernels compiled with Numba, parallel over the batch.

One generic pair of kernels serves every N, M and interpolation. A bilinear element scatters
(forward) or gathers (backward) its ``2**M`` corners directly. A triangle or Gaussian element
gets a 1-D profile per learned axis over its support (the cells within ``sigma`` for triangle,
the cells within the cut radius for gauss (``ndcls.gauss_cut``: beyond it every value is
below the rounding of the element's peak), built with 3 calls of ``exp`` by recurrence), and is
scattered or gathered over the product of those supports. No dense intermediate: the forward
pass zeroes each batch block of ``K`` and adds into it while it is in cache; the backward writes
each element's gradients once (no races, deterministic). Small calls run a serial kernel, large
ones a parallel one whose threads claim loop iterations dynamically (:mod:`._threads`); the
kernels release the GIL. Arithmetic is in float64 whatever the input dtype. The per-element
maths is :mod:`ndcls.kernels._element`, inlined here; the per-element chain rule
:func:`_element_grad` serves ``construct_grad`` and ``conv_grad`` (:mod:`.cpu_conv`), which
also computes Gaussian rows many elements at a time (:func:`_gauss_rows`). Kernels compile
with ``error_model="numpy"``: a division has no zero-division branch (every division is
guarded where it matters), so that loops with divisions can vectorise.
"""

from __future__ import annotations

import functools
import inspect
import math
import types as types_

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange
from numba.extending import intrinsic

from ndcls._spec import gauss_cut, taps_per_element
from ndcls.kernels import _element
from ndcls.kernels._threads import SMALL_WORK

_valid = njit(cache=True, inline="always")(_element.element_valid)
_cut_support = njit(cache=True, inline="always")(_element.cut_support)
_fill = njit(cache=True, inline="always")(_element.fill_profile)
_bilinear_cell = njit(cache=True, inline="always")(_element.bilinear_cell)
_advance = njit(cache=True, inline="always")(_element.advance)
_normalise = njit(cache=True, inline="always")(_element.normalise_profile)
_ratios = njit(cache=True, inline="always")(_element.normaliser_ratios)
_normalised_gradient = njit(cache=True, inline="always")(_element.normalised_gradient)
_derivative_scale = njit(cache=True, inline="always")(_element.derivative_scale)

_INVALID, _EMPTY, _OK = 0, 1, 2
# Reassociation and contraction let LLVM vectorise the inner sums; no flag assumes finite
# values, so NaN and inf propagate as without fastmath.
_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, inline="always")
def _profiles(kind, normalised, positions, sigma, b, d, c, sizes, a, da_dp, da_ds, sums, lo, hi, with_grad, radius):
    """Profiles of element ``(b, d, c)`` along every learned axis; returns ``(status, S)``.

    A Gaussian is cut at ``radius`` widths (:func:`ndcls._spec.gauss_cut`; inf: whole axes).

    ``sums[0, j]``, ``sums[1, j]``, ``sums[2, j]``: sums of ``a``, ``da_dp``, ``da_ds`` along row j
    (``S`` is the product of the first). Normalised kinds leave the rows normalised and the
    derivative rows centred (``_element.normalise_profile``); a row summing to 0 makes the
    element empty.
    """
    m = positions.shape[0]
    for j in range(m):
        if not _valid(kind, positions[j, b, d, c], sigma[j, b, d, c]):
            return _INVALID, 1.0
    z = 1.0
    for j in range(m):
        p = positions[j, b, d, c]
        s = sigma[j, b, d, c]
        lo[j], hi[j] = _cut_support(kind, p, s, sizes[j], radius)
        if lo[j] >= hi[j]:
            return _EMPTY, 1.0
        sums[0, j], sums[1, j], sums[2, j] = _fill(kind, p, s, lo[j], hi[j], a[j], da_dp[j], da_ds[j], with_grad)
        if normalised:
            if sums[0, j] == 0.0:  # (NaN goes on: a bug in the profile must show)
                return _EMPTY, 1.0
            _normalise(kind, p, s, lo[j], hi[j], a[j], da_dp[j], da_ds[j], sums[0, j], sums[1, j], sums[2, j], with_grad)
        z *= sums[0, j]
    return _OK, z


@njit(cache=True, inline="always")
def _element_scale(normalised, total):
    """Factor of ``w * prod of the rows`` in ``K``: ``S / Z`` for the normalised kinds (whose rows
    :func:`_profiles` left normalised), 1 for bilinear."""
    if normalised:
        ratio, _ = _ratios(total)
        return ratio
    return 1.0


@njit(cache=True, inline="always")
def _corners(positions, b, d, c, sizes, corner, frac):
    """Bilinear: lower corner and fraction of element ``(b, d, c)`` per axis; False if invalid."""
    for j in range(positions.shape[0]):
        p = positions[j, b, d, c]
        if not _valid(_element.BILINEAR, p, p):
            return False
        corner[j], frac[j] = _bilinear_cell(p, sizes[j])
    return True


@njit(cache=True, inline="always")
def _corner_cell(k, corner, frac, sizes, strides, factors):
    """Offset in the block of corner ``k`` (bit j: upper along row j), or -1 if outside the kernel;
    fills ``factors[j]`` with the corner's interpolation factor along row j."""
    offset = 0
    for j in range(corner.shape[0]):
        upper = (k >> j) & 1
        i = corner[j] + upper
        if i < 0 or i >= sizes[j]:
            return -1
        factors[j] = frac[j] if upper else 1.0 - frac[j]
        offset += i * strides[j]
    return offset


def _construct(kind, normalised, weight, positions, sigma, kernel, dense_offsets, sizes, strides, n_chunks, radius):
    n_batch, n_dense, count = weight.shape
    m = positions.shape[0]
    last = m - 1
    width = 1
    for j in range(m):
        width = max(width, sizes[j])
    for chunk in prange(n_chunks):
        a = np.empty((m, width))
        sums = np.empty((3, m))
        lo = np.empty(m, np.int64)
        hi = np.empty(m, np.int64)
        idx = np.empty(m, np.int64)
        corner = np.empty(m, np.int64)
        frac = np.empty(m)
        factors = np.empty(m)
        for b in range(chunk * n_batch // n_chunks, (chunk + 1) * n_batch // n_chunks):
            out = kernel[b]
            out[:] = 0
            for d in range(n_dense):
                for c in range(count):
                    if kind == _element.BILINEAR:  # scatter the 2**M corners
                        if not _corners(positions, b, d, c, sizes, corner, frac):
                            continue
                        for k in range(1 << m):
                            offset = _corner_cell(k, corner, frac, sizes, strides, factors)
                            if offset >= 0:
                                value = weight[b, d, c]
                                for j in range(m):
                                    value *= factors[j]
                                out[dense_offsets[d] + offset] += value
                        continue
                    status, total = _profiles(
                        kind, normalised, positions, sigma, b, d, c, sizes, a, a, a, sums, lo, hi, False, radius
                    )
                    if status != _OK:
                        continue
                    scale = weight[b, d, c] * _element_scale(normalised, total)  # K = w * (S / Z) * prod n
                    idx[:] = lo
                    step = strides[last]
                    while True:
                        outer = scale
                        offset = dense_offsets[d]
                        for j in range(last):
                            outer *= a[j, idx[j]]
                            offset += idx[j] * strides[j]
                        if step == 1:  # the usual layout: a contiguous run LLVM can vectorise
                            for i in range(lo[last], hi[last]):
                                out[offset + i] += outer * a[last, i]
                        else:
                            for i in range(lo[last], hi[last]):
                                out[offset + i * step] += outer * a[last, i]
                        if not _advance(idx, lo, hi, last):
                            break


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _element_grad(kind, normalised, g, base, strides, w, total, sigma, b, d, c, lo, hi, a, da_dp, da_ds, sums, idx, u, v):
    """Chain rule of element ``(b, d, c)``, from ``dL/dK`` over its support and its profiles
    (:func:`_profiles`, with gradients: normalised rows and centred derivative rows).

    ``dL/dK`` at learned cell ``idx`` (``lo <= idx < hi``) is ``g[base + sum_j idx[j] * strides[j]]``
    (``construct_grad``: the kernel block; ``conv_grad``: the correlation at the element's taps).
    Returns ``dL/dw``; leaves ``dL/dp_j`` in ``u[j]`` and ``dL/ds_j`` in ``v[j]``.
    """
    m = lo.shape[0]
    last = m - 1
    t = 0.0
    for j in range(m):  # (loops, not slice assignments: callable without NRT)
        u[j] = 0.0  # sum of G * (centred da/dp_j) * prod of the other rows
        v[j] = 0.0  # the same with da/ds_j
        idx[j] = lo[j]
    step = strides[last]
    while True:
        offset = base
        outer = 1.0
        for j in range(last):
            offset += idx[j] * strides[j]
            outer *= a[j, idx[j]]
        h = 0.0  # sum over the last axis of G * a, G * da_dp, G * da_ds
        h_p = 0.0
        h_s = 0.0
        for i in range(lo[last], hi[last]):
            gi = g[offset + i * step]
            h += gi * a[last, i]
            h_p += gi * da_dp[last, i]
            h_s += gi * da_ds[last, i]
        t += outer * h
        u[last] += outer * h_p
        v[last] += outer * h_s
        for k in range(last):
            rest = h
            for j in range(last):
                if j != k:
                    rest *= a[j, idx[j]]
            u[k] += rest * da_dp[k, idx[k]]
            v[k] += rest * da_ds[k, idx[k]]
        if not _advance(idx, lo, hi, last):
            break
    if not normalised:
        for j in range(m):
            u[j] = w * u[j]
        return t
    ratio, q = _ratios(total)  # t = sum of G * n
    for j in range(m):
        others = 1.0
        for k in range(m):
            if k != j:
                others *= sums[0, k]
        scale = _derivative_scale(kind, sigma[j, b, d, c])
        grad_p = _normalised_gradient(w, t, u[j], sums[1, j], sums[0, j], others, q, scale)
        grad_s = _normalised_gradient(w, t, v[j], sums[2, j], sums[0, j], others, q, scale)
        u[j] = grad_p
        v[j] = grad_s
    return ratio * t


@njit(cache=True, inline="always")
def _element_chain(
    kind, normalised, g, base, strides, at_taps, weight, positions, sigma, b, d, c, sizes, radius, a, da_dp, da_ds,
    sums, lo, hi, idx, u, v, grad_w, grad_p, grad_s,
):  # fmt: skip
    """Gradients of element ``(b, d, c)`` into ``grad_w``, ``grad_p``, ``grad_s``: its profiles, then
    :func:`_chain_from_profiles` (NaN for an invalid element, 0 for an empty one)."""
    m = positions.shape[0]
    status, total = _profiles(kind, normalised, positions, sigma, b, d, c, sizes, a, da_dp, da_ds, sums, lo, hi, True, radius)
    if status != _OK:
        fill = np.nan if status == _INVALID else 0.0
        grad_w[b, d, c] = fill
        for j in range(m):
            grad_p[j, b, d, c] = fill
            grad_s[j, b, d, c] = fill
        return
    _chain_from_profiles(
        kind, normalised, g, base, strides, at_taps, weight, sigma, b, d, c, total, a, da_dp, da_ds, sums, lo, hi, idx, u,
        v, grad_w, grad_p, grad_s,
    )  # fmt: skip


@njit(cache=True, inline="always")
def _chain_from_profiles(
    kind, normalised, g, base, strides, at_taps, weight, sigma, b, d, c, total, a, da_dp, da_ds, sums, lo, hi, idx, u, v,
    grad_w, grad_p, grad_s,
):  # fmt: skip
    """:func:`_element_grad` of element ``(b, d, c)``, whose profiles (:func:`_profiles`, with
    gradients, ``total`` its ``S``) are given, written to ``grad_w``, ``grad_p``, ``grad_s``.
    ``dL/dK`` at its cells is read from ``g``: ``construct_grad`` gives the kernel block
    (``base``, ``strides``); ``conv_grad`` (``at_taps``) the element's taps from ``base`` on, its
    support box in C order (``strides`` is scratch then)."""
    m = lo.shape[0]
    if at_taps:
        step = 1
        for j in range(m - 1, -1, -1):
            strides[j] = step
            base -= lo[j] * step
            step *= hi[j] - lo[j]
    grad_w[b, d, c] = _element_grad(
        kind, normalised, g, base, strides, weight[b, d, c], total, sigma, b, d, c, lo, hi, a, da_dp, da_ds, sums, idx, u, v,
    )  # fmt: skip
    for j in range(m):
        grad_p[j, b, d, c] = u[j]
        grad_s[j, b, d, c] = v[j]


# -- Gaussian rows across SIMD lanes -------------------------------------------------------------
# The scalar profile code above spends most of its time on branches, loops of 5 or 6 cells
# and libm's exp, one element after the other. The conv kernels (cpu_conv) instead compute
# the Gaussian rows of ROW_BLOCK elements together, one element per SIMD lane, in the formulas
# of _element: the cut support, every cell's exp (a polynomial, :func:`_exp`) and, with
# gradients, the centred derivative rows. A row that is not *regular* (invalid, an empty or
# wider support than ROW_WIDEST cells, a peak more than ROW_GAP widths outside the kernel)
# is left to :func:`_profiles`. Every lane loop runs ROW_BLOCK times over one flat scratch
# array of fields ROW_BLOCK apart, so that LLVM sees the fields do not overlap and vectorises
# (the kernels compile with ``error_model="numpy"``: no zero-division branch in a division).

#: elements whose Gaussian rows are computed together
ROW_BLOCK = 32
#: widest regular row (cells); the cut support of a width-0.5 Gaussian has 5 or 6 in float32
ROW_WIDEST = 16
#: a row whose peak lies further outside the kernel than this many widths is not regular: its
#: values approach underflow, where :func:`_profiles` defines what happens
ROW_GAP = 30.0
# fields of a block's scratch row (:func:`_gauss_rows`), each ROW_BLOCK lanes
_P, _S, _INV_S, _LO, _WIDTH, _SUM, _SUM_DP, _SUM_DS, _NEAREST, _CORR_P, _CORR_S, _T, _H_P, _H_S, _A = range(15)
_DA_DP = _A + ROW_WIDEST
_DA_DS = _DA_DP + ROW_WIDEST
ROW_FIELDS = _DA_DS + ROW_WIDEST

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts: k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(13))


@intrinsic
def _float_of_bits(typingctx, bits):
    """The float64 whose IEEE bits are the int64 ``bits``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.DoubleType())

    return numba.types.float64(numba.types.int64), codegen


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp(x):
    """``exp(x)`` for ``x`` in ``[-700, 0]`` (clamped), within 6e-16 relative (tests/test_conv.py):
    ``2**k * exp(r)``, ``|r| <= ln(2) / 2``, ``exp(r)`` by its Taylor series to degree 12, ``2**k``
    from its bits. Branch-free, so that loops calling it vectorise (libm's exp does not)."""
    c = _EXP_TAYLOR
    xi = min(max(x, -700.0), 0.0)
    k = math.floor(xi * _LOG2E + 0.5)
    r = (xi - k * _LN2_HI) - k * _LN2_LO
    q = c[12]
    q = q * r + c[11]
    q = q * r + c[10]
    q = q * r + c[9]
    q = q * r + c[8]
    q = q * r + c[7]
    q = q * r + c[6]
    q = q * r + c[5]
    q = q * r + c[4]
    q = q * r + c[3]
    q = q * r + c[2]
    q = q * r + 1.0
    q = q * r + 1.0
    return q * _float_of_bits((np.int64(k) + 1023) << 52)


@njit(cache=True, inline="always")
def _lane(index):
    """``index`` as an unsigned integer: an array index Numba does not check for wraparound
    (the check, a select per access, keeps LLVM from vectorising)."""
    return np.uint64(index)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _gauss_rows(positions, sigma, j, e0, n, size, radius, with_grad, r):
    """Gaussian rows along learned axis ``j`` of the elements ``e0 + i``, ``i < n`` (arrays
    viewed ``(M, E, 1, 1)``), lane ``i`` of each field of ``r`` (``ROW_FIELDS * ROW_BLOCK``):
    ``_LO``, ``_WIDTH`` (0: not regular), ``_A + k`` the normalised profile at cell ``lo + k``,
    ``_SUM``, ``_SUM_DP``, ``_SUM_DS`` the sums of the profile and of its derivatives before
    normalisation (:func:`_element.fill_profile`); with gradients, ``_DA_DP + k`` and
    ``_DA_DS + k`` the centred derivative rows (:func:`_element.normalise_profile`). Returns
    the widest row."""
    B = ROW_BLOCK
    last = positions.shape[1] - 1
    for i in range(B):  # an invalid lane (or one past n) gets p = 0, s = -1: never regular
        p = float(positions[j, min(e0 + i, last), 0, 0])
        s = float(sigma[j, min(e0 + i, last), 0, 0])
        ok = (abs(p) <= 1e300) & (s >= 1e-140) & (s <= 1e300) & (i < n)
        r[_lane(_P * B + i)] = p if ok else 0.0
        r[_lane(_S * B + i)] = s if ok else -1.0
    for i in range(B):
        r[_lane(_INV_S * B + i)] = 1.0 / r[_lane(_S * B + i)]
    for i in range(B):  # the cut support: _element.cut_support, the counting pass's
        p = r[_lane(_P * B + i)]
        s = r[_lane(_S * B + i)]
        lo, hi = _cut_support(_element.GAUSS, p, s, size, radius)
        gap = abs(p - math.floor(min(max(p, 0.0), size - 1.0) + 0.5))
        regular = (s > 0.0) & (gap <= ROW_GAP * s) & (hi - lo >= 1) & (hi - lo <= ROW_WIDEST)
        r[_lane(_LO * B + i)] = float(lo)
        r[_lane(_WIDTH * B + i)] = float(hi - lo) if regular else 0.0
    widest = 0.0
    for i in range(B):
        widest = max(widest, r[_lane(_WIDTH * B + i)])
        r[_lane(_SUM * B + i)] = 0.0
        r[_lane(_SUM_DP * B + i)] = 0.0
        r[_lane(_SUM_DS * B + i)] = 0.0
    n_cells = int(widest)
    for k in range(n_cells):  # a[k] = exp(-u**2 / 2), u = (cell - p) / s
        row = (_A + k) * B
        for i in range(B):
            u = (r[_lane(_LO * B + i)] + k - r[_lane(_P * B + i)]) * r[_lane(_INV_S * B + i)]
            r[_lane(row + i)] = _exp(-0.5 * u * u) if k < r[_lane(_WIDTH * B + i)] else 0.0
        for i in range(B):
            u = (r[_lane(_LO * B + i)] + k - r[_lane(_P * B + i)]) * r[_lane(_INV_S * B + i)]
            value = r[_lane(row + i)]
            r[_lane(_SUM * B + i)] += value
            r[_lane(_SUM_DP * B + i)] += value * u  # s * da/dp, as in fill_profile
            r[_lane(_SUM_DS * B + i)] += value * u * u  # s * da/ds
    if with_grad:  # rows centred about the cell m nearest p: a * ((l - l_m) - sum_k n_k (l_k - l_m))
        for i in range(B):
            lo = r[_lane(_LO * B + i)]
            r[_lane(_NEAREST * B + i)] = math.floor(min(max(r[_lane(_P * B + i)] + 0.5, lo), lo + r[_lane(_WIDTH * B + i)] - 1.0))
            r[_lane(_CORR_P * B + i)] = 0.0
            r[_lane(_CORR_S * B + i)] = 0.0
        for k in range(n_cells):  # l - l_m per cell (in the derivative rows for now), and their sums
            row = (_A + k) * B
            for i in range(B):
                cell = r[_lane(_LO * B + i)] + k
                dl = (cell - r[_lane(_NEAREST * B + i)]) * r[_lane(_INV_S * B + i)]
                ul = (cell - r[_lane(_P * B + i)]) * r[_lane(_INV_S * B + i)]
                u_m = (r[_lane(_NEAREST * B + i)] - r[_lane(_P * B + i)]) * r[_lane(_INV_S * B + i)]
                r[_lane((_DA_DP + k) * B + i)] = dl
                r[_lane((_DA_DS + k) * B + i)] = dl * (ul + u_m)
                r[_lane(_CORR_P * B + i)] += r[_lane(row + i)] * dl
                r[_lane(_CORR_S * B + i)] += r[_lane(row + i)] * (dl * (ul + u_m))
        for i in range(B):
            inv_total = 1.0 / r[_lane(_SUM * B + i)] if r[_lane(_WIDTH * B + i)] > 0.0 else 0.0
            r[_lane(_CORR_P * B + i)] *= inv_total
            r[_lane(_CORR_S * B + i)] *= inv_total
        for k in range(n_cells):
            row = (_A + k) * B
            for i in range(B):
                a = r[_lane(row + i)]
                r[_lane((_DA_DP + k) * B + i)] = a * (r[_lane((_DA_DP + k) * B + i)] - r[_lane(_CORR_P * B + i)])
                r[_lane((_DA_DS + k) * B + i)] = a * (r[_lane((_DA_DS + k) * B + i)] - r[_lane(_CORR_S * B + i)])
    for k in range(n_cells):
        row = (_A + k) * B
        for i in range(B):
            r[_lane(row + i)] *= 1.0 / r[_lane(_SUM * B + i)] if r[_lane(_WIDTH * B + i)] > 0.0 else 0.0
    return n_cells


def _construct_grad(
    kind, normalised, grad_kernel, weight, positions, sigma, grad_w, grad_p, grad_s, dense_offsets, sizes, strides, n_chunks, radius
):
    n_batch, n_dense, count = weight.shape
    m = positions.shape[0]
    width = 1
    for j in range(m):
        width = max(width, sizes[j])
    for chunk in prange(n_chunks):
        a = np.empty((m, width))
        da_dp = np.empty((m, width))
        da_ds = np.empty((m, width))
        sums = np.empty((3, m))
        lo = np.empty(m, np.int64)
        hi = np.empty(m, np.int64)
        idx = np.empty(m, np.int64)
        u = np.empty(m)  # sum of G * (centred da/dp_j) * prod of the other rows' n
        v = np.empty(m)  # the same with da/ds_j
        corner = np.empty(m, np.int64)
        frac = np.empty(m)
        factors = np.empty(m)
        for b in range(chunk * n_batch // n_chunks, (chunk + 1) * n_batch // n_chunks):
            g_block = grad_kernel[b]
            for d in range(n_dense):
                for c in range(count):
                    if kind == _element.BILINEAR:  # gather the 2**M corners
                        if not _corners(positions, b, d, c, sizes, corner, frac):
                            grad_w[b, d, c] = np.nan
                            for j in range(m):
                                grad_p[j, b, d, c] = np.nan
                            continue
                        t = 0.0
                        u[:] = 0.0
                        for k in range(1 << m):
                            offset = _corner_cell(k, corner, frac, sizes, strides, factors)
                            if offset < 0:
                                continue
                            g = g_block[dense_offsets[d] + offset]
                            share = g
                            for j in range(m):
                                share *= factors[j]
                            t += share
                            for j in range(m):  # d(factor_j)/dp_j is +1 at the upper corner, -1 at the lower
                                rest = g if (k >> j) & 1 else -g
                                for i in range(m):
                                    if i != j:
                                        rest *= factors[i]
                                u[j] += rest
                        w = weight[b, d, c]
                        grad_w[b, d, c] = t
                        for j in range(m):
                            grad_p[j, b, d, c] = w * u[j]
                        continue
                    _element_chain(
                        kind, normalised, g_block, dense_offsets[d], strides, False, weight, positions, sigma, b, d, c,
                        sizes, radius, a, da_dp, da_ds, sums, lo, hi, idx, u, v, grad_w, grad_p, grad_s,
                    )  # fmt: skip


# -- dispatch ------------------------------------------------------------------------------
# The two kernels above are plain Python functions; each is compiled on first use into at most
# two machine-code versions per dtype: a serial one for small calls (where threads cost more
# than they save, and whose compilation is about half as long) and a parallel one for large
# calls, whose threads claim loop iterations one at a time (:mod:`._threads`). Inputs are typed read-only, so a read-only NumPy array (``writeable=False``) and a
# writable one share the same compiled kernel instead of compiling a second set.

#: output arguments of each kernel (typed writable); every other array argument is typed read-only
_OUTPUTS = {"_construct": ("kernel",), "_construct_grad": ("grad_w", "grad_p", "grad_s")}
#: below this many estimated operations a call runs the serial kernel (:data:`._threads.SMALL_WORK`)
PARALLEL_MIN_WORK = SMALL_WORK
_COMPILED: dict = {}


@functools.lru_cache(maxsize=None)
def _readonly_mask(py_func) -> tuple[bool, ...]:
    outputs = _OUTPUTS[py_func.__name__]
    return tuple(name not in outputs for name in inspect.signature(py_func).parameters)


def _signature(py_func, args):
    types = []
    for readonly, arg in zip(_readonly_mask(py_func), args):
        t = numba.typeof(arg)
        if isinstance(t, numba.types.Array):
            t = t.copy(readonly=readonly)
        types.append(t)
    return tuple(types)


def _argument_key(arg):
    """What Numba's typing of ``arg`` depends on, cheaper to compute than ``numba.typeof``."""
    if isinstance(arg, np.ndarray):
        flags = arg.flags
        return (arg.dtype.char, arg.ndim, flags.c_contiguous, flags.f_contiguous, flags.aligned)
    return type(arg)


def _run(py_func, parallel, *args):
    """Call the compiled version of ``py_func`` for these argument types (compiling it once)."""
    key = (py_func.__name__, parallel, tuple(map(_argument_key, args)))
    compiled = _COMPILED.get(key)
    if compiled is None:
        sig = _signature(py_func, args)
        # A distinct qualified name per variant keeps the serial and parallel versions apart in
        # Numba's on-disk cache, which keys entries by function and signature, not by flags.
        variant = types_.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__)
        variant.__qualname__ = f"{py_func.__qualname__}_{'parallel' if parallel else 'serial'}"
        variant.__module__ = py_func.__module__
        compiled = njit(sig, cache=True, parallel=parallel, nogil=True, fastmath=_FASTMATH, error_model="numpy")(variant)
        _COMPILED[key] = compiled
    if not parallel:
        return compiled(*args)
    with numba.parallel_chunksize(1):  # a parked thread takes fewer iterations, not a fixed share
        return compiled(*args)


def _work(spec) -> float:
    """Cells written plus element taps (a typical width of 1 for the normalised kinds)."""
    taps = taps_per_element(spec.interpolation, spec.learned_sizes, None, spec.dtype)
    return spec.n_batch * (spec.block + spec.n_dense * spec.count * taps)


@functools.lru_cache(maxsize=1024)
def _layout_arrays(spec):
    """Dense offsets, learned sizes and strides of ``spec`` (depend on shapes only: cached)."""
    sizes = np.asarray(spec.learned_sizes, dtype=np.int64)
    strides = np.asarray(spec.learned_strides, dtype=np.int64)
    return np.array(spec.dense_offsets, dtype=np.int64), sizes, strides


def _layout(spec, work_factor=1):
    """Whether to run the parallel kernel (:data:`PARALLEL_MIN_WORK`), and the layout arguments."""
    parallel = numba.get_num_threads() > 1 and spec.n_batch > 1 and work_factor * _work(spec) >= PARALLEL_MIN_WORK
    n_chunks = min(spec.n_batch, 4 * numba.get_num_threads()) if parallel else 1
    return parallel, (*_layout_arrays(spec), n_chunks, gauss_cut(spec.dtype))


def construct(spec, weight, positions, sigma, out=None):
    kernel = np.empty((spec.n_batch, spec.block), dtype=spec.dtype) if out is None else out
    kind = _element.INTERPOLATION_CODES[spec.interpolation]
    sigma = positions if sigma is None else sigma
    parallel, layout = _layout(spec)
    _run(_construct, parallel, kind, spec.normalised, weight, positions, sigma, kernel, *layout)
    return kernel


def construct_grad(spec, grad_kernel, weight, positions, sigma):
    grad_w = np.empty_like(weight)
    grad_p = np.empty_like(positions)
    grad_s = np.empty_like(positions)
    kind = _element.INTERPOLATION_CODES[spec.interpolation]
    sigma_in = positions if sigma is None else sigma
    parallel, layout = _layout(spec, work_factor=2)
    _run(_construct_grad, parallel, kind, spec.normalised, grad_kernel, weight, positions, sigma_in, grad_w, grad_p,
         grad_s, *layout)
    return grad_w, grad_p, (grad_s if spec.normalised else None)
