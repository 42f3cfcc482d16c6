"""Backend "cupy": the direct convolution ``conv`` / ``conv_grad`` (SPEC section 9) in CUDA C++.

The pipeline (docs/conv.md, section "GPU"; kernels in ``cuda/dcls_conv.cu``): the cells the
elements touch are marked and listed per row (the taps) with the values the dense kernel ``K``
would hold there (``K`` itself is not built), the convolution and its gradients visit only
those taps, and the element gradients come from ``construct_grad`` of ``dL/dK`` at the taps (the
chain rule shared with the construction). Every buffer size follows from the shapes, so nothing
waits for the device: calls can be captured in a CUDA graph. The kernels use no float atomics
and write every value from one thread in a fixed order, so results are bitwise reproducible.

Canonical arrays (``ndcls._api._prepare_conv``): input ``(batch, in_channels, *spatial)``,
weight ``(O, I, D, C)``, positions and sigma ``(M, Po, Pi, D, C)`` with ``Po`` in ``{1, O}``
and ``Pi`` in ``{1, I}``; B = O * I rows of ``cells = prod(sizes)`` kernel cells.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ndcls._spec import MAX_DIMS, gauss_cut
from ndcls.kernels import cupy_backend as cb
from ndcls.kernels._element import INTERPOLATION_CODES

_SOURCE = "dcls_conv.cu"
_THREADS = 256
#: blocks per SM the dL/dK reduction aims for when it splits rows into chunks
_BLOCKS_PER_SM = 8
#: shared memory for the staged taps of conv_planes_kernel (under every device's default 48 KiB)
STAGE_BYTES = 32 * 1024
#: the most batch items one block of conv_planes_kernel serves (NDCLS_CONV_BATCH in dcls_conv.cu)
BATCH_PER_BLOCK = 8
#: CUDA's limit on gridDim.y (the planes of conv_planes_kernel; more are walked by a loop)
_MAX_GRID_Y = 65535


@dataclass(frozen=True)
class ConvSpecialisation:
    """One instantiation of the conv templates: storage dtype, M, interpolation, N, index width."""

    dtype: str
    n_learned: int
    interpolation: str
    ndim: int
    int64: bool

    @property
    def names(self) -> dict[str, str]:
        t, i = cb.CTYPES[self.dtype], cb.INDEX_TYPES[self.int64]
        kind = str(INTERPOLATION_CODES[self.interpolation])
        n = str(self.ndim)
        return {
            "mark": f"ndcls::conv_mark_kernel<{t}, {self.n_learned}, {kind}, {i}>",
            "compact": f"ndcls::conv_compact_kernel<{t}, {self.n_learned}, {kind}, {i}>",
            "forward": f"ndcls::conv_planes_kernel<{t}, {n}, {i}, false>",
            "grad_input": f"ndcls::conv_planes_kernel<{t}, {n}, {i}, true>",
            "grad_taps": f"ndcls::conv_grad_taps_kernel<{t}, {n}, {i}>",
            "scatter": f"ndcls::conv_scatter_kernel<{t}, {i}>",
        }


def specialisations(max_ndim: int = 3) -> tuple[ConvSpecialisation, ...]:
    """Specialisations of N <= ``max_ndim`` (the compile-only test builds them)."""
    return tuple(
        ConvSpecialisation(dtype, m, interpolation, n, int64)
        for dtype in ("float32", "float64")
        for n in range(1, max_ndim + 1)
        for m in range(1, n + 1)
        for interpolation in INTERPOLATION_CODES
        for int64 in (False, True)
    )


def geometry_dtype(int64: bool) -> np.dtype:
    """NumPy twin of ``ConvGeometry<I>`` (every field of type I: no padding)."""
    it = np.int64 if int64 else np.int32
    arrays = [(name, it, (MAX_DIMS,)) for name in ("spatial", "out_spatial", "ksizes", "stride", "pad")]
    scalars = [(name, it) for name in ("batch", "in_channels", "out_channels", "group_in", "group_out")]
    scalars += [(name, it) for name in ("in_cells", "out_cells", "cells", "cap")]
    return np.dtype(arrays + scalars, align=True)


# -- planning (pure arithmetic on shapes and device limits, tested without a GPU) ------------


@dataclass(frozen=True)
class Stage:
    """Launch of conv_planes_kernel: the source rows' taps packed ``entries`` at a time into shared
    memory (at most ``span`` taps of a row per pass), each block serving ``batch`` batch items."""

    entries: int
    span: int
    batch: int
    shared: int  # bytes of dynamic shared memory
    threads: int  # per block: the cells of a tile of one destination plane
    grid: tuple  # (tiles of a plane, (channel, batch chunk) items walked at once)


def stage(cap: int, ndim: int, acc_bytes: int, batch: int, channels: int, plane_cells: int, fill_blocks: int,
          budget: int = STAGE_BYTES) -> Stage:
    """The staging and launch shape of conv_planes_kernel for rows of ``cap`` tap slots and a
    destination of ``batch`` x ``channels`` planes of ``plane_cells`` cells. Each block serves as
    many batch items (at most BATCH_PER_BLOCK) as keeps ``fill_blocks`` blocks busy."""
    threads = min(_THREADS, max(64, -(-plane_cells // 32) * 32))
    tiles = max(1, -(-plane_cells // threads))
    entry = 4 * ndim + acc_bytes  # kernel coordinates and value of a staged tap
    fixed = 4 * (threads + 1)  # the rows' tap ends and the count of staged rows
    entries = max(1, (budget - fixed) // entry)
    per_block = max(1, min(BATCH_PER_BLOCK, batch, tiles * channels * batch // max(1, fill_blocks)))
    items = channels * -(-batch // per_block)
    return Stage(entries, min(cap, entries), per_block, entries * entry + fixed, threads,
                 (tiles, max(1, min(items, _MAX_GRID_Y))))


@dataclass(frozen=True)
class ConvPlan:
    """Sizes and launch shapes of one conv call."""

    n_rows: int  # B = out_channels * group_in
    cells: int  # kernel cells per row
    cap: int  # tap slots per row
    n_chunks: int  # chunks of batch x output cells per row in the dL/dK reduction
    int64: bool
    forward: Stage
    transposed: Stage
    threads: int = _THREADS

    @property
    def compact_threads(self) -> int:
        """Threads of conv_compact_kernel's blocks (one row per block): the row's cells, 32 to 256."""
        return min(_THREADS, max(32, -(-self.cells // 32) * 32))

    def grid(self, items: int, n_sm: int) -> int:
        """Blocks of a grid-stride loop over ``items`` (at least 1, at most 32 waves)."""
        return max(1, min(-(-items // self.threads), 32 * _BLOCKS_PER_SM * n_sm))


def tap_capacity(spec) -> int:
    """Tap slots per row: every cell, or fewer where the interpolation bounds the taps (bilinear:
    2**M cells per element, D * C elements per row)."""
    k = spec.kernel
    if k.interpolation == "bilinear":
        return max(1, min(k.block, k.n_dense * k.count * 2**k.n_learned))
    return max(1, k.block)


def plan(spec, n_sm: int, threads: int = _THREADS) -> ConvPlan:
    """The plan of ``spec`` on a device of ``n_sm`` multiprocessors."""
    if threads % 32:
        raise ValueError(f"threads per block must be whole warps (block_sum), got {threads}")
    k = spec.kernel
    n_rows, cells, cap = k.n_batch, k.block, tap_capacity(spec)
    work = spec.batch * math.prod(spec.out_spatial)
    wanted = -(-_BLOCKS_PER_SM * n_sm // max(n_rows, 1))  # enough blocks to fill the device
    n_chunks = max(1, min(wanted, work // (4 * threads)))  # each thread sums >= 4 values
    flat = (
        spec.batch * spec.in_channels * math.prod(spec.spatial),
        spec.batch * spec.out_channels * math.prod(spec.out_spatial),
        n_rows * cells,
        n_rows * n_chunks * cap,
        n_rows * n_chunks,
        k.n_learned * n_rows * k.n_dense * k.count,
    )
    int64 = cb.index_is_64bit(k) or max(flat) >= 2**30
    acc = 8 if np.dtype(k.dtype) == np.float64 else 4
    out_cells, in_cells = math.prod(spec.out_spatial), math.prod(spec.spatial)
    fill = _BLOCKS_PER_SM * n_sm
    forward = stage(cap, spec.ndim, acc, spec.batch, spec.out_channels, out_cells, fill_blocks=fill)
    transposed = stage(cap, spec.ndim, acc, spec.batch, spec.in_channels, in_cells, fill_blocks=fill)
    return ConvPlan(n_rows, cells, cap, n_chunks, int64, forward, transposed, threads)


def geometry_value(spec, p: ConvPlan) -> np.void:
    """The ``ConvGeometry<I>`` kernel argument of ``spec``."""
    value = np.zeros((), dtype=geometry_dtype(p.int64))
    n = spec.ndim
    value["spatial"][:n] = spec.spatial
    value["out_spatial"][:n] = spec.out_spatial
    value["ksizes"][:n] = spec.kernel.sizes
    value["stride"][:n] = spec.stride
    value["pad"][:n] = [lo for lo, _ in spec.padding]
    for name, v in (
        ("batch", spec.batch), ("in_channels", spec.in_channels), ("out_channels", spec.out_channels),
        ("group_in", spec.group_in), ("group_out", spec.group_out), ("in_cells", math.prod(spec.spatial)),
        ("out_cells", math.prod(spec.out_spatial)), ("cells", p.cells), ("cap", p.cap),
    ):  # fmt: skip
        value[name] = v
    return value[()]


def call_plan(spec, n_sm: int, threads: int = _THREADS) -> tuple[ConvPlan, ConvSpecialisation, np.void]:
    """The plan of ``spec`` on a device of ``n_sm`` multiprocessors, the specialisation it runs
    and its ``ConvGeometry<I>`` argument (pure: the CPU emulation of the kernels uses it too)."""
    p = plan(spec, n_sm, threads)
    key = ConvSpecialisation(spec.kernel.dtype_name, spec.kernel.n_learned, spec.kernel.interpolation, spec.ndim, p.int64)
    return p, key, geometry_value(spec, p)


@functools.lru_cache(maxsize=1024)
def _call_plan(spec, device_id: int):
    return call_plan(spec, cb._limits(device_id).n_sm)


def _kernels(key: ConvSpecialisation) -> dict:
    names = key.names
    functions = cb.load_functions(cb.kernel_source(_SOURCE), tuple(names.values()))
    return {role: functions[name] for role, name in names.items()}


# -- the pipeline ------------------------------------------------------------------------------


def _rows(a, spec):
    """Positions or sigma ``(M, Po, Pi, D, C)`` broadcast to the contiguous rows ``(M, B, D, C)``."""
    if a is None:
        return None
    k = spec.kernel
    full = (k.n_learned, *k.batch_shape, k.n_dense, k.count)
    return cb._cupy().ascontiguousarray(cb._cupy().broadcast_to(a, full)).reshape(k.n_learned, k.n_batch, k.n_dense, k.count)


class _Taps:
    """The taps of one call: ``n_taps (B,)``, ``cell``/``value (B * cap,)``, on the device (the
    values are those of ``K``, which is not built)."""

    def __init__(self, spec, weight, positions, sigma, device_id):
        cupy = cb._cupy()
        k = spec.kernel
        self.plan, self.key, self.geometry = _call_plan(spec, device_id)
        self.kernels = _kernels(self.key)
        p = self.plan
        it = np.int64 if p.int64 else np.int32
        self.weight = weight.reshape(k.n_batch, k.n_dense, k.count)
        self.positions, self.sigma = _rows(positions, spec), _rows(sigma, spec)
        acc = np.float64 if k.dtype == np.float64 else np.float32
        mask = cupy.zeros(p.n_rows * p.cells, dtype=np.uint8)
        n_elements = k.n_batch * k.n_dense * k.count
        scale = cupy.empty(n_elements, dtype=acc)
        row_sums = cupy.empty(k.n_learned * n_elements if k.interpolation != "bilinear" else 1, dtype=acc)  # unused for bilinear
        layout = cb.layout_value(k.sizes, k.learned_dims, p.int64)
        radius = gauss_cut(k.dtype) if k.interpolation == "gauss" else 0.0
        sigma_arg = self.positions if self.sigma is None else self.sigma
        self.kernels["mark"](
            (p.grid(n_elements, cb._limits(device_id).n_sm),), (p.threads,),
            (self.weight, self.positions, sigma_arg, mask, scale, row_sums, layout, it(k.n_batch), it(k.n_dense),
             it(k.count), it(k.block), np.float64(radius)),
        )  # fmt: skip
        self.n_taps = cupy.empty(p.n_rows, dtype=it)
        self.cell = cupy.empty(p.n_rows * p.cap, dtype=it)
        self.value = cupy.empty(p.n_rows * p.cap, dtype=acc)
        self.kernels["compact"](
            (max(1, min(p.n_rows, 2**31 - 1)),), (p.compact_threads,),
            (self.positions, sigma_arg, scale, row_sums, mask, self.n_taps, self.cell, self.value, layout,
             it(p.n_rows), it(k.n_dense), it(k.count), it(p.cells), it(p.cap)),
            shared_mem=4 * p.compact_threads,
        )  # fmt: skip


def _planes(kernel, st: Stage, src, taps, dst):
    kernel(st.grid, (st.threads,), (src, taps.n_taps, taps.cell, taps.value, dst, taps.geometry, np.int32(st.entries),
                                    np.int32(st.span), np.int32(st.batch)), shared_mem=st.shared)


def _grad_taps(taps, grad_output, input, partial=None):
    """dL/dK at the taps, one partial sum per (row, chunk, tap slot): ``(n_rows * n_chunks * cap,)``."""
    p = taps.plan
    it = np.int64 if p.int64 else np.int32
    if partial is None:
        partial = cb._cupy().empty(p.n_rows * p.n_chunks * p.cap, dtype=taps.value.dtype)
    taps.kernels["grad_taps"](
        (max(1, min(p.n_rows * p.n_chunks, 2**31 - 1)),), (p.threads,),
        (grad_output, input, taps.n_taps, taps.cell, partial, taps.geometry, it(p.n_rows), it(p.n_chunks)),
        shared_mem=p.threads // 32 * taps.value.dtype.itemsize,
    )  # fmt: skip
    return partial


def _on_device(*arrays):
    host = isinstance(arrays[0], np.ndarray)
    device_id, moved = cb._device_and_arrays(*arrays)
    return host, device_id, moved


def conv(spec, input, weight, positions, sigma, out=None):
    """``(batch, out_channels, *out_spatial)`` from the canonical arrays (NumPy in, NumPy out)."""
    host, device_id, (x, w, p, s) = _on_device(input, weight, positions, sigma)
    cupy = cb._cupy()
    result = cupy.empty(spec.output_shape, dtype=spec.dtype)
    if result.size:
        if w.size == 0 or x.size == 0:
            result.fill(0)
        else:
            taps = _Taps(spec, w, p, s, device_id)
            _planes(taps.kernels["forward"], taps.plan.forward, x, taps, result)
    if not host:
        return result
    if out is None:
        return result.get()
    result.get(out=out)
    return out


def conv_grad(spec, grad_output, input, weight, positions, sigma):
    """``(grad_input, grad_weight (B, D, C), grad_positions, grad_sigma)``; see cpu_conv.conv_grad."""
    host, device_id, (gy, x, w, p, s) = _on_device(grad_output, input, weight, positions, sigma)
    cupy = cb._cupy()
    k = spec.kernel
    grad_x = cupy.zeros(spec.input_shape, dtype=spec.dtype)
    grad_kernel = cupy.zeros((k.n_batch, k.block), dtype=spec.dtype)
    if w.size and x.size and gy.size:
        taps = _Taps(spec, w, p, s, device_id)
        plan_, it = taps.plan, (np.int64 if taps.plan.int64 else np.int32)
        n_sm = cb._limits(device_id).n_sm
        _planes(taps.kernels["grad_input"], plan_.transposed, gy, taps, grad_x)
        partial = _grad_taps(taps, gy, x)
        taps.kernels["scatter"](
            (plan_.grid(plan_.n_rows * plan_.cap, n_sm),), (plan_.threads,),
            (taps.n_taps, taps.cell, partial, grad_kernel, it(plan_.n_rows), it(plan_.cells), it(plan_.cap), it(plan_.n_chunks)),
        )  # fmt: skip
        positions_full, sigma_full, weight_rows = taps.positions, taps.sigma, taps.weight
    else:
        positions_full, sigma_full, weight_rows = _rows(p, spec), _rows(s, spec), w.reshape(k.n_batch, k.n_dense, k.count)
    grad_w, grad_p, grad_s = cb.construct_grad(k, grad_kernel, weight_rows, positions_full, sigma_full)
    grads = (grad_x, grad_w, spec.sum_to(grad_p, p.shape), None if s is None else spec.sum_to(grad_s, s.shape))
    if host:
        return tuple(None if a is None else cupy.asnumpy(a) for a in grads)
    return grads
