"""Backend "numba", operation conv: direct DCLS convolution on the CPU (docs/conv.md).

The kernel ``K`` is never built. Each element is a short list of *taps*: the kernel cells it
touches (its ``2**M`` bilinear corners, its triangle support, its Gaussian support cut at the
rounding of its peak) with the value ``w * prod_j a_j / Z`` it puts there. Then

* forward: each output plane ``(n, o)`` is the sum, over the input channels of its group and
  the taps of each channel pair, of the tap value times the input window the tap's cell
  selects (an axpy over the output plane);
* grad_input: each input plane ``(n, c)`` gets the same taps transposed (the window of the
  output gradient scattered back);
* grad of weight, positions, sigma: ``dL/dK`` is needed at the taps only: the correlation of
  the output gradient with the tap's input window, summed over the batch; then the per-element
  chain rule of ``construct_grad`` (:func:`ndcls.kernels.cpu._element_grad`) turns it into
  the element's gradients.

Taps are built once per call (two passes: count, then fill, both parallel over channel pairs).
Every output plane, input plane and element is written by one thread in a fixed order:
results are deterministic. Tap values and the forward sums are in the input dtype; profiles,
``Z`` and the ``dL/dK`` correlations in float64. Kernels release the GIL.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ndcls._spec import gauss_cut
from ndcls.kernels import _element
from ndcls.kernels._threads import threads_for
from ndcls.kernels.cpu import (
    _FASTMATH, _INVALID, _OK, _advance, _cut_support, _element_grad, _element_scale, _profiles, _valid,
)


@njit(cache=True, parallel=True, nogil=True)
def _count_taps(kind, positions, sigma, sizes, radius, counts):
    """``counts[b, d, c]``: number of kernel cells element ``(b, d, c)`` touches (0 if invalid)."""
    m, n_batch, n_dense, count = positions.shape
    for b in prange(n_batch):
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


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _fill_taps(kind, normalised, weight, positions, sigma, sizes, learned_axes, dense_axes, dense_cells, radius, start, tap_cell, tap_val, n_chunks):
    """Cells (``tap_cell[t]``: one index per kernel axis) and values of every element's taps,
    element ``e = (b * n_dense + d) * count + c`` at ``[start[e], start[e + 1])``, its support
    box in C order (row 0 of ``positions`` slowest)."""
    m, n_batch, n_dense, count = positions.shape
    width = 1
    for j in range(m):
        width = max(width, sizes[j])
    for chunk in prange(n_chunks):  # scratch per chunk of channel pairs, not per pair
        a = np.empty((m, width))
        sums = np.empty((3, m))
        lo = np.empty(m, np.int64)
        hi = np.empty(m, np.int64)
        idx = np.empty(m, np.int64)
        for b in range(chunk * n_batch // n_chunks, (chunk + 1) * n_batch // n_chunks):
            for d in range(n_dense):
                for c in range(count):
                    e = (b * n_dense + d) * count + c
                    t = start[e]
                    if start[e + 1] == t:
                        continue
                    status, z = _profiles(kind, normalised, positions, sigma, b, d, c, sizes, a, a, a, sums, lo, hi, False, radius)
                    if status != _OK:  # a row whose values all underflow to 0: no contribution
                        for q in range(t, start[e + 1]):  # cell 0 lies in every kernel, value 0
                            tap_val[q] = 0.0
                            for a_axis in range(tap_cell.shape[1]):
                                tap_cell[q, a_axis] = 0
                        continue
                    scale = weight[b, d, c] * _element_scale(normalised, z)
                    idx[:] = lo
                    while True:
                        value = scale
                        for j in range(m):
                            value *= a[j, idx[j]]
                            tap_cell[t, learned_axes[j]] = idx[j]
                        for q in range(dense_axes.shape[0]):
                            tap_cell[t, dense_axes[q]] = dense_cells[d, q]
                        tap_val[t] = value
                        t += 1
                        if not _advance(idx, lo, hi, m):
                            break


@njit(cache=True, inline="always")
def _tap_window(cell, stride, pad, xshape, yshape, xs, ys, count):
    """Output cells that tap ``cell`` reaches inside the input: per axis ``count[a]`` cells
    from the first one; returns ``(ok, input offset, output offset)`` of that first cell.

    Output cell ``y`` reads input cell ``y * stride + cell - pad``; only the ``y`` for which
    it lies in ``[0, xshape)`` are visited (zero padding costs nothing)."""
    src = 0
    dst = 0
    for a in range(stride.shape[0]):
        off = cell[a] - pad[a]
        s = stride[a]
        first = 0 if off >= 0 else (s - 1 - off) // s
        end = min(yshape[a], (xshape[a] - 1 - off) // s + 1)
        if end <= first:
            return False, 0, 0
        count[a] = end - first
        src += (first * s + off) * xs[a]
        dst += first * ys[a]
    return True, src, dst


@njit(cache=True, inline="always")
def _c_strides(shape):
    out = np.empty(shape.shape[0], np.int64)
    step = 1
    for a in range(shape.shape[0] - 1, -1, -1):
        out[a] = step
        step *= shape[a]
    return out


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _forward(x, out, pair_start, tap_cell, tap_val, group_in, group_out, stride, pad, xshape, yshape):
    """``out[n, o] = sum_i sum_taps value * window(x[n, g * group_in + i])``; x, out flat per plane."""
    n_batch, n_out, _ = out.shape
    nd = stride.shape[0]
    last = nd - 1
    xs = _c_strides(xshape)
    ys = _c_strides(yshape)
    for o in prange(n_out):  # one task per output channel: its planes for every batch index
        g = o // group_out
        count = np.empty(nd, np.int64)
        zero = np.zeros(nd, np.int64)
        idx = np.zeros(nd, np.int64)
        step = np.empty(nd, np.int64)
        for a in range(nd):
            step[a] = stride[a] * xs[a]
        for n in range(n_batch):
            out[n, o, :] = 0
        sl = step[last]
        for i in range(group_in):
            pair = o * group_in + i
            for t in range(pair_start[pair], pair_start[pair + 1]):
                ok, s0, d0 = _tap_window(tap_cell[t], stride, pad, xshape, yshape, xs, ys, count)
                if not ok:
                    continue
                v = tap_val[t]
                for n in range(n_batch):  # the tap's window is the same for every batch index
                    src = x[n, g * group_in + i]
                    plane = out[n, o]
                    idx[:] = 0
                    while True:
                        so = s0
                        do = d0
                        for a in range(last):
                            so += idx[a] * step[a]
                            do += idx[a] * ys[a]
                        if sl == 1:
                            for q in range(count[last]):
                                plane[do + q] += v * src[so + q]
                        else:
                            for q in range(count[last]):
                                plane[do + q] += v * src[so + q * sl]
                        if not _advance(idx, zero, count, last):
                            break


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _grad_input(grad_out, grad_x, pair_start, tap_cell, tap_val, group_in, group_out, stride, pad, xshape, yshape):
    """The transposed taps: ``grad_x[n, c] = sum_o sum_taps value * window^T(grad_out[n, o])``."""
    n_batch, n_in, _ = grad_x.shape
    nd = stride.shape[0]
    last = nd - 1
    xs = _c_strides(xshape)
    ys = _c_strides(yshape)
    for ci in prange(n_in):  # one task per input channel: its planes for every batch index
        g = ci // group_in
        i = ci % group_in
        count = np.empty(nd, np.int64)
        zero = np.zeros(nd, np.int64)
        idx = np.zeros(nd, np.int64)
        step = np.empty(nd, np.int64)
        for a in range(nd):
            step[a] = stride[a] * xs[a]
        for n in range(n_batch):
            grad_x[n, ci, :] = 0
        sl = step[last]
        for oo in range(group_out):
            o = g * group_out + oo
            pair = o * group_in + i
            for t in range(pair_start[pair], pair_start[pair + 1]):
                ok, x0, y0 = _tap_window(tap_cell[t], stride, pad, xshape, yshape, xs, ys, count)
                if not ok:
                    continue
                v = tap_val[t]
                for n in range(n_batch):
                    src = grad_out[n, o]
                    plane = grad_x[n, ci]
                    idx[:] = 0
                    while True:
                        xo = x0
                        yo = y0
                        for a in range(last):
                            xo += idx[a] * step[a]
                            yo += idx[a] * ys[a]
                        if sl == 1:
                            for q in range(count[last]):
                                plane[xo + q] += v * src[yo + q]
                        else:
                            for q in range(count[last]):
                                plane[xo + q * sl] += v * src[yo + q]
                        if not _advance(idx, zero, count, last):
                            break


@njit(cache=True, parallel=True, nogil=True, fastmath=_FASTMATH)
def _grad_elements(
    kind, normalised, grad_out, x, weight, positions, sigma, sizes, radius, start, tap_cell,
    group_in, group_out, stride, pad, xshape, yshape, grad_tap, grad_w, grad_p, grad_s, n_chunks,
):  # fmt: skip
    """Per channel pair: ``dL/dK`` at each tap (the correlation of the output gradient with the
    tap's input window over the batch) into ``grad_tap``, then each element's chain rule."""
    m, n_pairs, n_dense, count = positions.shape
    n_batch = x.shape[0]
    nd = stride.shape[0]
    last = nd - 1
    xs = _c_strides(xshape)
    ys = _c_strides(yshape)
    width = 1
    for j in range(m):
        width = max(width, sizes[j])
    for chunk in prange(n_chunks):  # scratch per chunk of channel pairs, not per pair
        cnt = np.empty(nd, np.int64)
        zero = np.zeros(nd, np.int64)
        idx = np.zeros(nd, np.int64)
        step = np.empty(nd, np.int64)
        for a in range(nd):
            step[a] = stride[a] * xs[a]
        sl = step[last]
        a_ = np.empty((m, width))
        da_dp = np.empty((m, width))
        da_ds = np.empty((m, width))
        sums = np.empty((3, m))
        lo = np.empty(m, np.int64)
        hi = np.empty(m, np.int64)
        box = np.empty(m, np.int64)
        at = np.empty(m, np.int64)
        u = np.empty(m)
        v = np.empty(m)
        for pair in range(chunk * n_pairs // n_chunks, (chunk + 1) * n_pairs // n_chunks):
            o = pair // group_in
            ci = (o // group_out) * group_in + pair % group_in
            for t in range(start[pair * n_dense * count], start[(pair + 1) * n_dense * count]):
                ok, s0, d0 = _tap_window(tap_cell[t], stride, pad, xshape, yshape, xs, ys, cnt)
                total = 0.0
                if ok:
                    for n in range(n_batch):
                        src = x[n, ci]
                        gy = grad_out[n, o]
                        idx[:] = 0
                        while True:
                            so = s0
                            do = d0
                            for a in range(last):
                                so += idx[a] * step[a]
                                do += idx[a] * ys[a]
                            acc = 0.0
                            if sl == 1:
                                for q in range(cnt[last]):
                                    acc += gy[do + q] * src[so + q]
                            else:
                                for q in range(cnt[last]):
                                    acc += gy[do + q] * src[so + q * sl]
                            total += acc
                            if not _advance(idx, zero, cnt, last):
                                break
                grad_tap[t] = total
            # the chain rule of every element of this pair, from dL/dK at its taps
            for d in range(n_dense):
                for c in range(count):
                    e = (pair * n_dense + d) * count + c
                    status, z = _profiles(kind, normalised, positions, sigma, pair, d, c, sizes, a_, da_dp, da_ds, sums, lo, hi, True, radius)
                    if status != _OK:
                        fill = np.nan if status == _INVALID else 0.0
                        grad_w[pair, d, c] = fill
                        for j in range(m):
                            grad_p[j, pair, d, c] = fill
                            grad_s[j, pair, d, c] = fill
                        continue
                    base = start[e]
                    stride_j = 1
                    for j in range(m - 1, -1, -1):  # the element's taps: its support box in C order
                        box[j] = stride_j
                        base -= lo[j] * stride_j
                        stride_j *= hi[j] - lo[j]
                    grad_w[pair, d, c] = _element_grad(
                        kind, normalised, grad_tap, base, box, weight[pair, d, c], z, sigma, pair, d, c,
                        lo, hi, a_, da_dp, da_ds, sums, at, u, v,
                    )
                    for j in range(m):
                        grad_p[j, pair, d, c] = u[j]
                        grad_s[j, pair, d, c] = v[j]


# -- host side ----------------------------------------------------------------------------------------


def _chunks(n_pairs):
    """Chunks of channel pairs: many more than threads (claimed dynamically), none empty."""
    return max(1, min(n_pairs, 16 * numba.get_num_threads()))


def _uninitialised(shape, dtype):
    """Storage every tap slot is written into (tests poison it to prove that)."""
    return np.empty(shape, dtype=dtype)


class _Taps:
    """Every element's taps, built from the canonical arrays of a conv call."""

    def __init__(self, spec, weight, positions, sigma):
        k = spec.kernel
        full = (k.n_learned, k.n_batch, k.n_dense, k.count)

        def expand(a):  # (M, Po, Pi, D, C) -> (M, O * I, D, C)
            return np.ascontiguousarray(np.broadcast_to(a, (k.n_learned, *k.batch_shape, k.n_dense, k.count))).reshape(full)

        self.kind = _element.INTERPOLATION_CODES[k.interpolation]
        self.normalised = k.normalised
        self.weight = weight.reshape(k.n_batch, k.n_dense, k.count)
        self.positions = expand(positions)
        self.sigma = self.positions if sigma is None else expand(sigma)
        self.sizes = np.asarray(k.learned_sizes, dtype=np.int64)
        self.n_chunks = _chunks(k.n_batch)
        self.radius = gauss_cut(k.dtype)
        counts = np.empty((k.n_batch, k.n_dense, k.count), dtype=np.int64)
        _count_taps(self.kind, self.positions, self.sigma, self.sizes, self.radius, counts)
        self.start = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts.reshape(-1), out=self.start[1:])
        self.pair_start = np.ascontiguousarray(self.start[:: k.n_dense * k.count])
        n_taps = int(self.start[-1])
        self.cell = _uninitialised((n_taps, k.ndim), np.int64)
        self.value = _uninitialised(n_taps, k.dtype)
        dense = np.array(k.dense_dims, dtype=np.int64)
        cells = np.indices(k.dense_sizes).reshape(len(k.dense_sizes), -1).T if k.dense_dims else np.zeros((1, 0), np.int64)
        _fill_taps(
            self.kind, self.normalised, self.weight, self.positions, self.sigma, self.sizes,
            np.array(k.learned_dims, dtype=np.int64), dense, np.ascontiguousarray(cells, dtype=np.int64),
            self.radius, self.start, self.cell, self.value, self.n_chunks,
        )  # fmt: skip


