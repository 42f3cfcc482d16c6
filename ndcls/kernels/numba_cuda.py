"""Backend "numba-cuda": construction and gradient kernels written with ``numba.cuda.jit``.

One CUDA block handles one batch index ``b`` at a time (grid-stride over the batch):

* forward: the block zeroes a float64 tile of the ``prod(sizes)`` cells of ``K[b]`` in shared
  memory, adds every element of ``b`` into it, and writes the tile out once, coalesced.
  bilinear and triangle scatter each element over its (small) support with shared-memory
  atomics, one thread per element; gauss, whose support is the whole kernel, is gathered
  instead: the threads compute the 1-D profiles of up to ``blockDim`` elements of one dense
  index into shared memory, then each thread sums, for the cells it owns, the products of
  those profiles (no atomics).
* backward: the block copies ``dL/dK[b]`` into a shared tile once, then one thread per element
  ``(b, d, c)`` gathers its gradients over its support: no atomics, a fixed summation order,
  so results are deterministic.

When the tile does not fit in shared memory next to the per-thread profile storage (at most
:data:`SHARED_BYTES`; about 6000 float64 cells minus the profiles), ``K[b]`` in global memory
is the tile: the block zero-fills it, then scatters with global atomics (gauss: each thread
adds into the cells it owns, still without atomics), and the backward reads ``dL/dK`` from
global memory. Profiles are separable: each element computes one 1-D profile per learned axis
(``count * sum(sizes)`` ``exp`` calls per batch index for gauss) and cells take products.

The per-element math is :mod:`ndcls.kernels._element` compiled as CUDA device functions (the
same source the CPU backend compiles with ``njit``): the support is clamped in floating point
before any float-to-int cast, so NaN, inf and far positions never become indices. Arithmetic is
in float64 (as in the CPU backend), storage in the arrays' dtype. Numba types integer
arithmetic as 64-bit, so every index computation is 64-bit: safe for kernels of more than
``2**31`` cells whatever ``spec.needs_int64`` says, at no cost that matters in these
memory-bound kernels.

Specialisations: interpolation and tile placement (shared or global) are compile-time (one
kernel factory per pair, memoised); dtype (float32, float64) by Numba's per-signature
dispatch. N, M, sizes, strides and counts are runtime arguments (a padded layout tuple), so a
new layer shape never recompiles. float16 is not supported (the reference has no float16
path to test against): the backend's dtypes exclude it, so the API raises a TypeError.

Arrays: NumPy inputs are copied to the device and results copied back (this is also how the
kernels run under ``NUMBA_ENABLE_CUDASIM=1``); CuPy inputs (anything with
``__cuda_array_interface__``) are used in place, outputs are CuPy arrays, and kernels run on
CuPy's current stream.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ndcls._spec import MAX_DIMS
from ndcls.kernels import _element

# numba-cuda (0.30 included) runs overload(np.row_stack) when its compiler loads; NumPy 2.5 removed
# that alias. This only restores the removed alias, identical to vstack, before numba.cuda loads.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

from numba import cuda, float64, int64  # noqa: E402

_valid = cuda.jit(device=True)(_element.element_valid)
_support = cuda.jit(device=True)(_element.support)
_fill = cuda.jit(device=True)(_element.fill_profile)
_advance = cuda.jit(device=True)(_element.advance)
_normalise = cuda.jit(device=True)(_element.normalise_profile)
_ratios = cuda.jit(device=True)(_element.normaliser_ratios)
_normalised_gradient = cuda.jit(device=True)(_element.normalised_gradient)
_derivative_scale = cuda.jit(device=True)(_element.derivative_scale)

BILINEAR, TRIANGLE, GAUSS = _element.BILINEAR, _element.TRIANGLE, _element.GAUSS
_INVALID, _EMPTY, _OK = 0, 1, 2

#: Dynamic shared memory one block may use (the limit without an opt-in on every GPU since sm_50).
SHARED_BYTES = 48 * 1024
#: Most threads per block. The simulator runs the same plans as a GPU (each simulated thread is
#: a Python thread; blocks are sized by the work, so small test cases stay cheap there).
THREADS = 128
_MAX_GRID = 1 << 20
_LAYOUT_LEN = 4 * MAX_DIMS
_SUMS_LEN = 3 * MAX_DIMS  # local arrays need a module-level constant size

# -- device functions ------------------------------------------------------------------------


@cuda.jit(device=True)
def _unpack_layout(layout, n_dense_axes, m, sizes, strides, dsizes, dstrides, roff):
    """Copy the padded layout tuple into local arrays; ``roff[j]``: start of row j in a profile slot."""
    for j in range(MAX_DIMS):  # constant trip count: unrolled, so the tuple is indexed statically
        sizes[j] = layout[j]
        strides[j] = layout[MAX_DIMS + j]
        dsizes[j] = layout[2 * MAX_DIMS + j]
        dstrides[j] = layout[3 * MAX_DIMS + j]
    start = 0
    for j in range(m):
        roff[j] = start
        start += sizes[j]


@cuda.jit(device=True)
def _dense_offset(d, n_dense_axes, dsizes, dstrides):
    """Offset in a batch block of the cell at dense index ``d`` (C order), learned coordinates 0."""
    off = 0
    rem = d
    for kk in range(n_dense_axes):
        k = n_dense_axes - 1 - kk
        i = rem % dsizes[k]
        rem //= dsizes[k]
        off += i * dstrides[k]
    return off


@cuda.jit(device=True)
def _profiles(kind, positions, sigma, b, d, c, sizes, roff, a, da_dp, da_ds, with_grad, lo, hi, sums):
    """1-D profiles of element ``(b, d, c)`` along every learned row into ``a`` (and derivatives).

    Row j occupies ``a[roff[j] : roff[j] + sizes[j]]``, indexed by cell; only ``[lo[j], hi[j])``
    is written. ``sums[3 * j + k]``: sums of ``a``, ``da_dp``, ``da_ds`` over row j.
    Returns ``(status, S)``, S the product of the rows' sums. Normalised kinds leave each row
    normalised and its derivative rows centred (``_element.normalise_profile``); a row summing
    to 0 makes the element empty.
    """
    m = positions.shape[0]
    for j in range(m):
        if not _valid(kind, float(positions[j, b, d, c]), float(sigma[j, b, d, c])):
            return _INVALID, 1.0
    z = 1.0
    for j in range(m):
        p = float(positions[j, b, d, c])
        s = float(sigma[j, b, d, c])
        first, last = _support(kind, p, s, sizes[j])
        lo[j] = first
        hi[j] = last
        if first >= last:
            return _EMPTY, 1.0
        r0 = roff[j]
        r1 = r0 + sizes[j]
        t0, t1, t2 = _fill(kind, p, s, first, last, a[r0:r1], da_dp[r0:r1], da_ds[r0:r1], with_grad)
        sums[3 * j] = t0
        sums[3 * j + 1] = t1
        sums[3 * j + 2] = t2
        if kind != BILINEAR:
            if t0 == 0.0:
                return _EMPTY, 1.0
            _normalise(kind, p, s, first, last, a[r0:r1], da_dp[r0:r1], da_ds[r0:r1], t0, t1, t2, with_grad)
        z *= t0
    return _OK, z


@cuda.jit(device=True)
def _scatter_batch(kind, b, weight, positions, sigma, tile, slot, layout, n_dense_axes):
    """Add every element of batch ``b`` into ``tile`` (one thread per element, atomics)."""
    n_batch, n_dense, count = weight.shape
    m = positions.shape[0]
    sizes = cuda.local.array(MAX_DIMS, int64)
    strides = cuda.local.array(MAX_DIMS, int64)
    dsizes = cuda.local.array(MAX_DIMS, int64)
    dstrides = cuda.local.array(MAX_DIMS, int64)
    roff = cuda.local.array(MAX_DIMS, int64)
    lo = cuda.local.array(MAX_DIMS, int64)
    hi = cuda.local.array(MAX_DIMS, int64)
    idx = cuda.local.array(MAX_DIMS, int64)
    sums = cuda.local.array(_SUMS_LEN, float64)
    _unpack_layout(layout, n_dense_axes, m, sizes, strides, dsizes, dstrides, roff)
    for e in range(cuda.threadIdx.x, n_dense * count, cuda.blockDim.x):
        d = e // count
        c = e - d * count
        status, total = _profiles(kind, positions, sigma, b, d, c, sizes, roff, slot, slot, slot, False, lo, hi, sums)
        if status != _OK:
            continue
        scale = float(weight[b, d, c])
        if kind != BILINEAR:  # K = w * (S / Z) * prod of the normalised rows
            ratio, _ = _ratios(total)
            scale *= ratio
        base = _dense_offset(d, n_dense_axes, dsizes, dstrides)
        for j in range(m):
            idx[j] = lo[j]
        while True:
            value = scale
            off = base
            for j in range(m):
                value *= slot[roff[j] + idx[j]]
                off += idx[j] * strides[j]
            cuda.atomic.add(tile, off, value)
            if not _advance(idx, lo, hi, m):
                break


@cuda.jit(device=True)
def _gather_batch(kind, b, weight, positions, sigma, tile, slots, slot_len, layout, n_dense_axes):
    """Gauss: per dense index, profiles of up to blockDim elements into ``slots``, then cells sum them."""
    n_batch, n_dense, count = weight.shape
    m = positions.shape[0]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sizes = cuda.local.array(MAX_DIMS, int64)
    strides = cuda.local.array(MAX_DIMS, int64)
    dsizes = cuda.local.array(MAX_DIMS, int64)
    dstrides = cuda.local.array(MAX_DIMS, int64)
    roff = cuda.local.array(MAX_DIMS, int64)
    lo = cuda.local.array(MAX_DIMS, int64)
    hi = cuda.local.array(MAX_DIMS, int64)
    idx = cuda.local.array(MAX_DIMS, int64)
    sums = cuda.local.array(_SUMS_LEN, float64)
    _unpack_layout(layout, n_dense_axes, m, sizes, strides, dsizes, dstrides, roff)
    n_cells = 1
    for j in range(m):
        n_cells *= sizes[j]
    mine = slots[tid * slot_len : (tid + 1) * slot_len]
    profile = mine[1:slot_len]
    for d in range(n_dense):
        base = _dense_offset(d, n_dense_axes, dsizes, dstrides)
        for c0 in range(0, count, nt):
            c = c0 + tid
            if c < count:  # slot layout: [w / Z (0: skip), row 0, row 1, ...]
                scale = 0.0
                status, total = _profiles(kind, positions, sigma, b, d, c, sizes, roff, profile, profile, profile, False, lo, hi, sums)
                if status == _OK:
                    ratio, _ = _ratios(total)  # gauss: K = w * (S / Z) * prod of the normalised rows
                    scale = float(weight[b, d, c]) * ratio
                mine[0] = scale
            cuda.syncthreads()
            n_here = min(nt, count - c0)
            for q in range(tid, n_cells, nt):
                rem = q
                off = base
                for jj in range(m):  # last row fastest
                    j = m - 1 - jj
                    idx[j] = rem % sizes[j]
                    rem //= sizes[j]
                    off += idx[j] * strides[j]
                acc = 0.0
                for t in range(n_here):
                    start = t * slot_len
                    value = slots[start]
                    if value != 0.0:
                        for j in range(m):
                            value *= slots[start + 1 + roff[j] + idx[j]]
                        acc += value
                tile[off] += acc
            cuda.syncthreads()


@cuda.jit(device=True)
def _grad_batch(kind, b, grad_tile, weight, positions, sigma, grad_w, grad_p, grad_s, slot, row_len, layout, n_dense_axes):
    """Gradients of every element of batch ``b`` (one thread per element, gathering from ``grad_tile``)."""
    n_batch, n_dense, count = weight.shape
    m = positions.shape[0]
    normalised = kind != BILINEAR
    sizes = cuda.local.array(MAX_DIMS, int64)
    strides = cuda.local.array(MAX_DIMS, int64)
    dsizes = cuda.local.array(MAX_DIMS, int64)
    dstrides = cuda.local.array(MAX_DIMS, int64)
    roff = cuda.local.array(MAX_DIMS, int64)
    lo = cuda.local.array(MAX_DIMS, int64)
    hi = cuda.local.array(MAX_DIMS, int64)
    idx = cuda.local.array(MAX_DIMS, int64)
    sums = cuda.local.array(_SUMS_LEN, float64)
    u = cuda.local.array(MAX_DIMS, float64)  # sum of G * d(prod a)/dp_j (normalised: centred, see cpu.py)
    v = cuda.local.array(MAX_DIMS, float64)  # the same with d/ds_j
    _unpack_layout(layout, n_dense_axes, m, sizes, strides, dsizes, dstrides, roff)
    a = slot[0:row_len]
    da_dp = slot[row_len : 2 * row_len]
    da_ds = slot[2 * row_len : 3 * row_len]
    for e in range(cuda.threadIdx.x, n_dense * count, cuda.blockDim.x):
        d = e // count
        c = e - d * count
        status, total = _profiles(kind, positions, sigma, b, d, c, sizes, roff, a, da_dp, da_ds, True, lo, hi, sums)
        if status != _OK:
            fill = math.nan if status == _INVALID else 0.0
            grad_w[b, d, c] = fill
            for j in range(m):
                grad_p[j, b, d, c] = fill
                if normalised:
                    grad_s[j, b, d, c] = fill
            continue
        base = _dense_offset(d, n_dense_axes, dsizes, dstrides)
        t = 0.0
        for j in range(m):
            u[j] = 0.0
            v[j] = 0.0
            idx[j] = lo[j]
        while True:
            off = base
            for j in range(m):
                off += idx[j] * strides[j]
            g = float(grad_tile[off])
            prod = g
            for j in range(m):
                prod *= a[roff[j] + idx[j]]
            t += prod
            for k in range(m):
                rest = g
                for j in range(m):
                    if j != k:
                        rest *= a[roff[j] + idx[j]]
                u[k] += rest * da_dp[roff[k] + idx[k]]
                v[k] += rest * da_ds[roff[k] + idx[k]]
            if not _advance(idx, lo, hi, m):
                break
        w = float(weight[b, d, c])
        if not normalised:
            grad_w[b, d, c] = t
            for j in range(m):
                grad_p[j, b, d, c] = w * u[j]
            continue
        ratio, q = _ratios(total)
        grad_w[b, d, c] = ratio * t
        for j in range(m):
            others = 1.0
            for k in range(m):
                if k != j:
                    others *= sums[3 * k]
            scale = _derivative_scale(kind, float(sigma[j, b, d, c]))
            grad_p[j, b, d, c] = _normalised_gradient(w, t, u[j], sums[3 * j + 1], sums[3 * j], others, q, scale)
            grad_s[j, b, d, c] = _normalised_gradient(w, t, v[j], sums[3 * j + 2], sums[3 * j], others, q, scale)


# -- kernels: one factory per (interpolation, tile placement), memoised --------------------------


@lru_cache(maxsize=None)
def forward_source(kind: int, shared_tile: bool):
    """The Python function of the forward kernel for ``kind`` (0 bilinear, 1 triangle, 2 gauss).

    ``kernel(weight (B, D, C), positions (M, B, D, C), sigma (M, B, D, C), K (B, block),
    layout (4 * MAX_DIMS,) int64 tuple, n_dense_axes, row_len)``; launched with
    ``slots * slot_len`` float64 of dynamic shared memory after the tile (``block`` float64
    when ``shared_tile``).
    """
    gather = kind == GAUSS
    slot_len_extra = 1 if gather else 0

    def forward(weight, positions, sigma, kernel, layout, n_dense_axes, row_len):
        dyn = cuda.shared.array(0, float64)
        n_batch = kernel.shape[0]
        block = kernel.shape[1]
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        slot_len = row_len + slot_len_extra
        tile_len = block if shared_tile else 0
        slots = dyn[tile_len : tile_len + nt * slot_len]
        for b in range(cuda.blockIdx.x, n_batch, cuda.gridDim.x):
            if shared_tile:
                tile = dyn[0:tile_len]
            else:
                tile = kernel[b]
            for i in range(tid, block, nt):
                tile[i] = 0
            cuda.syncthreads()
            if gather:
                _gather_batch(kind, b, weight, positions, sigma, tile, slots, slot_len, layout, n_dense_axes)
            else:
                _scatter_batch(kind, b, weight, positions, sigma, tile, slots[tid * slot_len : (tid + 1) * slot_len], layout, n_dense_axes)
            cuda.syncthreads()
            if shared_tile:
                for i in range(tid, block, nt):
                    kernel[b, i] = tile[i]
                cuda.syncthreads()

    forward.__name__ = f"ndcls_forward_{_NAMES[kind]}_{'shared' if shared_tile else 'global'}"
    return forward


@lru_cache(maxsize=None)
def backward_source(kind: int, shared_tile: bool):
    """The Python function of the backward kernel; slots are ``3 * row_len`` float64 per thread."""

    def backward(grad_kernel, weight, positions, sigma, grad_w, grad_p, grad_s, layout, n_dense_axes, row_len):
        dyn = cuda.shared.array(0, float64)
        n_batch = grad_kernel.shape[0]
        block = grad_kernel.shape[1]
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        tile_len = block if shared_tile else 0
        slot = dyn[tile_len + tid * 3 * row_len : tile_len + (tid + 1) * 3 * row_len]
        for b in range(cuda.blockIdx.x, n_batch, cuda.gridDim.x):
            if shared_tile:
                tile = dyn[0:tile_len]
                for i in range(tid, block, nt):
                    tile[i] = grad_kernel[b, i]
                cuda.syncthreads()
            else:
                tile = grad_kernel[b]
            _grad_batch(kind, b, tile, weight, positions, sigma, grad_w, grad_p, grad_s, slot, row_len, layout, n_dense_axes)
            if shared_tile:
                cuda.syncthreads()

    backward.__name__ = f"ndcls_backward_{_NAMES[kind]}_{'shared' if shared_tile else 'global'}"
    return backward


_NAMES = {BILINEAR: "bilinear", TRIANGLE: "triangle", GAUSS: "gauss"}


@lru_cache(maxsize=None)
def _compiled(direction: str, kind: int, shared_tile: bool):
    source = forward_source if direction == "forward" else backward_source
    return cuda.jit(source(kind, shared_tile))


def signatures(direction: str, kind: int, dtype):
    """Numba signature of a kernel for ``dtype`` (what :func:`numba.cuda.compile_ptx` needs)."""
    from numba import from_dtype, types

    f = from_dtype(np.dtype(dtype))
    arr3, arr4, arr2 = f[:, :, ::1], f[:, :, :, ::1], f[:, ::1]
    layout = types.UniTuple(types.int64, _LAYOUT_LEN)
    if direction == "forward":
        return (arr3, arr4, arr4, arr2, layout, types.int64, types.int64)
    return (arr2, arr3, arr4, arr4, arr3, arr4, arr4, layout, types.int64, types.int64)


def specialisations():
    """Every kernel this backend compiles: ``(name, python function, signature)``."""
    out = []
    for direction, source in (("forward", forward_source), ("backward", backward_source)):
        for kind in (BILINEAR, TRIANGLE, GAUSS):
            for shared_tile in (True, False):
                for dtype in DTYPES:
                    fn = source(kind, shared_tile)
                    out.append((f"{fn.__name__}_{dtype}", fn, signatures(direction, kind, dtype)))
    return out


DTYPES = ("float32", "float64")

# -- launch planning -------------------------------------------------------------------------------


def _layout(spec):
    """Padded ``(learned sizes, learned strides, dense sizes, dense strides)`` tuple of int64."""
    dense_strides = tuple(spec.axis_strides[a] for a in spec.dense_dims)

    def pad(values):
        return tuple(int(x) for x in values) + (0,) * (MAX_DIMS - len(values))

    return pad(spec.learned_sizes) + pad(spec.learned_strides) + pad(spec.dense_sizes) + pad(dense_strides)


def plan(spec, direction: str, *, shared_bytes: int | None = None, max_threads: int | None = None):
    """``(threads, shared_tile, dynamic shared bytes)`` for one launch: a pure function of the
    spec and the limits (default: :data:`SHARED_BYTES` of dynamic shared memory, :data:`THREADS`),
    the same on a GPU and under the simulator.

    Each thread needs a profile slot (``sum(learned_sizes)`` float64, +1 for gauss forward,
    x3 for the backward). A block gets no more threads than it has work for, in whole warps:
    the elements of one batch index (the gauss forward also splits the tile's cells between
    its threads). The batch tile (``prod(sizes)`` float64) goes into shared memory if the
    threads the work wants (at least one warp) still fit beside it; otherwise the tile stays in
    global memory and the block takes as many threads as the slots allow.
    """
    shared_bytes = SHARED_BYTES if shared_bytes is None else shared_bytes
    max_threads = THREADS if max_threads is None else max_threads
    row_len = sum(spec.learned_sizes)
    if direction == "forward":
        slot = row_len + (1 if spec.interpolation == "gauss" else 0)
        work = spec.n_dense * spec.count
        if spec.interpolation == "gauss":
            work = max(min(spec.count, max_threads), spec.block)
    else:
        slot = 3 * row_len
        work = spec.n_dense * spec.count
    words = shared_bytes // 8
    wanted = min(max_threads, max(32, -(-work // 32) * 32))

    def threads_for(free):
        t = min(wanted, free // slot)
        return t - t % 32 if t >= 32 else t

    threads = threads_for(words - spec.block) if spec.block < words else 0
    if direction == "forward":  # the forward accumulates in its tile: shared if a warp fits beside it
        if threads >= 32:
            return threads, True, 8 * (spec.block + threads * slot)
    elif threads >= 1 and threads >= threads_for(words):
        # the backward only reads its tile (L1/L2-cached from global memory): shared if that
        # costs no threads
        return threads, True, 8 * (spec.block + threads * slot)
    threads = threads_for(words)
    if threads < 1:
        raise ValueError(
            f"backend 'numba-cuda': one element's profiles (sum of learned sizes {row_len} x {slot // row_len} "
            f"float64) exceed {shared_bytes} bytes of shared memory for sizes={spec.sizes}; "
            "use backend='cupy' or 'numba'"
        )
    return threads, False, 8 * threads * slot


# -- host side: arrays in, arrays out --------------------------------------------------------------


def _on_device(x):
    return x is not None and not isinstance(x, np.ndarray) and hasattr(x, "__cuda_array_interface__")


class _Launch:
    """Device views of the inputs and the stream the kernels run on."""

    def __init__(self, arrays):
        self.device = any(_on_device(x) for x in arrays)
        if self.device:
            from ndcls._arrays import import_cupy

            self.cupy = import_cupy()
            ptr = self.cupy.cuda.get_current_stream().ptr
            self.stream = cuda.default_stream() if ptr == 0 else cuda.external_stream(ptr)
        else:
            self.stream = cuda.default_stream()

    def to_device(self, x):
        if self.device:
            return cuda.as_cuda_array(x, sync=False)
        return cuda.to_device(x, stream=self.stream)

    def empty(self, shape, dtype, out=None):
        """``(caller-visible array or None, device view or None)``; ``out`` is used if given."""
        size = math.prod(shape)
        if self.device:
            host = self.cupy.empty(shape, dtype=dtype) if out is None else out
            return host, (cuda.as_cuda_array(host, sync=False) if size else None)
        host = np.empty(shape, dtype=dtype) if out is None else out
        return host, (cuda.device_array(shape, dtype=dtype, stream=self.stream) if size else None)

    def result(self, pair):
        """The caller's array, copied back from the device for NumPy callers."""
        host, dev = pair
        if not self.device and dev is not None:
            dev.copy_to_host(host, stream=self.stream)
            self.stream.synchronize()
        return host


