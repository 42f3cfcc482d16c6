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
:func:`_element_grad` serves ``construct_grad`` and ``conv_grad`` (:mod:`.cpu_conv`).
"""

from __future__ import annotations

import functools
import inspect
import types as types_

import numba
import numpy as np
from numba import njit, prange

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
    :func:`_element_grad` (NaN for an invalid element, 0 for an empty one). ``dL/dK`` at its
    cells is read from ``g``: ``construct_grad`` gives the kernel block (``base``, ``strides``);
    ``conv_grad`` (``at_taps``) the element's taps from ``base`` on, its support box in C order
    (``strides`` is scratch then)."""
    m = positions.shape[0]
    status, total = _profiles(kind, normalised, positions, sigma, b, d, c, sizes, a, da_dp, da_ds, sums, lo, hi, True, radius)
    if status != _OK:
        fill = np.nan if status == _INVALID else 0.0
        grad_w[b, d, c] = fill
        for j in range(m):
            grad_p[j, b, d, c] = fill
            grad_s[j, b, d, c] = fill
        return
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
        compiled = njit(sig, cache=True, parallel=parallel, nogil=True, fastmath=_FASTMATH)(variant)
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
