"""Backend "numba", operation conv: direct DCLS convolution on the CPU (docs/conv.md).

The kernel ``K`` is never built. Each element is a short list of *taps*: the kernel cells it
touches (its ``2**M`` bilinear corners, its triangle support, its Gaussian support cut at the
rounding of its peak) with the value ``w * prod_j a_j / Z`` it puts there. The input is copied
once into zeros padded by the convolution's padding, and every plane is read on the *wide
grid*: output cell ``y`` at the flat index ``f = y . wide`` of the padded plane (its C-order
strides), so that a tap at kernel cell ``k`` reads input ``f + k . wide``. A tap is then one
contiguous axpy over the whole plane (rows of padded length; the cells past each output row
are computed and dropped), whatever N; short planes hold the batch indices of a cell side by
side, so that one axpy covers the batch (:func:`_interleaved`):

* forward: ``acc[f] += v * x_padded[f + off]``, four or six taps per pass, the cells of the output
  copied out of ``acc`` (every ``stride``-th: a strided convolution is computed at stride 1);
* grad_input: the same gather from the output gradient padded by ``size - 1`` on both sides
  (at stride > 1 spread on the stride-1 grid), tap offsets ``(pad + size - 1 - k) . wide``;
* grad of weight, positions, sigma: ``dL/dK`` at the taps only, six or four dot products per pass of
  the output gradient (on the wide grid, zeros elsewhere) with the padded input; then the
  per-element chain rule of ``construct_grad`` (:func:`ndcls.kernels.cpu._element_chain`).

Taps are built in two passes (count, then fill, parallel over chunks of channel pairs; the
Gaussian rows of ROW_BLOCK elements at a time across SIMD lanes, :func:`ndcls.kernels.cpu._gauss_rows`),
the taps of a channel pair that share a cell merged into one (:meth:`_Taps._merge`), and kept
per thread for the next calls with bitwise the same kernel and element arrays
(:class:`_TapsMemo`: ``conv_grad`` reuses what ``conv`` built). The loops inside a chunk run
as functions compiled without Numba's reference counting (``_nrt=False``), with scratch from
the caller. Every accumulator and element is written by one task in a fixed order: results
are deterministic. Tap values and the forward sums are in the input dtype; profiles, ``Z`` and the
chain rule in float64, the ``dL/dK`` dot products in the input dtype over runs of at most
CHUNK values, summed in float64. Kernels release the GIL.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import types

import numba
import numpy as np
from numba import njit, prange

from ndcls._spec import gauss_cut
from ndcls.kernels import _element
from ndcls.kernels._threads import threads_for
from ndcls.kernels.cpu import (
    _A, _DA_DP, _DA_DS, _FASTMATH, _H_P, _H_S, _LO, _OK, _SUM, _SUM_DP, _SUM_DS, _T, _WIDTH, ROW_BLOCK, ROW_FIELDS,
    _advance, _derivative_scale, _lane, _normalised_gradient, _ratios, _chain_from_profiles, _cut_support, _element_chain,
    _element_scale, _gauss_rows, _profiles, _valid,
)


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _count_taps(kind, positions, sigma, sizes, radius, counts, n_chunks):
    """``counts[b, d, c]``: number of kernel cells element ``(b, d, c)`` touches (0 if invalid).
    Compiled with the flags of :func:`_fill_taps_chunk`, whose scalar path computes the same
    supports (:func:`cpu._profiles`); a block row is used only where it agrees with the count."""
    m, n_batch, n_dense, count = positions.shape
    for chunk in prange(n_chunks):  # chunks of channel pairs: claimed one at a time, not pairs
        for b in range(chunk * n_batch // n_chunks, (chunk + 1) * n_batch // n_chunks):
            for d in range(n_dense):
                for c in range(count):
                    n = 1
                    for j in range(m):
                        p = positions[j, b, d, c]
                        s = sigma[j, b, d, c]
                        if not _valid(kind, p, s):
                            n = 0
                            break
                        lo, hi = _cut_support(kind, p, s, sizes[j], radius)
                        n *= max(hi - lo, 0)
                    counts[b, d, c] = n


@njit(cache=True, parallel=True, nogil=True)
def _fill_taps(kind, normalised, weight, positions, sigma, sizes, learned_axes, dense_axes, dense_cells, radius, start, tap_cell, tap_val, n_chunks):
    """Cells (``tap_cell[t]``: one index per kernel axis) and values of every element's taps,
    element ``e = (b * n_dense + d) * count + c`` at ``[start[e], start[e + 1])``, its support
    box in C order (row 0 of ``positions`` slowest)."""
    m, n_batch, n_dense, count = positions.shape
    n_elements = n_batch * n_dense * count
    for chunk in prange(n_chunks):  # scratch per chunk of channel pairs, not per pair
        b0, b1 = chunk * n_batch // n_chunks, (chunk + 1) * n_batch // n_chunks
        _fill_taps_chunk(
            kind, normalised, weight.reshape(n_elements, 1, 1), positions.reshape(m, n_elements, 1, 1),
            sigma.reshape(m, n_elements, 1, 1), n_dense, count, sizes, learned_axes, dense_axes, dense_cells, radius,
            start, tap_cell, tap_val, b0 * n_dense * count, b1 * n_dense * count, _element_scratch(m, sizes),
            _row_scratch(m),
        )  # fmt: skip


@njit(cache=True, inline="always")
def _element_scratch(m, sizes):
    """Scratch of the per-element path (:func:`ndcls.kernels.cpu._profiles`, ``_element_chain``):
    profile rows ``a``, ``da_dp``, ``da_ds``, ``sums``, ``lo``, ``hi``, strides, odometer, ``u``, ``v``."""
    width = 1
    for j in range(m):
        width = max(width, sizes[j])
    return (
        np.empty((m, width)), np.empty((m, width)), np.empty((m, width)), np.empty((3, m)), np.empty(m, np.int64),
        np.empty(m, np.int64), np.empty(m, np.int64), np.empty(m, np.int64), np.empty(m), np.empty(m),
    )


@njit(cache=True, inline="always")
def _row_scratch(m):
    """Scratch of :func:`ndcls.kernels.cpu._gauss_rows` for ``m`` rows of ROW_BLOCK elements."""
    return np.empty((m, ROW_FIELDS * ROW_BLOCK))


@njit(cache=True, inline="always")
def _block_rows(kind, positions, sigma, sizes, radius, e0, n, with_grad, rows):
    """Gaussian rows of the elements ``[e0, e0 + n)`` along every learned axis into ``rows``
    (:func:`_row_scratch`); False for the other kinds, which take the scalar path."""
    if kind != _element.GAUSS:
        return False
    for j in range(positions.shape[0]):
        _gauss_rows(positions, sigma, j, e0, n, sizes[j], radius, with_grad, rows[j])
    return True


@njit(cache=True, inline="always")
def _row_taps_match(start, e0, n, r):
    """Keep the width of lane ``i`` of row ``r`` only where element ``e0 + i`` (``i < n``) has
    exactly that many taps (else 0: the scalar path decides); returns the widest kept."""
    B = ROW_BLOCK
    last = start.shape[0] - 2
    widest = 0.0
    for i in range(B):
        e = min(e0 + i, last)
        width = r[_lane(_WIDTH * B + i)]
        keep = (i < n) & (float(start[e + 1] - start[e]) == width)
        r[_lane(_WIDTH * B + i)] = width if keep else 0.0
        widest = max(widest, width if keep else 0.0)
    return int(widest)


@njit(cache=True, inline="always")
def _row_chain(kind, g, start, e0, n, weight, sigma, r, grad_w, grad_p, grad_s):
    """:func:`ndcls.kernels.cpu._element_grad` of the elements ``e0 + i``, ``i < n``, of one
    learned Gaussian row (``r``, :func:`cpu._gauss_rows` with gradients), one per lane, from
    ``dL/dK`` at their taps in ``g``. A lane of width 0 gets garbage, for the scalar path to
    overwrite."""
    B = ROW_BLOCK
    n_cells = _row_taps_match(start, e0, n, r)
    last_tap = g.shape[0] - 1
    last = start.shape[0] - 2
    for i in range(B):
        r[_lane(_T * B + i)] = 0.0
        r[_lane(_H_P * B + i)] = 0.0
        r[_lane(_H_S * B + i)] = 0.0
    for k in range(n_cells):  # sums of G * n, G * da_dp, G * da_ds along the row
        for i in range(B):
            gk = g[_lane(min(start[min(e0 + i, last)] + k, last_tap))]
            gk = gk if k < r[_lane(_WIDTH * B + i)] else 0.0
            r[_lane(_T * B + i)] += gk * r[_lane((_A + k) * B + i)]
            r[_lane(_H_P * B + i)] += gk * r[_lane((_DA_DP + k) * B + i)]
            r[_lane(_H_S * B + i)] += gk * r[_lane((_DA_DS + k) * B + i)]
    for i in range(n):  # one row: the other rows' product is 1
        e = e0 + i
        t = r[_lane(_T * B + i)]
        total = r[_lane(_SUM * B + i)]
        ratio, q = _ratios(total)
        scale = _derivative_scale(kind, float(sigma[0, e, 0, 0]))
        w = weight[e, 0, 0]
        grad_w[e, 0, 0] = ratio * t
        grad_p[0, e, 0, 0] = _normalised_gradient(w, t, r[_lane(_H_P * B + i)], r[_lane(_SUM_DP * B + i)], total, 1.0, q, scale)
        grad_s[0, e, 0, 0] = _normalised_gradient(w, t, r[_lane(_H_S * B + i)], r[_lane(_SUM_DS * B + i)], total, 1.0, q, scale)


@njit(cache=True, inline="always")
def _dense_cell(tap_cell, t, e, n_dense, count, dense_axes, dense_cells):
    """Tap ``t`` of element ``e`` (``count`` per dense index, ``n_dense`` dense indices per channel
    pair) at its element's coordinates along the dense axes."""
    if dense_axes.shape[0]:
        d = (e // count) % n_dense
        for q in range(dense_axes.shape[0]):
            tap_cell[t, dense_axes[q]] = dense_cells[d, q]


@njit(cache=True, inline="always")
def _row_taps(normalised, start, e0, n, weight, r, tap_cell, tap_val, learned_axis, dense_axes, dense_cells, n_dense, count):
    """The taps of the elements ``e0 + i``, ``i < n``, of one learned row (``r``,
    :func:`cpu._gauss_rows`) whose row is regular and matches their tap count (the others
    are left to the scalar path, their lanes' widths set to 0)."""
    B = ROW_BLOCK
    _row_taps_match(start, e0, n, r)
    for i in range(n):  # K = w * (S / Z) * n, as in _fill_taps_chunk
        r[_lane(_T * B + i)] = weight[e0 + i, 0, 0] * _element_scale(normalised, r[_lane(_SUM * B + i)])
    for i in range(n):
        width = int(r[_lane(_WIDTH * B + i)])
        e = e0 + i
        t = start[e]
        lo = int(r[_lane(_LO * B + i)])
        scale = r[_lane(_T * B + i)]
        for k in range(width):
            tap_val[t + k] = scale * r[_lane((_A + k) * B + i)]
            tap_cell[t + k, learned_axis] = lo + k
            _dense_cell(tap_cell, t + k, e, n_dense, count, dense_axes, dense_cells)


@njit(cache=True, inline="always")
def _lane_profiles(rows, i, n_taps, with_grad, a, da_dp, da_ds, sums, lo, hi):
    """Element ``i`` of a block of :func:`_block_rows` into the scratch of :func:`cpu._profiles`
    (rows at their cells); returns its ``S``, or 0 where a row is not regular or the box is
    not ``n_taps`` cells (the scalar path then decides)."""
    B = ROW_BLOCK
    m = lo.shape[0]
    box = 1
    for j in range(m):
        box *= int(rows[j, _WIDTH * B + i])
    if box == 0 or box != n_taps:
        return 0.0
    z = 1.0
    for j in range(m):
        r = rows[j]
        lo[j] = int(r[_LO * B + i])
        hi[j] = lo[j] + int(r[_WIDTH * B + i])
        for k in range(hi[j] - lo[j]):
            a[j, lo[j] + k] = r[(_A + k) * B + i]
            if with_grad:
                da_dp[j, lo[j] + k] = r[(_DA_DP + k) * B + i]
                da_ds[j, lo[j] + k] = r[(_DA_DS + k) * B + i]
        for q in range(3):
            sums[q, j] = r[(_SUM + q) * B + i]
        z *= sums[0, j]
    return z


@njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False, error_model="numpy")
def _fill_taps_chunk(
    kind, normalised, weight, positions, sigma, n_dense, count, sizes, learned_axes, dense_axes, dense_cells, radius,
    start, tap_cell, tap_val, e_lo, e_hi, scratch, rows,
):  # fmt: skip
    """:func:`_fill_taps` for the elements ``[e_lo, e_hi)`` (element arrays viewed ``(M, E, 1, 1)``),
    with scratch ``scratch`` (:func:`_element_scratch`) and ``rows`` (:func:`_row_scratch`): a
    block of Gaussian rows at a time (:func:`_block_rows`), else element by element."""
    a, _, _, sums, lo, hi, _, idx, _, _ = scratch
    m = positions.shape[0]
    for e0 in range(e_lo, e_hi, ROW_BLOCK):
        n = min(ROW_BLOCK, e_hi - e0)
        in_block = _block_rows(kind, positions, sigma, sizes, radius, e0, n, False, rows)
        one_row = in_block and m == 1
        if one_row:
            _row_taps(
                normalised, start, e0, n, weight, rows[0], tap_cell, tap_val, learned_axes[0], dense_axes, dense_cells,
                n_dense, count,
            )  # fmt: skip
        for e in range(e0, e0 + n):
            t = start[e]
            if start[e + 1] == t or (one_row and rows[0, _WIDTH * ROW_BLOCK + e - e0] > 0.0):
                continue
            z = _lane_profiles(rows, e - e0, start[e + 1] - t, False, a, a, a, sums, lo, hi) if in_block else 0.0
            status = _OK
            if not z > 0.0:
                status, z = _profiles(kind, normalised, positions, sigma, e, 0, 0, sizes, a, a, a, sums, lo, hi, False, radius)
            if status != _OK:  # a row whose values all underflow to 0: no contribution
                for q in range(t, start[e + 1]):  # cell 0 lies in every kernel, value 0
                    tap_val[q] = 0.0
                    for a_axis in range(tap_cell.shape[1]):
                        tap_cell[q, a_axis] = 0
                continue
            scale = weight[e, 0, 0] * _element_scale(normalised, z)
            for j in range(m):
                idx[j] = lo[j]
            while True:
                value = scale
                for j in range(m):
                    value *= a[j, idx[j]]
                    tap_cell[t, learned_axes[j]] = idx[j]
                _dense_cell(tap_cell, t, e, n_dense, count, dense_axes, dense_cells)
                tap_val[t] = value
                t += 1
                if not _advance(idx, lo, hi, m):
                    break