def _grid(n_batch):
    return min(n_batch, _MAX_GRID)


def launch_construct(spec, stream, weight, positions, sigma, kernel_out):
    """Run the construction on device arrays (sigma None for bilinear) into ``kernel_out``
    (B, prod(sizes)) on ``stream``: no allocation, no copy, no synchronisation."""
    kind = _element.INTERPOLATION_CODES[spec.interpolation]
    threads, shared_tile, dyn_bytes = plan(spec, "forward")
    s = positions if sigma is None else sigma
    kernel = _compiled("forward", kind, shared_tile)
    kernel[_grid(spec.n_batch), threads, stream, dyn_bytes](
        weight, positions, s, kernel_out, _layout(spec), spec.ndim - spec.n_learned, sum(spec.learned_sizes)
    )


def launch_construct_grad(spec, stream, grad_kernel, weight, positions, sigma, grad_w, grad_p, grad_s):
    """Run the construction's gradient on device arrays (sigma and grad_s None for bilinear)
    on ``stream``: no allocation, no copy, no synchronisation."""
    kind = _element.INTERPOLATION_CODES[spec.interpolation]
    threads, shared_tile, dyn_bytes = plan(spec, "backward")
    s = positions if sigma is None else sigma
    kernel = _compiled("backward", kind, shared_tile)
    kernel[_grid(spec.n_batch), threads, stream, dyn_bytes](
        grad_kernel, weight, positions, s, grad_w, grad_p, grad_p if grad_s is None else grad_s,
        _layout(spec), spec.ndim - spec.n_learned, sum(spec.learned_sizes),
    )  # fmt: skip


