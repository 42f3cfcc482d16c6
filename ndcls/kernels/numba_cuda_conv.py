"""Backend "numba-cuda", operations conv and conv_grad: the direct convolution on the GPU (docs/conv.md, "GPU").

Canonical layout: ``B = O * I`` channel pairs (pair ``q = o * I + i``), ``cells = prod(sizes)``.
The dense kernel is built, but only to read the elements' values from it; the convolution
touches only the cells the elements touch:

1. positions and sigma, ``(M, Po, Pi, D, C)``, are expanded to ``(M, B, D, C)`` on the device;
2. ``K`` (B, cells) is the construction of :mod:`ndcls.kernels.numba_cuda` (no host sync);
3. a byte mask (B, cells) marks every cell inside an element's support box (the
   :func:`~ndcls.kernels._element.cut_support` of each learned row: bilinear corners, triangle
   support, Gaussian cut at the rounding of the working precision; along dense axes the
   element's own index): the cells whose ``dL/dK`` the gradients need, zero-valued ones too;
4. one thread per pair compacts its row, in ascending cell order: ``n_taps[B]``,
   ``tap_cell[B, cells]`` (flat cell index), ``tap_val[B, cells] = K[b, cell]``;
5. forward: one thread per output element sums ``tap_val * x[...]`` over the input channels
   of its group and their taps (working dtype, fixed order);
6. grad_input: one thread per input element, the same taps transposed;
7. ``dL/dK`` at the taps: one block per (pair, chunk of the batch x output cells) writes a
   float64 partial per tap (threads split the chunk between the taps, then a fixed-order
   sum over the lanes of each tap); a second kernel sums the chunks in order and writes
   ``dK[b, tap_cell] `` into a zeroed ``dK`` (B, cells);
8. the gradients of weight, positions and sigma are the construction's ``construct_grad`` of
   ``dK``, then positions and sigma are summed over the channel axes they broadcast along.

No float atomics in these kernels (the construction adds bilinear and triangle elements into
``K`` with atomics, so the output and grad_input may change in the last bit between calls;
the element gradients are bitwise reproducible). Every buffer size follows from the spec
(the tap arrays have ``cells`` slots per row), so nothing is read back to the host between
the kernels, and the whole pipeline runs on one stream (CuPy's current stream for CuPy
inputs): it can be captured in a CUDA graph. Scratch memory is ``O(B * cells)`` (see
:func:`conv_plan`). NumPy inputs are copied to the device and the results copied back (this
is also how the kernels run under ``NUMBA_ENABLE_CUDASIM=1``).

Specialisations: the dtype (float32, float64) by Numba's per-signature dispatch, with the
accumulators of the forward and grad_input kernels typed per dtype (one factory per dtype);
interpolation, N, M, sizes, strides and padding are runtime arguments. Integer arithmetic
is 64-bit (Numba's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ndcls._spec import MAX_DIMS, gauss_cut
from ndcls.kernels import _element

# numba.cuda through numba_cuda.py, which prepares NumPy for it (NumPy 2.5, see there) first
from ndcls.kernels.numba_cuda import (
    _LAYOUT_LEN, THREADS, _advance, _dense_offset, _Launch, _layout, _unpack_layout, _valid, cuda, float64, int64,
    launch_construct, launch_construct_grad,
)  # fmt: skip

_cut_support = cuda.jit(device=True)(_element.cut_support)

#: Most blocks of one launch; kernels loop (grid-stride) over more work.
MAX_GRID = 1 << 20
#: Blocks the dL/dK partial kernel aims at (about 8 per SM on a 132-SM H100): pairs times chunks.
TARGET_BLOCKS = 1024
#: Fewest (batch x output) cells per chunk of the dL/dK kernel: fewer would cost more in partials than they save.
MIN_CHUNK = 1024
#: Most bytes of float64 partials the chunks may take (a single pair of a large kernel stays in few chunks).
PARTIAL_BYTES = 64 * 1024 * 1024
_GEOMETRY_LEN = 5 * MAX_DIMS

# -- device functions ----------------------------------------------------------------------------


@cuda.jit(device=True)
def _unpack_geometry(geo, ksize, stride, pad, xsize, ysize):
    """Kernel sizes, strides, padding before, input and output spatial sizes, from the padded tuple."""
    for a in range(MAX_DIMS):  # constant trip count: unrolled, the tuple is indexed statically
        ksize[a] = geo[a]
        stride[a] = geo[MAX_DIMS + a]
        pad[a] = geo[2 * MAX_DIMS + a]
        xsize[a] = geo[3 * MAX_DIMS + a]
        ysize[a] = geo[4 * MAX_DIMS + a]


@cuda.jit(device=True)
def _unravel(flat, nd, shape, out):
    """C-order coordinates of ``flat`` in ``shape[:nd]`` into ``out``."""
    rem = flat
    for aa in range(nd):
        a = nd - 1 - aa
        q = rem // shape[a]
        out[a] = rem - q * shape[a]
        rem = q


@cuda.jit(device=True)
def _input_offset(y, k, nd, stride, pad, xsize):
    """Flat offset in an input plane of ``y * stride + k - pad``, or -1 outside (zero padding)."""
    off = 0
    for a in range(nd):
        z = y[a] * stride[a] + k[a] - pad[a]
        if z < 0 or z >= xsize[a]:
            return -1
        off = off * xsize[a] + z
    return off


@cuda.jit(device=True)
def _output_offset(z, k, nd, stride, pad, ysize):
    """Flat offset in an output plane of the ``y`` with ``y * stride = z + pad - k``, or -1 if none."""
    off = 0
    for a in range(nd):
        num = z[a] + pad[a] - k[a]
        if num < 0:
            return -1
        y = num // stride[a]
        if y * stride[a] != num or y >= ysize[a]:
            return -1
        off = off * ysize[a] + y
    return off


# -- kernels -----------------------------------------------------------------------------------------------


def _expand(src, dst):
    """``dst (M, O, I, DC)`` from ``src (M, Po, Pi, DC)``, Po in (1, O), Pi in (1, I)."""
    m, n_out, n_in, n_el = dst.shape
    po = src.shape[1]
    pi = src.shape[2]
    total = m * n_out * n_in * n_el
    for f in range(cuda.grid(1), total, cuda.gridsize(1)):
        e = f % n_el
        r = f // n_el
        i = r % n_in
        r //= n_in
        o = r % n_out
        j = r // n_out
        dst[j, o, i, e] = src[j, o if po > 1 else 0, i if pi > 1 else 0, e]


def _zero(a):
    """``a[:] = 0`` for a 1-D array."""
    for f in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[f] = 0


def _mark(positions, sigma, mask, layout, n_dense_axes, kind, radius):
    """One thread per element ``(b, d, c)``: ``mask[b, cell] = 1`` over its support box (nothing
    for an invalid element). Threads may store 1 to the same byte: the result is the same."""
    m, n_rows, n_dense, count = positions.shape
    sizes = cuda.local.array(MAX_DIMS, int64)
    strides = cuda.local.array(MAX_DIMS, int64)
    dsizes = cuda.local.array(MAX_DIMS, int64)
    dstrides = cuda.local.array(MAX_DIMS, int64)
    roff = cuda.local.array(MAX_DIMS, int64)
    lo = cuda.local.array(MAX_DIMS, int64)
    hi = cuda.local.array(MAX_DIMS, int64)
    idx = cuda.local.array(MAX_DIMS, int64)
    _unpack_layout(layout, n_dense_axes, m, sizes, strides, dsizes, dstrides, roff)
    total = n_rows * n_dense * count
    for e in range(cuda.grid(1), total, cuda.gridsize(1)):
        c = e % count
        r = e // count
        d = r % n_dense
        b = r // n_dense
        empty = False
        for j in range(m):
            p = float64(positions[j, b, d, c])
            s = float64(sigma[j, b, d, c])
            if not _valid(kind, p, s):
                empty = True
                break
            first, last = _cut_support(kind, p, s, sizes[j], radius)
            if first >= last:
                empty = True
                break
            lo[j] = first
            hi[j] = last
            idx[j] = first
        if empty:
            continue
        base = _dense_offset(d, n_dense_axes, dsizes, dstrides)
        while True:
            off = base
            for j in range(m):
                off += idx[j] * strides[j]
            mask[b, off] = 1
            if not _advance(idx, lo, hi, m):
                break


def _compact(mask, kernel, n_taps, tap_cell, tap_val):
    """One thread per pair: its marked cells in ascending order, with their values in ``K``."""
    n_rows, cells = mask.shape
    for b in range(cuda.grid(1), n_rows, cuda.gridsize(1)):
        n = 0
        for cell in range(cells):
            if mask[b, cell] != 0:
                tap_cell[b, n] = cell
                tap_val[b, n] = kernel[b, cell]
                n += 1
        n_taps[b] = n


@lru_cache(maxsize=None)
def planes_source(dtype: str, transposed: bool):
    """Forward (``transposed`` False) or grad_input kernel for ``dtype``, one thread per
    destination element, its accumulator of that dtype (as torch's convolution's).

    ``kernel(src, n_taps (B,), tap_cell (B, cells), tap_val (B, cells), dst, geometry tuple,
    nd, group_in, group_out)``, planes flat. Forward: src = x (batch, in_channels, X), dst = out
    (batch, out_channels, Y), summing over the group's input channels i of pair o * I + i.
    Transposed: src = grad_out, dst = grad_x, summing over the group's output channels o of pair
    o * I + i, the taps transposed.
    """
    zero = np.dtype(dtype).type(0)

    def planes(src, n_taps, tap_cell, tap_val, dst, geo, nd, group_in, group_out):
        ksize = cuda.local.array(MAX_DIMS, int64)
        stride = cuda.local.array(MAX_DIMS, int64)
        pad = cuda.local.array(MAX_DIMS, int64)
        xsize = cuda.local.array(MAX_DIMS, int64)
        ysize = cuda.local.array(MAX_DIMS, int64)
        at = cuda.local.array(MAX_DIMS, int64)
        k = cuda.local.array(MAX_DIMS, int64)
        _unpack_geometry(geo, ksize, stride, pad, xsize, ysize)
        n_batch, n_dst, n_cells = dst.shape
        total = n_batch * n_dst * n_cells
        n_src = group_out if transposed else group_in
        for f in range(cuda.grid(1), total, cuda.gridsize(1)):
            q = f % n_cells
            r = f // n_cells
            ch = r % n_dst
            n = r // n_dst
            _unravel(q, nd, xsize if transposed else ysize, at)
            g = ch // group_in if transposed else ch // group_out
            acc = zero
            for r2 in range(n_src):
                if transposed:
                    src_ch = g * group_out + r2
                    pair = src_ch * group_in + (ch - g * group_in)
                else:
                    src_ch = g * group_in + r2
                    pair = ch * group_in + r2
                for t in range(n_taps[pair]):
                    _unravel(tap_cell[pair, t], nd, ksize, k)
                    if transposed:
                        off = _output_offset(at, k, nd, stride, pad, ysize)
                    else:
                        off = _input_offset(at, k, nd, stride, pad, xsize)
                    if off >= 0:
                        acc += tap_val[pair, t] * src[n, src_ch, off]
            dst[n, ch, q] = acc

    planes.__name__ = f"ndcls_conv_{'grad_input' if transposed else 'forward'}_{dtype}"
    return planes


def _tap_partials(grad_out, x, n_taps, tap_cell, partial, geo, nd, group_in, group_out, chunk_len):
    """``partial[b, chunk, t]``: the float64 sum, over the chunk's (batch, output cell) pairs
    ``q``, of ``grad_out[n, o, y] * x[n, c, y * stride + k_t - pad]`` (in range).

    One block per (pair, chunk), grid-stride. The block's threads take ``lanes`` threads per tap
    (the largest power of two with ``lanes * n_taps <= blockDim``), each lane a strided share
    of the chunk; the lanes' sums are added in lane order. Launched with ``8 * blockDim`` bytes
    of dynamic shared memory.
    """
    red = cuda.shared.array(0, float64)
    ksize = cuda.local.array(MAX_DIMS, int64)
    stride = cuda.local.array(MAX_DIMS, int64)
    pad = cuda.local.array(MAX_DIMS, int64)
    xsize = cuda.local.array(MAX_DIMS, int64)
    ysize = cuda.local.array(MAX_DIMS, int64)
    y = cuda.local.array(MAX_DIMS, int64)
    k = cuda.local.array(MAX_DIMS, int64)
    _unpack_geometry(geo, ksize, stride, pad, xsize, ysize)
    n_rows, n_chunks, _ = partial.shape
    n_batch, _, n_y = grad_out.shape
    total = n_batch * n_y
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for blk in range(cuda.blockIdx.x, n_rows * n_chunks, cuda.gridDim.x):
        b = blk // n_chunks
        chunk = blk - b * n_chunks
        taps = int64(n_taps[b])  # the same for the whole block: the loops below are uniform
        if taps == 0:
            continue
        lanes = 1
        while 2 * lanes * taps <= nt:
            lanes *= 2
        per_round = nt // lanes
        o = b // group_in
        ci = (o // group_out) * group_in + (b - o * group_in)
        q0 = chunk * chunk_len
        q1 = min(total, q0 + chunk_len)
        lane = tid % lanes
        for t0 in range(0, taps, per_round):
            t = t0 + tid // lanes
            acc = 0.0
            if t < taps:
                _unravel(tap_cell[b, t], nd, ksize, k)
                for q in range(q0 + lane, q1, lanes):
                    n = q // n_y
                    yq = q - n * n_y
                    _unravel(yq, nd, ysize, y)
                    off = _input_offset(y, k, nd, stride, pad, xsize)
                    if off >= 0:
                        acc += float64(grad_out[n, o, yq]) * float64(x[n, ci, off])
            red[tid] = acc
            cuda.syncthreads()
            if lane == 0 and t < taps:
                s = 0.0
                for r in range(lanes):
                    s += red[tid + r]
                partial[b, chunk, t] = s
            cuda.syncthreads()


def _tap_sums(n_taps, tap_cell, partial, grad_kernel):
    """One thread per tap slot: ``dK[b, tap_cell[b, t]] = sum over chunks of partial[b, chunk, t]``
    (chunks in order); ``dK`` was zeroed, the cells of a row's taps are distinct."""
    n_rows, n_chunks, cells = partial.shape
    for f in range(cuda.grid(1), n_rows * cells, cuda.gridsize(1)):
        b = f // cells
        t = f - b * cells
        if t < n_taps[b]:
            s = 0.0
            for chunk in range(n_chunks):
                s += partial[b, chunk, t]
            grad_kernel[b, tap_cell[b, t]] = s