@njit(cache=True, inline="always")
def _flat_cell(cell, t, strides):
    """C-order flat index of the kernel cell ``cell[t]`` (``strides``: the kernel's)."""
    flat = 0
    for a in range(cell.shape[1]):
        flat += cell[t, a] * strides[a]
    return flat


@njit(cache=True, parallel=True, nogil=True)
def _merge_taps(pair_start, cell, value, strides, n_cells, merged_cell, merged_value, n_merged, local_of_tap, n_chunks):
    """Per channel pair ``q``, the distinct cells of its taps in order of first appearance, each
    with the sum of their values: ``merged_cell``, ``merged_value`` at ``[pair_start[q],
    pair_start[q] + n_merged[q])``; ``local_of_tap[t]``: the index of tap ``t``'s cell among
    them. ``strides``: C-order strides of the kernel (``n_cells`` cells)."""
    n_pairs = pair_start.shape[0] - 1
    n_axes = cell.shape[1]
    for chunk in prange(n_chunks):
        slot = np.full(n_cells, -1, np.int64)  # a cell's index among the pair's distinct cells
        for q in range(chunk * n_pairs // n_chunks, (chunk + 1) * n_pairs // n_chunks):
            first = pair_start[q]
            n = 0
            for t in range(first, pair_start[q + 1]):
                flat = _flat_cell(cell, t, strides)
                at = slot[flat]
                if at < 0:
                    at = n
                    slot[flat] = n
                    n += 1
                    for a in range(n_axes):
                        merged_cell[first + at, a] = cell[t, a]
                    merged_value[first + at] = 0.0
                merged_value[first + at] += value[t]
                local_of_tap[t] = at
            for u in range(first, first + n):  # slots back to -1 for the next pair
                slot[_flat_cell(merged_cell, u, strides)] = -1
            n_merged[q] = n


#: widest run of the flattened output a task accumulates at once (floats; a few KiB, in L1)
CHUNK = 4096
#: every run is a whole number of LANES cells (one AVX-512 register of float32): no scalar
#: remainder loops. The planes a run reads and the accumulators carry LANES cells of zero
#: slack; a run's extra cells read zero padding or slack (adding 0), or land on cells that are
#: never copied out (the dropped cells of the wide rows, the accumulator's slack).
LANES = 16


@njit(cache=True, inline="always")
def _lanes(n):
    return (n + LANES - 1) // LANES * LANES


@njit(cache=True, inline="always")
def _axpy4(acc, at, src, o0, v0, o1, v1, o2, v2, o3, v3, n):
    """``acc[at + q] += sum_k v_k * src[o_k + q]`` for ``q < n``. Flat arrays and unsigned
    indices: no slicing per call and no negative-index wraparound, so LLVM vectorizes."""
    for q in range(n):
        acc[at + q] += v0 * src[o0 + q] + v1 * src[o1 + q] + v2 * src[o2 + q] + v3 * src[o3 + q]


@njit(cache=True, inline="always")
def _axpy6(acc, at, src, o0, v0, o1, v1, o2, v2, o3, v3, o4, v4, o5, v5, n):
    for q in range(n):
        acc[at + q] += (
            v0 * src[o0 + q] + v1 * src[o1 + q] + v2 * src[o2 + q] + v3 * src[o3 + q] + v4 * src[o4 + q] + v5 * src[o5 + q]
        )


@njit(cache=True, inline="always")
def _axpy2(acc, at, src, o0, v0, o1, v1, n):
    for q in range(n):
        acc[at + q] += v0 * src[o0 + q] + v1 * src[o1 + q]


@njit(cache=True, inline="always")
def _axpy1(acc, at, src, o0, v0, n):
    for q in range(n):
        acc[at + q] += v0 * src[o0 + q]


@njit(cache=True, inline="always")
def _tap_run(cell, t, base, sign, wide, data_lo, data_hi):
    """Tap ``t`` reads the source at ``f + off`` for wide-grid cell ``f``, ``off = (base + sign *
    cell) . wide``; returns ``off`` and the rows ``[lo, hi)`` of axis 0 (of the wide grid)
    whose source row lies in ``[data_lo, data_hi)`` (outside it the source is zero padding)."""
    shift = base[0] + sign * cell[t, 0]
    off = shift * wide[0]
    nd = wide.shape[0]
    if nd == 2:  # (unrolled for N <= 3: a loop of one to three turns costs more than the rest)
        off += (base[1] + sign * cell[t, 1]) * wide[1]
    elif nd == 3:
        off += (base[1] + sign * cell[t, 1]) * wide[1] + (base[2] + sign * cell[t, 2]) * wide[2]
    elif nd > 3:
        for a in range(1, nd):
            off += (base[a] + sign * cell[t, a]) * wide[a]
    return off, max(data_lo - shift, 0), data_hi - shift


@njit(cache=True, inline="always")
def _group_size(n, widest):
    """Taps per pass for ``n`` taps left: 6 (if ``widest`` is 6), 4, 2, 1. A 1-D Gaussian of
    width 0.5 in float32 has 5 or 6 taps: one pass where 4 + 2 take two. The gathers pass
    ``widest`` 4 on long planes, where passes of six ran slower (2-D Gaussians; docs/conv.md)."""
    return 6 if n >= 6 and widest >= 6 else (4 if n >= 4 else (2 if n >= 2 else 1))


@njit(cache=True, inline="always")
def _joined(cell, t, base, sign, wide, data_lo, data_hi, f0, f1, lo, hi):
    """Offset of tap ``t`` (:func:`_tap_run`), and ``[lo, hi)`` joined with its rows with data within ``[f0, f1)``."""
    row = wide[0]
    off, first, last = _tap_run(cell, t, base, sign, wide, data_lo, data_hi)
    if first < last and first * row < f1 and last * row > f0:
        lo = min(lo, max(f0, first * row))
        hi = max(hi, min(f1, last * row))
    return off, lo, hi


@njit(cache=True, inline="always")
def _group(cell, t, group, base, sign, wide, data_lo, data_hi, f0, f1):
    """Offsets (:func:`_tap_run`) of the ``group`` taps from ``t`` (unused ones 0), and the
    union ``[lo, hi)`` within ``[f0, f1)`` of their rows with data (empty if ``lo >= hi``)."""
    o1 = o2 = o3 = o4 = o5 = 0
    o0, lo, hi = _joined(cell, t, base, sign, wide, data_lo, data_hi, f0, f1, f1, f0)
    if group > 1:
        o1, lo, hi = _joined(cell, t + 1, base, sign, wide, data_lo, data_hi, f0, f1, lo, hi)
    if group > 2:
        o2, lo, hi = _joined(cell, t + 2, base, sign, wide, data_lo, data_hi, f0, f1, lo, hi)
        o3, lo, hi = _joined(cell, t + 3, base, sign, wide, data_lo, data_hi, f0, f1, lo, hi)
    if group > 4:
        o4, lo, hi = _joined(cell, t + 4, base, sign, wide, data_lo, data_hi, f0, f1, lo, hi)
        o5, lo, hi = _joined(cell, t + 5, base, sign, wide, data_lo, data_hi, f0, f1, lo, hi)
    return o0, o1, o2, o3, o4, o5, lo, hi


@njit(cache=True, inline="always")
def _pair_taps(
    acc, acc_at, acc_step, src, src_at, src_step, n_outer, inner, cell, value, t, end, base, sign, wide, data_lo,
    data_hi, f0, f1, widest,
):  # fmt: skip
    """Add the taps ``[t, end)`` of one channel pair to the run ``[f0, f1)`` of the wide grid,
    six, four, two or one taps per pass (:func:`_group_size`), for ``n_outer`` planes (accumulator and source
    planes ``acc_step``, ``src_step`` apart) of ``inner`` batch-interleaved values per cell
    (:func:`_embed`): one axpy per plane covers ``inner`` batch indices."""
    while t < end:
        group = _group_size(end - t, widest)
        o0, o1, o2, o3, o4, o5, lo, hi = _group(cell, t, group, base, sign, wide, data_lo, data_hi, f0, f1)
        if lo < hi:
            length = np.uint64(_lanes((hi - lo) * inner))
            for n in range(n_outer):
                at = np.uint64(acc_at + n * acc_step + (lo - f0) * inner)
                s = src_at + n * src_step + lo * inner
                if group == 6:
                    _axpy6(
                        acc, at, src, np.uint64(s + o0 * inner), value[t], np.uint64(s + o1 * inner), value[t + 1],
                        np.uint64(s + o2 * inner), value[t + 2], np.uint64(s + o3 * inner), value[t + 3],
                        np.uint64(s + o4 * inner), value[t + 4], np.uint64(s + o5 * inner), value[t + 5], length,
                    )  # fmt: skip
                elif group == 4:
                    _axpy4(
                        acc, at, src, np.uint64(s + o0 * inner), value[t], np.uint64(s + o1 * inner), value[t + 1],
                        np.uint64(s + o2 * inner), value[t + 2], np.uint64(s + o3 * inner), value[t + 3], length,
                    )  # fmt: skip
                elif group == 2:
                    _axpy2(
                        acc, at, src, np.uint64(s + o0 * inner), value[t], np.uint64(s + o1 * inner), value[t + 1], length,
                    )  # fmt: skip
                else:
                    _axpy1(acc, at, src, np.uint64(s + o0 * inner), value[t], length)
        t += group


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _gather(
    src, dst, pair_start, cell, value, transposed, group_in, group_out, base, sign, data_lo, data_hi,
    wide, extent, out_shape, out_step,
):  # fmt: skip
    """``dst[n, c, y] = sum_t value[t] * src[n, s_t, f(y * out_step) + off_t]`` over the taps
    ``t`` of the channel pairs of ``c``: for the forward (``transposed`` False) ``c`` is an output
    channel, its pairs ``c * group_in + j`` and ``s_t`` their input channels; for the input
    gradient ``c`` is an input channel and ``s_t`` the output channels of its pairs.

    ``src``: zero-padded planes (:func:`_embed`), ``(batch // inner, channels, cells * inner)``:
    ``inner`` batch indices interleaved (cell ``f`` of the ``i``-th at ``f * inner + i``; 1: a
    plane per batch index), cells in C order with strides ``wide``, LANES cells of slack. The
    sum runs on the flattened "wide" grid ``f(y) = sum_a y[a] * wide[a]`` (``[0, extent)``,
    rows as long as the padded ones), so every tap is one contiguous axpy per plane (offsets
    and rows from :func:`_tap_run`). The cells of the output grid ``out_shape`` (every
    ``out_step``-th cell of the wide grid) are then copied to ``dst`` (``(batch, channels,
    prod(out_shape))``); the other cells of the wide grid are never read.

    One task per (run of rows, block of planes, block of channels), as large as CHUNK
    accumulator values allow: short planes share a task. A task visits its channel pairs in
    the order they are stored (their taps are read in sequence) and adds their taps in a fixed
    order: results do not depend on the threads.
    """
    n_batch, n_dst, _ = dst.shape
    n_outer, _, plane = src.shape
    inner = n_batch // max(n_outer, 1)
    if n_batch == 0:
        return
    nd = wide.shape[0]
    row = wide[0]
    rows_per_task = max(1, CHUNK // (row * inner))
    n_rows = (extent + row - 1) // row
    n_runs = (n_rows + rows_per_task - 1) // rows_per_task
    run = min(extent, rows_per_task * row) * inner
    per_block = max(1, min(n_outer, CHUNK // run))
    n_blocks = (n_outer + per_block - 1) // per_block
    per_cblock = max(1, CHUNK // (run * per_block))
    n_cblocks = (n_dst + per_cblock - 1) // per_cblock
    ys = _c_strides(out_shape)
    n_src = group_out if transposed else group_in
    flat_src = src.reshape(-1)
    widest = 6 if inner > 1 else 4  # (batch-interleaved planes are the short ones: _interleaved)
    for task in prange(n_cblocks * n_blocks * n_runs):
        c0 = task // (n_blocks * n_runs) * per_cblock
        c1 = min(n_dst, c0 + per_cblock)
        n0 = (task // n_runs) % n_blocks * per_block
        n1 = min(n_outer, n0 + per_block)
        r0 = (task % n_runs) * rows_per_task
        f0 = r0 * row
        f1 = min(extent, (r0 + rows_per_task) * row)
        width = (f1 - f0 + LANES) * inner
        acc = np.zeros((c1 - c0, n1 - n0, width), dtype=dst.dtype)  # [channel, plane, cell, inner]
        flat_acc = acc.reshape(-1)
        # the pairs in memory order (their taps are read in sequence), with no division per pair
        for q in range(n_src if transposed else c1 - c0):
            if transposed:  # q: output channel within the group; c: input channel, its group and index in it
                group = c0 // group_in
                local = c0 % group_in
            for k in range(c1 - c0 if transposed else n_src):
                if transposed:
                    c = c0 + k
                    channel = group * group_out + q
                    pair = channel * group_in + local
                    local += 1
                    if local == group_in:
                        local = 0
                        group += 1
                else:  # c: output channel, k: input channel within its group
                    c = c0 + q
                    channel = (c // group_out) * group_in + k
                    pair = c * group_in + k
                _pair_taps(
                    flat_acc, (c - c0) * (n1 - n0) * width, width, flat_src, (n0 * src.shape[1] + channel) * plane,
                    src.shape[1] * plane, n1 - n0, inner, cell, value, pair_start[pair], pair_start[pair + 1], base,
                    sign, wide, data_lo, data_hi, f0, f1, widest,
                )  # fmt: skip
        # copy the output cells of this run: y[0] with y[0] * out_step[0] in [r0, r0 + rows_per_task)
        s0 = out_step[0]
        y_first = (r0 + s0 - 1) // s0
        y_end = min(out_shape[0], (r0 + rows_per_task + s0 - 1) // s0)
        idx = np.zeros(nd, np.int64)
        for c in range(c0, c1):
            for n in range(n0 * inner, n1 * inner):  # batch index n: plane n // inner, n % inner-th in it
                out = dst[n, c]
                cells_run = acc[c - c0, n // inner - n0, n % inner :]
                for y0 in range(y_first, y_end):
                    idx[0] = y0
                    while True:
                        f = 0
                        d = 0
                        for a in range(nd):
                            f += idx[a] * out_step[a] * wide[a]
                            d += idx[a] * ys[a]
                        f -= f0
                        if nd == 1:
                            out[d] = cells_run[f * inner]
                        else:
                            step = out_step[nd - 1] * inner
                            for q in range(out_shape[nd - 1]):
                                out[d + q] = cells_run[f * inner + q * step]
                        if nd <= 2 or not _advance_inner(idx, out_shape, nd):
                            break


@njit(cache=True, inline="always")
def _advance_inner(idx, shape, nd):
    """Next index over axes ``1 .. nd - 2`` (the last axis is a contiguous run); False when done."""
    for a in range(nd - 2, 0, -1):
        idx[a] += 1
        if idx[a] < shape[a]:
            return True
        idx[a] = 0
    return False


@njit(cache=True, inline="always")
def _dots4(gy, at, x, o0, o1, o2, o3, n, zero):
    """``sum_q gy[at + q] * x[o_k + q]`` for ``q < n``, k = 0..3, summed in the input dtype
    (``zero``'s); flat arrays and unsigned indices as in :func:`_axpy4`."""
    a0 = zero
    a1 = zero
    a2 = zero
    a3 = zero
    for q in range(n):
        g = gy[at + q]
        a0 += g * x[o0 + q]
        a1 += g * x[o1 + q]
        a2 += g * x[o2 + q]
        a3 += g * x[o3 + q]
    return a0, a1, a2, a3


@njit(cache=True, inline="always")
def _dots6(gy, at, x, o0, o1, o2, o3, o4, o5, n, zero):
    a0 = a1 = a2 = a3 = a4 = a5 = zero
    for q in range(n):
        g = gy[at + q]
        a0 += g * x[o0 + q]
        a1 += g * x[o1 + q]
        a2 += g * x[o2 + q]
        a3 += g * x[o3 + q]
        a4 += g * x[o4 + q]
        a5 += g * x[o5 + q]
    return a0, a1, a2, a3, a4, a5


@njit(cache=True, inline="always")
def _dots2(gy, at, x, o0, o1, n, zero):
    a0 = zero
    a1 = zero
    for q in range(n):
        g = gy[at + q]
        a0 += g * x[o0 + q]
        a1 += g * x[o1 + q]
    return a0, a1


@njit(cache=True, inline="always")
def _dot1(gy, at, x, o0, n, zero):
    a0 = zero
    for q in range(n):
        a0 += gy[at + q] * x[o0 + q]
    return a0


@njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False, error_model="numpy")
def _tap_grads(
    flat_gy, flat_x, g_at, g_step, x_at, x_step, n_outer, inner, t, end, cell, base, sign, wide, data_lo, data_hi,
    extent, grad_tap, zero,
):  # fmt: skip
    """``grad_tap[t:end] = sum_n sum_f gy_n[f] * x_n[f + off_t]`` for the taps of one channel pair
    (:func:`_group_size` per pass; offsets and rows from :func:`_tap_run`), over ``n_outer``
    planes of ``gy`` and ``x`` (from ``g_at``, ``x_at``, ``g_step``, ``x_step`` apart) of
    ``inner`` batch-interleaved values per cell (:func:`_embed`), summed in the input dtype
    over runs of at most CHUNK values and in float64 across runs. ``gy`` is zero outside the
    output cells and ``x`` outside the input: a run may be longer than its taps' rows (whole
    LANES)."""
    while t < end:
        group = _group_size(end - t, 6)
        o0, o1, o2, o3, o4, o5, lo, hi = _group(cell, t, group, base, sign, wide, data_lo, data_hi, 0, extent)
        o0 *= inner
        o1 *= inner
        o2 *= inner
        o3 *= inner
        o4 *= inner
        o5 *= inner
        s0 = s1 = s2 = s3 = s4 = s5 = 0.0
        length = _lanes((hi - lo) * inner) if lo < hi else 0
        for n in range(n_outer):
            for r in range(lo * inner, lo * inner + length, CHUNK):
                m = np.uint64(min(CHUNK, lo * inner + length - r))
                g = np.uint64(g_at + n * g_step + r)
                xr = x_at + n * x_step + r
                if group == 6:
                    d0, d1, d2, d3, d4, d5 = _dots6(
                        flat_gy, g, flat_x, np.uint64(xr + o0), np.uint64(xr + o1), np.uint64(xr + o2),
                        np.uint64(xr + o3), np.uint64(xr + o4), np.uint64(xr + o5), m, zero,
                    )  # fmt: skip
                    s0 += d0
                    s1 += d1
                    s2 += d2
                    s3 += d3
                    s4 += d4
                    s5 += d5
                elif group == 4:
                    d0, d1, d2, d3 = _dots4(
                        flat_gy, g, flat_x, np.uint64(xr + o0), np.uint64(xr + o1), np.uint64(xr + o2),
                        np.uint64(xr + o3), m, zero,
                    )  # fmt: skip
                    s0 += d0
                    s1 += d1
                    s2 += d2
                    s3 += d3
                elif group == 2:
                    d0, d1 = _dots2(flat_gy, g, flat_x, np.uint64(xr + o0), np.uint64(xr + o1), m, zero)
                    s0 += d0
                    s1 += d1
                else:
                    s0 += _dot1(flat_gy, g, flat_x, np.uint64(xr + o0), m, zero)
        grad_tap[t] = s0
        if group >= 2:
            grad_tap[t + 1] = s1
        if group >= 4:
            grad_tap[t + 2] = s2
            grad_tap[t + 3] = s3
        if group == 6:
            grad_tap[t + 4] = s4
            grad_tap[t + 5] = s5
        t += group


@njit(cache=True)
def _c_strides(shape):
    """C-order strides (in cells) of an int64 ``shape``; kernels and host code alike."""
    out = np.empty(shape.shape[0], np.int64)
    step = 1
    for a in range(shape.shape[0] - 1, -1, -1):
        out[a] = step
        step *= shape[a]
    return out


@njit(cache=True, parallel=True, nogil=True)
def _grad_elements(
    kind, normalised, gy, x, inner, weight, positions, sigma, sizes, radius, start, pairs, cells, cell_of_tap, origin,
    wide, data_lo, data_hi, extent, group_in, group_out, grad_cells, grad_tap, grad_w, grad_p, grad_s, n_chunks, zero,
):  # fmt: skip
    """Per channel pair: ``dL/dK`` at each of its cells (the correlation of the output gradient
    with the cell's input window over the batch, :func:`_tap_grads`; pair ``q``'s cells
    ``cells[pairs[q]:pairs[q + 1]]``) into ``grad_cells``, then at each tap into ``grad_tap``
    (``grad_cells[cell_of_tap[t]]``, or the same array if ``cell_of_tap`` is empty: the cells
    are the taps, :meth:`_Taps._merge`), then each element's chain rule. ``gy``: output
    gradient on the wide grid, ``x``: padded input, planes of :func:`_embed` (``(batch //
    inner, channels, cells * inner)``). One task per chunk of output channels (``n_chunks`` at
    most the output channels)."""
    m, n_pairs, n_dense, count = positions.shape
    n_out = n_pairs // group_in
    n_elements = n_pairs * n_dense * count
    for chunk in prange(n_chunks):  # scratch per chunk of output channels, not per pair
        _grad_chunk(
            kind, normalised, gy, x, inner, weight.reshape(n_elements, 1, 1), positions.reshape(m, n_elements, 1, 1),
            sigma.reshape(m, n_elements, 1, 1), n_dense * count, sizes, radius, start, pairs, cells, cell_of_tap, origin,
            wide, data_lo, data_hi, extent, group_in, group_out, grad_cells, grad_tap, grad_w.reshape(n_elements, 1, 1),
            grad_p.reshape(m, n_elements, 1, 1), grad_s.reshape(m, n_elements, 1, 1), zero, chunk * n_out // n_chunks,
            (chunk + 1) * n_out // n_chunks, _element_scratch(m, sizes), _row_scratch(m),
        )  # fmt: skip


@njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False, error_model="numpy")
def _grad_chunk(
    kind, normalised, gy, x, inner, weight, positions, sigma, per_pair, sizes, radius, start, pairs, cells, cell_of_tap,
    origin, wide, data_lo, data_hi, extent, group_in, group_out, grad_cells, grad_tap, grad_w, grad_p, grad_s, zero, o0,
    o1, scratch, rows,
):  # fmt: skip
    """:func:`_grad_elements` for the output channels ``[o0, o1)`` (element arrays viewed
    ``(M, E, 1, 1)``, ``per_pair`` elements per channel pair), with scratch ``scratch``
    (:func:`_element_scratch`) and ``rows`` (:func:`_row_scratch`)."""
    n_outer, _, g_plane = gy.shape
    x_plane = x.shape[2]
    flat_gy = gy.reshape(-1)  # (once per chunk: a reshape calls into Numba's runtime)
    flat_x = x.reshape(-1)
    # the pairs in memory order: their taps, and the gradients they write, are read in sequence
    for o in range(o0, o1):
        first_input = (o // group_out) * group_in
        for j in range(group_in):
            pair = o * group_in + j
            _tap_grads(
                flat_gy, flat_x, o * g_plane, gy.shape[1] * g_plane, (first_input + j) * x_plane,
                x.shape[1] * x_plane, n_outer, inner, pairs[pair], pairs[pair + 1], cells, origin, 1, wide, data_lo,
                data_hi, extent, grad_cells, zero,
            )  # fmt: skip
        if cell_of_tap.shape[0]:
            for t in range(start[o * group_in * per_pair], start[(o + 1) * group_in * per_pair]):
                grad_tap[t] = grad_cells[cell_of_tap[t]]
        _chain_range(
            kind, normalised, weight, positions, sigma, sizes, radius, start, o * group_in * per_pair,
            (o + 1) * group_in * per_pair, grad_tap, grad_w, grad_p, grad_s, scratch, rows,
        )  # fmt: skip


@njit(cache=True, inline="always")
def _chain_range(
    kind, normalised, weight, positions, sigma, sizes, radius, start, e_lo, e_hi, grad_tap, grad_w, grad_p, grad_s,
    scratch, rows,
):  # fmt: skip
    """The chain rule of the elements ``[e_lo, e_hi)`` (arrays viewed ``(M, E, 1, 1)``) from
    ``dL/dK`` at their taps (``grad_tap``): :func:`ndcls.kernels.cpu._element_chain`, the
    Gaussian profiles a block at a time (:func:`_block_rows`)."""
    a_, da_dp, da_ds, sums, lo, hi, box, at, u, v = scratch
    for e0 in range(e_lo, e_hi, ROW_BLOCK):
        n = min(ROW_BLOCK, e_hi - e0)
        in_block = _block_rows(kind, positions, sigma, sizes, radius, e0, n, True, rows)
        one_row = in_block and positions.shape[0] == 1
        if one_row:
            _row_chain(kind, grad_tap, start, e0, n, weight, sigma, rows[0], grad_w, grad_p, grad_s)
        for e in range(e0, e0 + n):
            if one_row and rows[0, _WIDTH * ROW_BLOCK + e - e0] > 0.0:
                continue
            z = _lane_profiles(rows, e - e0, start[e + 1] - start[e], True, a_, da_dp, da_ds, sums, lo, hi) if in_block else 0.0
            if z > 0.0:
                _chain_from_profiles(
                    kind, normalised, grad_tap, start[e], box, True, weight, sigma, e, 0, 0, z, a_, da_dp, da_ds, sums,
                    lo, hi, at, u, v, grad_w, grad_p, grad_s,
                )  # fmt: skip
            else:
                _element_chain(
                    kind, normalised, grad_tap, start[e], box, True, weight, positions, sigma, e, 0, 0, sizes, radius,
                    a_, da_dp, da_ds, sums, lo, hi, at, u, v, grad_w, grad_p, grad_s,
                )  # fmt: skip


# -- host side ----------------------------------------------------------------------------------------


def _chunks(n):
    """Chunks of ``n`` channels or channel pairs: many more than threads (claimed dynamically), none empty."""
    return max(1, min(n, 16 * numba.get_num_threads()))


#: largest scratch buffer (bytes) a thread keeps for the next call, per role and dtype
SCRATCH_KEEP = 32 << 20


class _Buffers:
    """Buffers by role and dtype, reused by the next request that needs no more (up to ``keep`` bytes each)."""

    def __init__(self, keep=None):
        self.keep = keep
        self.buffers = {}

    def empty(self, role, shape, dtype):
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        size = math.prod(shape)
        key = (role, dtype.char)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=dtype)
            if self.keep is None or buffer.nbytes <= self.keep:
                self.buffers[key] = buffer
            else:
                self.buffers.pop(key, None)
        return buffer[:size].reshape(shape)

    def zeros(self, role, shape, dtype):
        out = self.empty(role, shape, dtype)
        out.fill(0)
        return out

    def copy(self, role, a):
        out = self.empty(role, a.shape, a.dtype)
        np.copyto(out, a)
        return out

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers.values())


class _Scratch(threading.local, _Buffers):
    """Scratch buffers (padded planes, taps) kept per thread from one call to the next.

    A fresh allocation of a few MiB comes from the OS page by page, and the page faults cost
    as much as the arithmetic: after other large allocations in the process, they were half
    of the time of the ConvNeXt layer's direct forward + backward (18.6 ms against about 9 ms
    in runs of ``ndcls bench --sections conv``). A
    buffer of up to SCRATCH_KEEP bytes is therefore kept, one per role and dtype, and reused
    by the next call on the same thread that needs no more. Nothing handed to the caller is
    scratch, and the roles used within one call are distinct.
    """

    def __init__(self):
        _Buffers.__init__(self, SCRATCH_KEEP)


_SCRATCH = _Scratch()


#: the distinct cells of each channel pair's taps replace the taps in the gathers and dot
#: products where there are at most this fraction of them (:meth:`_Taps._merge`) ...
MERGE_BELOW = 0.9
#: ... looked for where the pairs have at least this many taps per kernel cell (fewer seldom
#: share a cell, and the search visits a slot per kernel cell)
MERGE_MIN_DENSITY = 1 / 16


def _uninitialised(buffers, role, shape, dtype):
    """Storage every tap slot is written into (tests poison it to prove that)."""
    return buffers.empty(role, shape, dtype)


class _Taps:
    """Every element's taps, built from the canonical arrays of a conv call; every array it
    keeps (copies of the element arrays included) is from ``buffers``."""

    def __init__(self, spec, weight, positions, sigma, buffers):
        k = spec.kernel
        full = (k.n_learned, k.n_batch, k.n_dense, k.count)

        def copy(role, a, shape):  # a broadcast to shape, into a buffer
            out = buffers.empty(role, shape, k.dtype)
            np.copyto(out, np.broadcast_to(a, shape))
            return out

        self.kind = _element.INTERPOLATION_CODES[k.interpolation]
        self.normalised = k.normalised
        self.weight = copy("weight", weight, weight.shape).reshape(k.n_batch, k.n_dense, k.count)
        # (M, Po, Pi, D, C) -> (M, O * I, D, C)
        self.positions = copy("positions", positions, (k.n_learned, *k.batch_shape, k.n_dense, k.count)).reshape(full)
        self.sigma = self.positions if sigma is None else copy("sigma", sigma, (k.n_learned, *k.batch_shape, k.n_dense, k.count)).reshape(full)
        self.sizes = np.asarray(k.learned_sizes, dtype=np.int64)
        self.n_chunks = _chunks(k.n_batch)
        self.radius = gauss_cut(k.dtype)
        counts = _SCRATCH.empty("counts", (k.n_batch, k.n_dense, k.count), np.int64)
        _count_taps(self.kind, self.positions, self.sigma, self.sizes, self.radius, counts, self.n_chunks)
        self.start = buffers.empty("start", counts.size + 1, np.int64)
        self.start[0] = 0
        np.cumsum(counts.reshape(-1), out=self.start[1:])
        self.pair_start = np.ascontiguousarray(self.start[:: k.n_dense * k.count])
        n_taps = int(self.start[-1])
        self.cell = _uninitialised(buffers, "tap_cell", (n_taps, k.ndim), np.int64)
        self.value = _uninitialised(buffers, "tap_value", n_taps, k.dtype)
        dense = np.array(k.dense_dims, dtype=np.int64)
        cells = np.indices(k.dense_sizes).reshape(len(k.dense_sizes), -1).T if k.dense_dims else np.zeros((1, 0), np.int64)
        _fill_taps(
            self.kind, self.normalised, self.weight, self.positions, self.sigma, self.sizes,
            np.array(k.learned_dims, dtype=np.int64), dense, np.ascontiguousarray(cells, dtype=np.int64),
            self.radius, self.start, self.cell, self.value, self.n_chunks,
        )  # fmt: skip
        self._merge(k, buffers)

    def _merge(self, k, buffers):
        """The cells the gathers and dot products visit: the taps' own (``pairs``, ``cells``,
        ``values``), or, where the elements of a channel pair share cells (overlapping
        Gaussians, bilinear corners: ConvNeXt's 34 elements have 136 taps on about 108
        distinct cells), each pair's distinct cells with summed values (:func:`_merge_taps`),
        ``cell_of_tap[t]`` the index of tap ``t``'s cell among them (else None)."""
        self.pairs, self.cells, self.values, self.cell_of_tap = self.pair_start, self.cell, self.value, None
        n_taps = self.value.shape[0]
        n_cells = math.prod(k.sizes)
        if n_taps == 0 or k.n_dense * k.count == 1 or n_taps < MERGE_MIN_DENSITY * n_cells * k.n_batch:
            return  # one element per pair (its taps are distinct cells), or too few taps to share cells
        sizes = np.array(k.sizes, dtype=np.int64)
        cell = _SCRATCH.empty("merged_cell", self.cell.shape, np.int64)
        value = _SCRATCH.empty("merged_value", n_taps, k.dtype)
        local = _SCRATCH.empty("cell_of_tap", n_taps, np.int64)
        n_merged = np.empty(len(self.pair_start) - 1, np.int64)
        _merge_taps(self.pair_start, self.cell, self.value, _c_strides(sizes), n_cells, cell, value, n_merged, local, self.n_chunks)
        if n_merged.sum() > MERGE_BELOW * n_taps:
            return
        per_pair = np.diff(self.pair_start)
        keep = np.arange(n_taps) - np.repeat(self.pair_start[:-1], per_pair) < np.repeat(n_merged, per_pair)
        self.pairs = buffers.empty("merged_pairs", len(self.pair_start), np.int64)
        self.pairs[0] = 0
        np.cumsum(n_merged, out=self.pairs[1:])
        n_cells = int(self.pairs[-1])
        self.cells = np.compress(keep, cell, axis=0, out=buffers.empty("merged_cells", (n_cells, k.ndim), np.int64))
        self.values = np.compress(keep, value, out=buffers.empty("merged_values", n_cells, k.dtype))
        self.cell_of_tap = buffers.empty("cell_of_tap", n_taps, np.int64)
        np.add(local, np.repeat(self.pairs[:-1], per_pair), out=self.cell_of_tap)


def _same(a, b):
    """Whether two arrays (or None) are bitwise equal, shapes and dtypes included."""
    if a is None or b is None:
        return a is b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = f"u{a.dtype.itemsize}"
    a, b = a.view(bits), b.view(bits)
    if a.size and (a.item(0) != b.item(0) or a.item(-1) != b.item(-1)):
        return False  # (the usual miss, a parameter update, without a pass over the arrays)
    return bool(np.array_equal(a, b))


#: calls whose taps a thread keeps, and the most memory they may hold in all (bytes)
MEMO_ENTRIES = 8
MEMO_BYTES = 64 << 20


class _TapsMemo(threading.local):
    """The taps of the last MEMO_ENTRIES calls on this thread, for a call whose kernel and
    ``weight``, ``positions``, ``sigma`` are bitwise those of one of them: the backward of a
    layer (``conv_grad``) then reuses what its forward (``conv``) built, rather than building
    the taps a second time, and so does every forward of a layer whose parameters do not
    change (inference). Taps are a function of exactly those arrays, so a reused entry is what
    building them again would give.

    An entry owns its buffers, counted at their full size against MEMO_BYTES; an entry larger
    than that is not kept, and nothing else outlives its entry. An entry a backward has used
    (``spent``: in training, its parameters are about to change) gives its buffers to the next
    new entry of its kernel (the same layer at the next step: same shapes), and so does,
    where a new entry would not fit, the least recently used entry of that kernel: training
    faults in fresh pages for one entry per layer, not until the memo is full."""

    def __init__(self):
        self.entries = []  # most recent first: (kernel spec, weight, positions, sigma, taps, buffers)

    def taps(self, spec, weight, positions, sigma, backward=False):
        """The taps of a call; ``backward``: for ``conv_grad``, after which they are spent."""
        for i, (kernel, w, p, s, taps, _) in enumerate(self.entries):
            if kernel == spec.kernel and _same(w, weight) and _same(p, positions) and _same(s, sigma):
                self.entries.insert(0, self.entries.pop(i))
                taps.spent = taps.spent or backward
                return taps
        buffers = self._recycled(spec.kernel)
        taps = _Taps(spec, weight, positions, sigma, buffers)
        taps.spent = backward
        keys = tuple(None if a is None else buffers.copy(f"key {i}", a) for i, a in enumerate((weight, positions, sigma)))
        if buffers.nbytes <= MEMO_BYTES:
            self.entries.insert(0, (spec.kernel, *keys, taps, buffers))
            while len(self.entries) > MEMO_ENTRIES or self.nbytes > MEMO_BYTES:
                self.entries.pop()
        return taps

    def _recycled(self, kernel):
        """Buffers for a new entry: those of the least recently used spent entry of ``kernel``,
        or, where one more entry of its size would not fit, of its least recently used entry,
        taken out of the memo; else new ones."""
        for i in range(len(self.entries) - 1, -1, -1):
            if self.entries[i][0] == kernel and self.entries[i][4].spent:
                return self.entries.pop(i)[5]
        for i in range(len(self.entries) - 1, -1, -1):
            if self.entries[i][0] == kernel:
                if len(self.entries) >= MEMO_ENTRIES or self.nbytes + self.entries[i][5].nbytes > MEMO_BYTES:
                    return self.entries.pop(i)[5]
                break
        return _Buffers()

    @property
    def nbytes(self):
        return sum(entry[5].nbytes for entry in self.entries)

    def clear(self):
        self.entries.clear()


_MEMO = _TapsMemo()


def _taps(spec, weight, positions, sigma, backward=False):
    """The taps of a call (:class:`_TapsMemo`)."""
    with threads_for(_element_work(spec)):
        return _MEMO.taps(spec, weight, positions, sigma, backward)


class _Grid:
    """The flattened geometry of a call (docs/conv.md, section 6): the input zero-padded to
    ``padded`` (C order, strides ``wide``), tap ``t`` at offset ``cell_t . wide`` into it."""

    def __init__(self, spec):
        self.pad = np.array([lo for lo, _ in spec.padding], dtype=np.int64)
        self.spatial = np.array(spec.spatial, dtype=np.int64)
        self.sizes = np.array(spec.kernel.sizes, dtype=np.int64)
        self.stride = np.array(spec.stride, dtype=np.int64)
        self.out = np.array(spec.out_spatial, dtype=np.int64)
        self.padded = self.spatial + np.array([lo + hi for lo, hi in spec.padding], dtype=np.int64)
        self.full = self.padded - self.sizes + 1  # the output at stride 1
        self.wide = _c_strides(self.padded)
        #: the wide grid the forward accumulates on: up to the last output cell
        self.extent = int(((self.out - 1) * self.stride * self.wide).sum()) + 1

    def padded_input(self, input, interleaved=False):
        """The input inside zeros: planes (:func:`_embed`) of ``prod(padded)`` cells."""
        return _embed("input", input, self.padded, self.pad, np.ones_like(self.stride), interleaved)

    def wide_output(self, output, interleaved=False):
        """An output (gradient) on the wide grid: cell ``y`` at ``y * stride``, zeros elsewhere
        (the rows of the padded input, so that ``f + off`` addresses the tap's input cell)."""
        shape = self.padded.copy()
        shape[0] = self.full[0]
        return _embed("grad_wide", output, shape, np.zeros_like(self.pad), self.stride, interleaved)

    def output_cells(self):
        """Flat wide-grid index of every output cell, C order (``y * stride`` on the wide grid)."""
        grid = np.indices(tuple(int(n) for n in self.out)).reshape(len(self.out), -1)
        return ((grid * self.stride[:, None]) * self.wide[:, None]).sum(axis=0)

    def forward_taps(self):
        """``(base, sign, data_lo, data_hi)`` of :func:`_tap_run` for the forward and ``dL/dK``."""
        return np.zeros_like(self.pad), 1, self.pad[0], self.pad[0] + self.spatial[0]


def _embed(role, a, shape, front, step, interleaved=False):
    """Zeros of ``(batch, channels, *shape)`` with ``a`` placed from ``front`` every ``step``
    cells per axis, flattened to planes of ``prod(shape) + LANES`` cells (zero slack); scratch.

    ``(batch, channels, cells)``, or if ``interleaved`` ``(1, channels, cells * batch)``: the
    batch indices of a cell side by side (:func:`_interleaved`)."""
    size = math.prod(shape)
    window = tuple(slice(f, f + (n - 1) * s + 1, s) for f, n, s in zip(front, a.shape[2:], step))
    batch, channels = a.shape[:2]
    if not interleaved:
        out = _SCRATCH.zeros(role, (batch, channels, size + LANES), a.dtype)
        out[:, :, :size].reshape(batch, channels, *shape)[(slice(None), slice(None), *window)] = a
        return out
    out = _SCRATCH.zeros(role, (1, channels, (size + LANES) * batch), a.dtype)
    if a.size:
        _interleave(
            _planes(a), out, np.array(a.shape[2:], np.int64), _c_strides(np.array(shape, np.int64)),
            np.array(front, np.int64), np.array(step, np.int64),
        )  # fmt: skip
    return out


@njit(cache=True, parallel=True, nogil=True)
def _interleave(a, out, in_shape, strides, front, step):
    """``out[0, c, f(y) * batch + n] = a[n, c, y]`` for every input cell ``y`` (C order), ``f(y) =
    sum_j (front[j] + y[j] * step[j]) * strides[j]`` (:func:`_embed`). (NumPy's copy into the
    interleaved view went element by element, several times slower than the plain copy.)"""
    n_batch, channels, cells = a.shape
    nd = in_shape.shape[0]
    last = in_shape[nd - 1]
    for c in prange(channels):
        idx = np.zeros(nd, np.int64)
        for y in range(0, cells, last):  # one run of the last axis per pass
            f = 0
            for j in range(nd):
                f += (front[j] + idx[j] * step[j]) * strides[j]
            hop = step[nd - 1] * strides[nd - 1] * n_batch
            for n in range(n_batch):
                at = f * n_batch + n
                for q in range(last):
                    out[0, c, at + q * hop] = a[n, c, y + q]
            for j in range(nd - 2, -1, -1):  # the next run: odometer over the other axes
                idx[j] += 1
                if idx[j] < in_shape[j]:
                    break
                idx[j] = 0


def _planes(a):
    return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


#: planes whose wide grid is shorter than this (cells) interleave their batch (:func:`_interleaved`)
INTERLEAVE_BELOW = 1024


def _interleaved(spec, grid):
    """Whether the per-pair kernels of a call read batch-interleaved planes (:func:`_embed`).

    A tap's axpy or dot product then covers every batch index at once. That pays where planes
    are short: the 1-D delays layer (101 cells, batch 2) has 1.1 million taps whose runs of 41
    cells cost their setup more than their arithmetic (docs/conv.md, section 2). On long
    planes the runs are long anyway, and the larger working set of a task (all batch indices
    of its cells) cost time: the ConvNeXt layer (4016 cells) ran slower.
    """
    return spec.batch > 1 and grid.extent < INTERLEAVE_BELOW


def _work(spec, taps, extent):
    """Multiply-adds of one pass over every tap (upper estimate: whole wide grid per tap)."""
    return taps.values.shape[0] * spec.batch * extent + spec.kernel.n_batch * spec.kernel.n_dense * spec.kernel.count


#: operations per element of building its taps (profiles, a few exp for gauss), for :func:`threads_for`
ELEMENT_WORK = 64


def _element_work(spec):
    return spec.kernel.n_batch * spec.kernel.n_dense * spec.kernel.count * ELEMENT_WORK


# -- shared positions: matrix products over channels (docs/conv.md, section 2, "Shared positions") ------

#: Shared positions run as matrix products from this many channels per group (in and out) ...
SHARED_MIN_CHANNELS = 16
#: ... when a channel pair has at least this many taps per distinct cell: a matrix product per
#: cell does the pair's work once per cell, where the per-pair route does it once per tap
#: (overlapping Gaussians at 16 to 64 channels: 1.8x to 5.2x faster; bilinear corners seldom
#: overlap, and there the gain was unreliable, 0.3x to 2.3x; benchmarks/bench_shared_cpu.py)
SHARED_MIN_OVERLAP = 2.0


class _SharedTaps:
    """The taps common to every channel pair, by distinct kernel cell ``u``: offsets ``off[u]``
    on the wide grid, and ``V[u, e]``, the value element ``e = (d, c)`` puts at cell ``u`` for
    a unit weight (:class:`_Taps` of one pair); ``W[u] = sum_e V[u, e] * weight[:, :, e]``,
    ``(O, I)`` per cell, in the input dtype."""

    def __init__(self, spec, grid, weight, positions, sigma):
        k = spec.kernel
        one = types.SimpleNamespace(kernel=dataclasses.replace(k, batch_shape=(1, 1)))
        self.taps = _MEMO.taps(one, np.ones((1, k.n_dense, k.count), k.dtype), positions, sigma)
        self.element = np.repeat(np.arange(k.n_dense * k.count), np.diff(self.taps.start))  # element of each tap
        cells, self.cell_of_tap = np.unique(self.taps.cell, axis=0, return_inverse=True)
        self.cell_of_tap = self.cell_of_tap.reshape(-1)
        self.off = cells @ grid.wide
        self.values = np.zeros((len(cells), k.n_dense * k.count))  # V, float64
        np.add.at(self.values, (self.cell_of_tap, self.element), self.taps.value.astype(np.float64))
        self.weight = weight.reshape(k.n_batch, k.n_dense * k.count).astype(np.float64)  # (O * I, E)
        self.matrices = (self.values @ self.weight.T).reshape(len(cells), spec.out_channels, spec.group_in).astype(k.dtype)


def _shared_taps(spec, grid, weight, positions, sigma):
    """The taps of a call as matrix products (:class:`_SharedTaps`), or None where the per-pair
    route is the faster one: positions or sigma that differ between channel pairs, groups of
    few channels, or taps that seldom share a cell."""
    shared = positions.shape[1] == positions.shape[2] == 1 and (sigma is None or sigma.shape[1] == sigma.shape[2] == 1)
    if not shared or min(spec.group_in, spec.group_out) < SHARED_MIN_CHANNELS:
        return None
    taps = _SharedTaps(spec, grid, weight, positions, sigma)
    return taps if len(taps.element) >= SHARED_MIN_OVERLAP * len(taps.off) else None


def _group_slices(spec, g):
    return slice(g * spec.group_out, (g + 1) * spec.group_out), slice(g * spec.group_in, (g + 1) * spec.group_in)


def _conv_shared(spec, grid, shared, input, out):
    """conv of shared taps: per group and distinct cell, ``Y[:, o, f] += W[u] @ X[:, i, f + off[u]]``
    on the wide grid (a batched matrix product), then the output cells copied out."""
    x = grid.padded_input(input)
    wide_out = np.zeros((spec.batch, spec.out_channels, grid.extent), dtype=spec.dtype)
    product = np.empty((spec.batch, spec.group_out, grid.extent), dtype=spec.dtype)
    for g in range(spec.groups):
        o, i = _group_slices(spec, g)
        for u, off in enumerate(shared.off):
            np.matmul(shared.matrices[u, o], x[:, i, off : off + grid.extent], out=product)
            wide_out[:, o] += product
    out[...] = np.take(wide_out, grid.output_cells(), axis=2).reshape(out.shape)
    return out


def _conv_grad_shared(spec, grid, shared, grad_output, input, sigma):
    """conv_grad of shared taps: the input gradient ``GX[:, i, f + off[u]] += W[u].T @ GY[:, o, f]``,
    ``dL/dK`` per cell ``G[u] = sum_n GY[n, o, :] @ X[n, i, off[u]:].T`` (matrix products), then
    ``dL/dw = G V``, and the chain rule of each shared element with ``dL/dK`` at its taps
    ``sum_{o, i} w[o, i, e] G[u][o, i]`` (the gradient is linear in the weight)."""
    k = spec.kernel
    x = grid.padded_input(input)
    gy = grid.wide_output(grad_output)[:, :, : grid.extent]
    padded = math.prod(grid.padded)
    grad_x = np.zeros((spec.batch, spec.in_channels, padded), dtype=spec.dtype)
    grad_k = np.empty((len(shared.off), spec.out_channels, spec.group_in))  # G, float64
    back = np.empty((spec.batch, spec.group_in, grid.extent), dtype=spec.dtype)
    for g in range(spec.groups):
        o, i = _group_slices(spec, g)
        for u, off in enumerate(shared.off):
            np.matmul(shared.matrices[u, o].T, gy[:, o], out=back)
            grad_x[:, i, off : off + grid.extent] += back
            grad_k[u, o] = np.matmul(gy[:, o], x[:, i, off : off + grid.extent].transpose(0, 2, 1)).sum(axis=0)
    window = tuple(slice(p, p + n) for p, n in zip(grid.pad, grid.spatial))
    grad_input = np.ascontiguousarray(grad_x.reshape(spec.batch, spec.in_channels, *grid.padded)[(..., *window)])
    flat_k = grad_k.reshape(len(shared.off), k.n_batch)  # (U, O * I)
    grad_w = (flat_k.T @ shared.values).reshape(k.n_batch, k.n_dense, k.count).astype(spec.dtype)
    grad_tap = (flat_k @ shared.weight)[shared.cell_of_tap, shared.element]  # (taps,) float64
    taps = shared.taps
    grad_p = np.empty(taps.positions.shape, dtype=spec.dtype)
    grad_s = np.empty(taps.positions.shape, dtype=spec.dtype)
    unit = np.empty((1, k.n_dense, k.count))  # dL/dw of the unit weights (unused: the weights get G V)
    _chain_rule(
        taps.kind, taps.normalised, taps.weight, taps.positions, taps.sigma, taps.sizes, taps.radius, taps.start,
        grad_tap, unit, grad_p, grad_s,
    )  # fmt: skip
    invalid = ~np.isfinite(taps.positions).all(axis=0)  # (1, D, C)
    if sigma is not None:
        invalid |= ~(np.isfinite(taps.sigma) & (taps.sigma > 0)).all(axis=0)
    grad_w[:, invalid[0]] = np.nan  # as on the per-pair route: an invalid element's gradients are NaN
    shape = (k.n_learned, 1, 1, k.n_dense, k.count)
    return grad_input, grad_w, grad_p.reshape(shape), None if sigma is None else grad_s.reshape(shape)


@njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _chain_rule(kind, normalised, weight, positions, sigma, sizes, radius, start, grad_tap, grad_w, grad_p, grad_s):
    """:func:`_chain_range` of the one channel pair of ``positions`` ``(M, 1, D, C)``."""
    m, _, n_dense, count = positions.shape
    n = n_dense * count
    _chain_range(
        kind, normalised, weight.reshape(n, 1, 1), positions.reshape(m, n, 1, 1), sigma.reshape(m, n, 1, 1), sizes,
        radius, start, 0, n, grad_tap, grad_w.reshape(n, 1, 1), grad_p.reshape(m, n, 1, 1), grad_s.reshape(m, n, 1, 1),
        _element_scratch(m, sizes), _row_scratch(m),
    )  # fmt: skip


def conv(spec, input, weight, positions, sigma, out=None):
    if out is None:
        out = np.empty(spec.output_shape, dtype=spec.dtype)
    grid = _Grid(spec)
    shared = _shared_taps(spec, grid, weight, positions, sigma)
    if shared is not None:
        return _conv_shared(spec, grid, shared, input, out)
    taps = _taps(spec, weight, positions, sigma)
    with threads_for(_work(spec, taps, grid.extent)):
        _gather(
            grid.padded_input(input, _interleaved(spec, grid)), _planes(out), taps.pairs, taps.cells, taps.values, False,
            spec.group_in, spec.group_out, *grid.forward_taps(), grid.wide, grid.extent, grid.out, grid.stride,
        )  # fmt: skip
    return out


def _grad_input(spec, grid, taps, grad_output):
    """The transposed convolution as a gather from the output gradient zero-padded by
    ``margin = size - 1`` (at stride > 1 placed every ``stride`` cells of the stride-1 grid):
    tap ``t`` reads it at ``(pad + margin - cell_t) . wide``."""
    margin = grid.sizes - 1
    padded = grid.full + 2 * margin
    wide = _c_strides(padded)
    extent = int(((grid.spatial - 1) * wide).sum()) + 1
    grad_input = np.empty(spec.input_shape, dtype=spec.dtype)
    source = _embed("grad_padded", grad_output, padded, margin, grid.stride, _interleaved(spec, grid))
    _gather(
        source, _planes(grad_input), taps.pairs, taps.cells, taps.values, True, spec.group_in, spec.group_out,
        grid.pad + margin, -1, margin[0], margin[0] + grid.full[0], wide, extent, grid.spatial, np.ones_like(grid.stride),
    )  # fmt: skip
    return grad_input


def conv_grad(spec, grad_output, input, weight, positions, sigma):
    grid = _Grid(spec)
    shared = _shared_taps(spec, grid, weight, positions, sigma)
    if shared is not None:
        return _conv_grad_shared(spec, grid, shared, grad_output, input, sigma)
    k = spec.kernel
    taps = _taps(spec, weight, positions, sigma, backward=True)
    with threads_for(_work(spec, taps, grid.extent)):
        grad_input = _grad_input(spec, grid, taps, grad_output)
        grad_tap = _SCRATCH.empty("grad_tap", taps.value.shape[:1], np.float64)
        merged = taps.cell_of_tap is not None
        grad_cells = _SCRATCH.empty("grad_cells", taps.values.shape[:1], np.float64) if merged else grad_tap
        cell_of_tap = taps.cell_of_tap if merged else np.empty(0, np.int64)
        grad_w = np.empty((k.n_batch, k.n_dense, k.count), dtype=spec.dtype)
        grad_p = np.empty(taps.positions.shape, dtype=spec.dtype)
        grad_s = np.empty(taps.positions.shape, dtype=spec.dtype)
        base, _, data_lo, data_hi = grid.forward_taps()
        interleaved = _interleaved(spec, grid)
        _grad_elements(
            taps.kind, taps.normalised, grid.wide_output(grad_output, interleaved),
            grid.padded_input(input, interleaved), spec.batch if interleaved else 1, taps.weight, taps.positions, taps.sigma,
            taps.sizes, taps.radius, taps.start, taps.pairs, taps.cells, cell_of_tap, base, grid.wide, data_lo, data_hi,
            grid.extent, spec.group_in, spec.group_out, grad_cells, grad_tap, grad_w, grad_p, grad_s,
            _chunks(spec.out_channels), spec.dtype.type(0),
        )  # fmt: skip
    return (
        grad_input,
        grad_w,
        spec.sum_to(grad_p, positions.shape),
        None if sigma is None else spec.sum_to(grad_s, sigma.shape),
    )
