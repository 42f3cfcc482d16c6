"""Backend "numba": CPU kernels compiled with Numba, parallel over the batch.

One generic pair of kernels serves every N, M and interpolation. A bilinear element scatters
(forward) or gathers (backward) its ``2**M`` corners directly. A triangle or Gaussian element
gets a 1-D profile per learned axis over its support (the cells within ``sigma`` for triangle,
the cells within the cut radius for gauss (``ndcls.gauss_cut``: beyond it every value is
below the rounding of the element's peak), built with 4 calls of ``exp`` by recurrence), and is scattered or
gathered over the product of those supports. No dense intermediate: the forward pass zeroes
each batch block of ``K`` and adds into it while it is in cache; the backward writes each
element's gradients once (no races, deterministic). Small calls run on one thread and
large ones claim loop iterations dynamically (:mod:`._threads`); the kernels release the GIL. Arithmetic is in float64 whatever the
input dtype. The per-element maths is :mod:`ndcls.kernels._element`, inlined here; the per-element chain
rule :func:`_element_grad` serves ``construct_grad`` and ``conv_grad`` (:mod:`.cpu_conv`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ndcls._spec import EPS, gauss_cut, taps_per_element
from ndcls.kernels import _element
from ndcls.kernels._threads import threads_for

_valid = njit(cache=True, inline="always")(_element.element_valid)
_cut_support = njit(cache=True, inline="always")(_element.cut_support)
_fill = njit(cache=True, inline="always")(_element.fill_profile)
_bilinear_cell = njit(cache=True, inline="always")(_element.bilinear_cell)
_advance = njit(cache=True, inline="always")(_element.advance)
_quotient_rule = njit(cache=True, inline="always")(_element.quotient_rule)

_INVALID, _EMPTY, _OK = 0, 1, 2
# Reassociation and contraction let LLVM vectorise the inner sums; no flag assumes finite
# values, so NaN and inf propagate as without fastmath.
_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, inline="always")
def _profiles(kind, normalised, positions, sigma, b, d, c, sizes, a, da_dp, da_ds, sums, lo, hi, with_grad, radius):
    """Profiles of element ``(b, d, c)`` along every learned axis; returns ``(status, Z)``.

    A Gaussian is cut at ``radius`` widths (:func:`ndcls._spec.gauss_cut`; inf: whole axes).
    ``sums[0, j]``, ``sums[1, j]``, ``sums[2, j]``: sums of ``a``, ``da_dp``, ``da_ds`` along row j.
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
        z *= sums[0, j]
    if normalised:
        return _OK, z + EPS
    return _OK, 1.0


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


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
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
                    status, z = _profiles(
                        kind, normalised, positions, sigma, b, d, c, sizes, a, a, a, sums, lo, hi, False, radius
                    )
                    if status != _OK:
                        continue
                    scale = weight[b, d, c] / z
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
def _element_grad(normalised, g, base, strides, w, z, lo, hi, a, da_dp, da_ds, sums, idx, u, v):
    """Chain rule of one element, from ``dL/dK`` over its support and its profiles (:func:`_profiles`).

    ``dL/dK`` at learned cell ``idx`` (``lo <= idx < hi``) is ``g[base + sum_j idx[j] * strides[j]]``
    (``construct_grad``: the kernel block; ``conv_grad``: the correlation at the element's taps).
    Returns ``dL/dw``; leaves ``dL/dp_j`` in ``u[j]`` and ``dL/ds_j`` in ``v[j]``.
    """
    m = lo.shape[0]
    last = m - 1
    t = 0.0
    u[:] = 0.0
    v[:] = 0.0
    idx[:] = lo
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
    for j in range(m):
        if normalised:
            others = 1.0
            for k in range(m):
                if k != j:
                    others *= sums[0, k]
            u[j] = _quotient_rule(w, t, z, u[j], sums[1, j], others)
            v[j] = _quotient_rule(w, t, z, v[j], sums[2, j], others)
        else:
            u[j] = w * u[j]
    return t / z


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _construct_grad(
    kind, normalised, grad_kernel, weight, positions, sigma, grad_w, grad_p, grad_s, dense_offsets, sizes, strides, n_chunks, radius
):
    n_batch, n_dense, count = weight.shape
    m = positions.shape[0]
    last = m - 1
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
        u = np.empty(m)  # sum of G * d(prod a)/dp_j over the support
        v = np.empty(m)  # sum of G * d(prod a)/ds_j
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
                    status, z = _profiles(
                        kind, normalised, positions, sigma, b, d, c, sizes, a, da_dp, da_ds, sums, lo, hi, True, radius
                    )
                    if status != _OK:
                        fill = np.nan if status == _INVALID else 0.0
                        grad_w[b, d, c] = fill
                        for j in range(m):
                            grad_p[j, b, d, c] = fill
                            grad_s[j, b, d, c] = fill
                        continue
                    grad_w[b, d, c] = _element_grad(
                        normalised, g_block, dense_offsets[d], strides, weight[b, d, c], z, lo, hi, a, da_dp, da_ds, sums, idx, u, v
                    )
                    for j in range(m):
                        grad_p[j, b, d, c] = u[j]
                        grad_s[j, b, d, c] = v[j]


def _layout(spec):
    sizes = np.asarray(spec.learned_sizes, dtype=np.int64)
    strides = np.asarray(spec.learned_strides, dtype=np.int64)
    n_chunks = min(spec.n_batch, 4 * numba.get_num_threads())
    return np.array(spec.dense_offsets), sizes, strides, n_chunks, gauss_cut(spec.dtype)


def _work(spec):
    """Cells written plus element taps (a typical width of 1 for the normalised kinds)."""
    taps = taps_per_element(spec.interpolation, spec.learned_sizes, None, spec.dtype)
    return spec.n_batch * (spec.block + spec.n_dense * spec.count * taps)


def construct(spec, weight, positions, sigma, out=None):
    kernel = np.empty((spec.n_batch, spec.block), dtype=spec.dtype) if out is None else out
    kind = _element.INTERPOLATION_CODES[spec.interpolation]
    sigma = positions if sigma is None else sigma
    with threads_for(_work(spec)):
        _construct(kind, spec.normalised, weight, positions, sigma, kernel, *_layout(spec))
    return kernel


def construct_grad(spec, grad_kernel, weight, positions, sigma):
    grad_w = np.empty_like(weight)
    grad_p = np.empty_like(positions)
    grad_s = np.empty_like(positions)
    kind = _element.INTERPOLATION_CODES[spec.interpolation]
    sigma_in = positions if sigma is None else sigma
    with threads_for(2 * _work(spec)):
        _construct_grad(kind, spec.normalised, grad_kernel, weight, positions, sigma_in, grad_w, grad_p, grad_s, *_layout(spec))
    return grad_w, grad_p, (grad_s if spec.normalised else None)