def _reduce(full, out):
    """``out (M, Po, Pi, DC)``: ``full (M, O, I, DC)`` summed (float64, fixed order) over the
    channel axes along which ``out`` has size 1."""
    m, po, pi, n_el = out.shape
    n_out = full.shape[1]
    n_in = full.shape[2]
    total = m * po * pi * n_el
    for f in range(cuda.grid(1), total, cuda.gridsize(1)):
        e = f % n_el
        r = f // n_el
        i = r % pi
        r //= pi
        o = r % po
        j = r // po
        o1 = o + 1 if po > 1 else n_out
        i1 = i + 1 if pi > 1 else n_in
        s = 0.0
        for oo in range(o, o1):
            for ii in range(i, i1):
                s += full[j, oo, ii, e]
        out[j, o, i, e] = s


_SOURCES = {
    "expand": lambda dtype: _expand,
    "zero": lambda dtype: _zero,
    "mark": lambda dtype: _mark,
    "compact": lambda dtype: _compact,
    "forward": lambda dtype: planes_source(dtype, False),
    "grad_input": lambda dtype: planes_source(dtype, True),
    "tap_partials": lambda dtype: _tap_partials,
    "tap_sums": lambda dtype: _tap_sums,
    "reduce": lambda dtype: _reduce,
}
#: Kernels whose source does not depend on the dtype (one dispatcher, a signature per dtype).
_SHARED = ("expand", "zero", "mark", "compact", "tap_partials", "tap_sums", "reduce")