def construct(spec, weight, positions, sigma, out=None):
    """``K`` (B, prod(sizes)) from weight (B, D, C), positions and sigma (M, B, D, C)."""
    launch = _Launch((weight, positions, sigma, out))
    target = launch.empty((spec.n_batch, spec.block), spec.dtype, out)
    if target[1] is None:
        return target[0]
    if weight.size == 0:  # count 0: nothing to scatter
        target[0][...] = 0
        return target[0]
    w = launch.to_device(weight)
    p = launch.to_device(positions)
    s = None if sigma is None else launch.to_device(sigma)
    launch_construct(spec, launch.stream, w, p, s, target[1])
    return launch.result(target)


def construct_grad(spec, grad_kernel, weight, positions, sigma):
    """``(grad_weight, grad_positions, grad_sigma)`` shaped like weight, positions, sigma (None for bilinear)."""
    launch = _Launch((grad_kernel, weight, positions, sigma))
    gw = launch.empty(weight.shape, spec.dtype)
    gp = launch.empty(positions.shape, spec.dtype)
    gs = launch.empty(positions.shape, spec.dtype) if spec.normalised else None
    if gw[1] is not None:  # some element exists
        g = launch.to_device(grad_kernel)
        w = launch.to_device(weight)
        p = launch.to_device(positions)
        s = None if sigma is None else launch.to_device(sigma)
        launch_construct_grad(spec, launch.stream, g, w, p, s, gw[1], gp[1], None if gs is None else gs[1])
    return launch.result(gw), launch.result(gp), None if gs is None else launch.result(gs)