def _geometry(spec):
    return (
        spec.group_in,
        spec.group_out,
        np.asarray(spec.stride, dtype=np.int64),
        np.asarray([lo for lo, _ in spec.padding], dtype=np.int64),
        np.asarray(spec.spatial, dtype=np.int64),
        np.asarray(spec.out_spatial, dtype=np.int64),
    )


def _planes(a):
    return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


def _work(spec, taps):
    """Multiply-adds of one pass over every tap (upper estimate: windows cut by the borders count whole)."""
    per_pair = taps.value.shape[0] * spec.batch * math.prod(spec.out_spatial)
    return per_pair + spec.kernel.n_batch * spec.kernel.n_dense * spec.kernel.count


def conv(spec, input, weight, positions, sigma, out=None):
    with threads_for(spec.kernel.n_batch * spec.kernel.n_dense * spec.kernel.count * 4):
        taps = _Taps(spec, weight, positions, sigma)
    if out is None:
        out = np.empty(spec.output_shape, dtype=spec.dtype)
    with threads_for(_work(spec, taps)):
        _forward(_planes(input), _planes(out), taps.pair_start, taps.cell, taps.value, *_geometry(spec))
    return out


def conv_grad(spec, grad_output, input, weight, positions, sigma):
    k = spec.kernel
    with threads_for(k.n_batch * k.n_dense * k.count * 4):
        taps = _Taps(spec, weight, positions, sigma)
    geometry = _geometry(spec)
    work = _work(spec, taps)
    grad_input = np.empty(spec.input_shape, dtype=spec.dtype)
    with threads_for(work):
        _grad_input(_planes(grad_output), _planes(grad_input), taps.pair_start, taps.cell, taps.value, *geometry)
    grad_tap = np.empty(taps.value.shape[0])
    grad_w = np.empty((k.n_batch, k.n_dense, k.count), dtype=spec.dtype)
    grad_p = np.empty(taps.positions.shape, dtype=spec.dtype)
    grad_s = np.empty(taps.positions.shape, dtype=spec.dtype)
    with threads_for(work):
        _grad_elements(
            taps.kind, taps.normalised, _planes(grad_output), _planes(input), taps.weight, taps.positions, taps.sigma,
            taps.sizes, taps.radius, taps.start, taps.cell, *geometry, grad_tap, grad_w, grad_p, grad_s, taps.n_chunks,
        )  # fmt: skip
    return (
        grad_input,
        grad_w,
        spec.sum_to(grad_p, positions.shape),
        None if sigma is None else spec.sum_to(grad_s, sigma.shape),
    )