@lru_cache(maxsize=None)
def _compiled(name: str, dtype: str):
    if name in _SHARED:
        return _shared_dispatcher(name)
    return cuda.jit(_SOURCES[name](dtype))


@lru_cache(maxsize=None)
def _shared_dispatcher(name: str):
    return cuda.jit(_SOURCES[name](None))


DTYPES = ("float32", "float64")


def signatures(name: str, dtype):
    """Numba signatures of kernel ``name`` for ``dtype`` (what :func:`numba.cuda.compile_ptx` needs);
    the zero kernel has two: the mask's bytes and the gradient of ``K``."""
    from numba import from_dtype, types

    f = from_dtype(np.dtype(dtype))
    f1, f2, f3, f4 = f[::1], f[:, ::1], f[:, :, ::1], f[:, :, :, ::1]
    u1, u2 = types.uint8[::1], types.uint8[:, ::1]
    i1, i2 = types.int32[::1], types.int32[:, ::1]
    geo = types.UniTuple(types.int64, _GEOMETRY_LEN)
    layout = types.UniTuple(types.int64, _LAYOUT_LEN)
    i64 = types.int64
    table = {
        "expand": [(f4, f4)],
        "zero": [(u1,), (f1,)],
        "mark": [(f4, f4, u2, layout, i64, i64, types.float64)],
        "compact": [(u2, f2, i1, i2, f2)],
        "forward": [(f3, i1, i2, f2, f3, geo, i64, i64, i64)],
        "grad_input": [(f3, i1, i2, f2, f3, geo, i64, i64, i64)],
        "tap_partials": [(f3, f3, i1, i2, types.float64[:, :, ::1], geo, i64, i64, i64, i64)],
        "tap_sums": [(i1, i2, types.float64[:, :, ::1], f2)],
        "reduce": [(f4, f4)],
    }
    return table[name]


def specialisations():
    """Every kernel this module compiles: ``(name, python function, signature)``."""
    out = []
    for name, source in _SOURCES.items():
        for dtype in DTYPES:
            for n, sig in enumerate(signatures(name, dtype)):
                suffix = "" if len(signatures(name, dtype)) == 1 else f"_{n}"
                out.append((f"ndcls_conv_{name}_{dtype}{suffix}", source(dtype), sig))
    return out


# -- launch planning -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvPlan:
    """Launch shapes of one conv / conv_grad call: a pure function of the spec and the limits.

    ``launches[name] = (blocks, threads)`` for each kernel (blocks 0: nothing to launch);
    ``chunks`` and ``chunk_len`` split the ``batch * prod(out_spatial)`` (batch, output cell)
    pairs of the dL/dK correlation; ``scratch_bytes`` is the device memory the pipeline
    allocates beside its inputs and results, forward and gradient.
    """

    launches: dict
    chunks: int
    chunk_len: int
    scratch_bytes: dict


def _flat(n, max_threads, max_grid):
    """``(blocks, threads)`` for ``n`` threads' worth of work: whole warps, at most ``max_threads``
    per block (fewer when the work is smaller: no idle warps), grid-stride beyond ``max_grid``."""
    if n <= 0:
        return 0, 32
    threads = min(max_threads, -(-n // 32) * 32)
    return min(-(-n // threads), max_grid), threads


def conv_plan(
    spec,
    *,
    max_threads: int | None = None,
    max_grid: int | None = None,
    target_blocks: int | None = None,
    min_chunk: int | None = None,
    partial_bytes: int | None = None,
) -> ConvPlan:
    """The :class:`ConvPlan` of ``spec`` (a :class:`ndcls.ConvSpec`), the same on a GPU and under
    the simulator.

    The dL/dK correlation of every pair runs over ``W = batch * prod(out_spatial)`` cells, in
    ``chunks`` blocks per pair: enough for ``target_blocks`` blocks in all, no chunk under
    ``min_chunk`` cells, and at most ``partial_bytes`` of float64 partials (``B * chunks *
    cells``); each block gets ``max_threads`` threads unless the chunk has less work.
    """
    max_threads = THREADS if max_threads is None else max_threads
    max_grid = MAX_GRID if max_grid is None else max_grid
    target_blocks = TARGET_BLOCKS if target_blocks is None else target_blocks
    min_chunk = MIN_CHUNK if min_chunk is None else min_chunk
    partial_bytes = PARTIAL_BYTES if partial_bytes is None else partial_bytes
    k = spec.kernel
    rows, cells = k.n_batch, k.block
    elements = rows * k.n_dense * k.count
    work = spec.batch * math.prod(spec.out_spatial)
    chunks = 1
    if work > 0 and rows > 0:
        by_blocks = -(-target_blocks // rows)
        by_size = -(-work // min_chunk)
        by_memory = partial_bytes // max(1, rows * cells * 8)
        chunks = max(1, min(by_blocks, by_size, by_memory))
    chunk_len = max(1, -(-work // chunks))
    chunks = max(1, -(-work // chunk_len))  # no empty chunk
    # lanes beyond the chunk's cells would idle even for a single tap: whole warps up to chunk_len
    tap_threads = min(max_threads, max(32, -(-chunk_len // 32) * 32))
    launches = {
        "expand": _flat(k.n_learned * elements, max_threads, max_grid),
        "zero_mask": _flat(rows * cells, max_threads, max_grid),
        "mark": _flat(elements, max_threads, max_grid),
        "compact": _flat(rows, max_threads, max_grid),
        "forward": _flat(math.prod(spec.output_shape), max_threads, max_grid),
        "grad_input": _flat(math.prod(spec.input_shape), max_threads, max_grid),
        "tap_partials": (min(rows * chunks, max_grid) if cells else 0, tap_threads),
        "zero_grad_kernel": _flat(rows * cells, max_threads, max_grid),
        "tap_sums": _flat(rows * cells, max_threads, max_grid),
        "reduce": _flat(k.n_learned * elements, max_threads, max_grid),
    }
    item = np.dtype(k.dtype).itemsize
    params = 2 * k.n_learned * elements * item  # expanded positions and sigma (at most)
    taps = rows * cells * (item + 1 + 4 + item) + 4 * rows  # K, mask, tap_cell, tap_val, n_taps
    grads = rows * chunks * cells * 8 + 2 * k.n_learned * elements * item  # partials, full grad_p/grad_s
    return ConvPlan(launches, chunks, chunk_len, {"conv": params + taps, "conv_grad": params + taps + grads})


# -- host side -------------------------------------------------------------------------------------------


def _geometry(spec):
    def pad(values):
        return tuple(int(v) for v in values) + (0,) * (MAX_DIMS - len(values))

    return (
        pad(spec.kernel.sizes) + pad(spec.stride) + pad([lo for lo, _ in spec.padding])
        + pad(spec.spatial) + pad(spec.out_spatial)
    )  # fmt: skip


def _planes(shape):
    return (shape[0], shape[1], math.prod(shape[2:]))


class _Device:
    """Device arrays and launches of one call, on the stream of :class:`numba_cuda._Launch`."""

    def __init__(self, spec, arrays):
        self.spec = spec
        self.launch = _Launch(arrays)
        self.stream = self.launch.stream
        self.dtype = spec.dtype
        self.dtype_name = np.dtype(spec.dtype).name
        self.plan = conv_plan(spec)

    def to_device(self, x, shape):
        return None if x is None or math.prod(shape) == 0 else self.launch.to_device(x.reshape(shape))

    def scratch(self, shape, dtype):
        if math.prod(shape) == 0:
            return None
        if self.launch.device:  # CuPy's allocator (pool, stream-ordered), kept alive by the view
            return cuda.as_cuda_array(self.launch.cupy.empty(shape, dtype=dtype), sync=False)
        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def output(self, shape, flat_shape, out=None):
        """``(caller's array, device view in flat_shape or None)``."""
        lib = self.launch.cupy if self.launch.device else np
        host = lib.empty(shape, dtype=self.dtype) if out is None else out
        if math.prod(shape) == 0:
            return host, None
        if self.launch.device:
            return host, cuda.as_cuda_array(host.reshape(flat_shape), sync=False)
        return host, cuda.device_array(flat_shape, dtype=self.dtype, stream=self.stream)

    def results(self, *pairs):
        """The caller's arrays; NumPy callers get the device results copied back (one sync)."""
        if not self.launch.device:
            for host, dev in pairs:
                if dev is not None:
                    dev.copy_to_host(host.reshape(dev.shape), stream=self.stream)
            self.stream.synchronize()
        return tuple(host for host, _ in pairs)

    def run(self, name, kernel_name, *args, dyn=0):
        blocks, threads = self.plan.launches[name]
        if blocks:
            _compiled(kernel_name, self.dtype_name)[blocks, threads, self.stream, dyn](*args)

    def zero(self, name, a):
        if a is not None:
            self.run(name, "zero", a.reshape(a.size))


class _Taps:
    """Steps 1-4: expanded positions and sigma, ``K``, the touched mask and the compacted taps."""

    def __init__(self, dev: _Device, weight, positions, sigma):
        spec = dev.spec
        k = spec.kernel
        rows, cells, n_el = k.n_batch, k.block, k.n_dense * k.count
        full = (k.n_learned, rows, k.n_dense, k.count)
        self.weight = dev.to_device(weight, (rows, k.n_dense, k.count))
        self.positions = self._expand(dev, positions, full, n_el)
        self.sigma = None if sigma is None else self._expand(dev, sigma, full, n_el)
        self.kernel = dev.scratch((rows, cells), dev.dtype)
        self.mask = dev.scratch((rows, cells), np.uint8)
        self.n_taps = dev.scratch((rows,), np.int32)
        self.cell = dev.scratch((rows, cells), np.int32)
        self.value = dev.scratch((rows, cells), dev.dtype)
        if self.n_taps is None:  # no channel pair
            return
        dev.zero("zero_mask", self.mask)
        if self.weight is not None:  # some element exists
            launch_construct(k, dev.stream, self.weight, self.positions, self.sigma, self.kernel)
            kind = _element.INTERPOLATION_CODES[k.interpolation]
            dev.run(
                "mark", "mark", self.positions, self.positions if self.sigma is None else self.sigma, self.mask,
                _layout(k), k.ndim - k.n_learned, kind, gauss_cut(k.dtype),
            )  # fmt: skip
        else:
            dev.zero("zero_mask", self.kernel.reshape(self.kernel.size))
        dev.run("compact", "compact", self.mask, self.kernel, self.n_taps, self.cell, self.value)

    @staticmethod
    def _expand(dev, a, full, n_el):
        """``(M, Po, Pi, D, C)`` -> ``(M, B, D, C)`` on the device (no copy if nothing broadcasts)."""
        m, rows = full[0], full[1]
        if math.prod(full) == 0:
            return None
        src = dev.to_device(a, (m, a.shape[1], a.shape[2], n_el))
        k = dev.spec.kernel
        if a.shape[1:3] == tuple(k.batch_shape):
            return src.reshape(full)
        dst = dev.scratch((m, *k.batch_shape, n_el), dev.dtype)
        dev.run("expand", "expand", src, dst)
        return dst.reshape(full)


def conv(spec, input, weight, positions, sigma, out=None):
    """``(batch, out_channels, *out_spatial)`` (docs/conv.md, "GPU")."""
    dev = _Device(spec, (input, weight, positions, sigma, out))
    result = dev.output(spec.output_shape, _planes(spec.output_shape), out)
    taps = _Taps(dev, weight, positions, sigma)
    if result[1] is not None:
        x = dev.to_device(input, _planes(spec.input_shape))
        if x is None or taps.n_taps is None:  # no input channel or no pair: zeros
            dev.zero("forward", result[1].reshape(result[1].size))
        else:
            dev.run(
                "forward", "forward", x, taps.n_taps, taps.cell, taps.value, result[1],
                _geometry(spec), spec.ndim, spec.group_in, spec.group_out,
            )  # fmt: skip
    return dev.results(result)[0]


def conv_grad(spec, grad_output, input, weight, positions, sigma):
    """``(grad_input, grad_weight, grad_positions, grad_sigma)`` (docs/conv.md, "GPU"); grad_positions
    and grad_sigma shaped like the positions and sigma received."""
    k = spec.kernel
    dev = _Device(spec, (grad_output, input, weight, positions, sigma))
    plan = dev.plan
    geometry = (_geometry(spec), spec.ndim, spec.group_in, spec.group_out)
    gx = dev.output(spec.input_shape, _planes(spec.input_shape))
    gw = dev.output(weight.shape, (k.n_batch, k.n_dense, k.count))
    gp = dev.output(positions.shape, (k.n_learned, *positions.shape[1:3], k.n_dense * k.count))
    gs = None if sigma is None else dev.output(sigma.shape, (k.n_learned, *sigma.shape[1:3], k.n_dense * k.count))
    taps = _Taps(dev, weight, positions, sigma)
    g = dev.to_device(grad_output, _planes(spec.output_shape))
    x = dev.to_device(input, _planes(spec.input_shape))
    if gx[1] is not None:
        if g is None or taps.n_taps is None:
            dev.zero("grad_input", gx[1].reshape(gx[1].size))
        else:
            dev.run("grad_input", "grad_input", g, taps.n_taps, taps.cell, taps.value, gx[1], *geometry)
    if gw[1] is not None:  # some element: dL/dK at the taps, then the construction's chain rule
        grad_kernel = taps.kernel  # K is no longer needed: its storage becomes dK
        dev.zero("zero_grad_kernel", grad_kernel.reshape(grad_kernel.size))
        if g is not None and x is not None:
            partial = dev.scratch((k.n_batch, plan.chunks, k.block), np.float64)
            threads = plan.launches["tap_partials"][1]
            dev.run(
                "tap_partials", "tap_partials", g, x, taps.n_taps, taps.cell, partial, *geometry, plan.chunk_len,
                dyn=8 * threads,
            )  # fmt: skip
            dev.run("tap_sums", "tap_sums", taps.n_taps, taps.cell, partial, grad_kernel)
        full = (k.n_learned, k.n_batch, k.n_dense, k.count)
        shape = (k.n_learned, *k.batch_shape, k.n_dense * k.count)
        reduce_p = tuple(positions.shape[1:3]) != tuple(k.batch_shape)
        reduce_s = sigma is not None and tuple(sigma.shape[1:3]) != tuple(k.batch_shape)
        fp = dev.scratch(full, dev.dtype) if reduce_p else gp[1].reshape(full)
        fs = None if sigma is None else dev.scratch(full, dev.dtype) if reduce_s else gs[1].reshape(full)
        launch_construct_grad(k, dev.stream, grad_kernel, taps.weight, taps.positions, taps.sigma, gw[1], fp, fs)
        if reduce_p:  # summed over the channel axes the caller's positions broadcast along
            dev.run("reduce", "reduce", fp.reshape(shape), gp[1])
        if reduce_s:
            dev.run("reduce", "reduce", fs.reshape(shape), gs[1])
    results = dev.results(*(r for r in (gx, gw, gp, gs) if r is not None))
    grad_x, grad_w, grad_p = results[:3]
    return grad_x, grad_w, grad_p, results[3] if gs is not None else None
