"""CPU-only checks of the "cupy" backend's direct convolution (ndcls/kernels/cupy_conv.py).

* Its plan (pure arithmetic on shapes and device limits) on the benchmark shapes with an H100's
  limits: tap capacity, chunks of the dL/dK reduction, the staged-tap launches (batch items per
  block), index width; its constants against the kernels'.
* Its CUDA kernels (cuda/dcls_conv.cu) under the g++ host emulation (tests/_cuda_emulator.py)
  against the NumPy reference, on shapes that reach the code paths the shared harness's small
  cases do not (several chunks, staging passes and stages, partial batch chunks, long rows,
  grid-stride loops, the GPU's own grid sizes) and with 64-bit indices. The harness itself
  (tests/test_conv.py) also runs on "cupy-emulated".
* That the route uses no atomics (bitwise reproducible results).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

import _cuda_emulator as emu
import ndcls
from _conv_cases import conv_cases
from _harness import registered
from _tolerances import assert_close
from ndcls.bench.conv import GPU_CASES
from ndcls.kernels import cupy_backend as cb
from ndcls.kernels import cupy_conv as cc

EMULATED = "cupy-emulated"
needs_gxx = pytest.mark.skipif(emu.compiler() is None, reason="needs g++ for the host emulation")
H100_SMS = 132


@pytest.fixture(scope="module")
def emulated():
    with registered(EMULATED):
        yield EMULATED


# -- the plan with real device limits ----------------------------------------------------------------


def _bench_spec(case, interpolation):
    """The ConvSpec of a benchmark case (every axis learned, as the layers do)."""
    n, batch = case.ndim, case.input_shape[0]
    w = (case.out_channels, case.in_channels // case.groups, case.count)
    p = (n, *w)
    sigma = p if interpolation != "bilinear" else None
    return ndcls.ConvSpec.from_arguments(
        input_shape=(batch, case.in_channels, *case.input_shape[2:]), input_dtype="float32",
        weight_shape=w, weight_dtype="float32", positions_shape=p, positions_dtype="float32",
        sigma_shape=sigma, sigma_dtype=None if sigma is None else "float32", sizes=(case.dilated,) * n,
        interpolation=interpolation, learned_dims=None, padding=case.padding, groups=case.groups,
    )  # fmt: skip


def _conv_spec(input_shape, weight_shape, sizes, interpolation="gauss", groups=1, padding="same", learned=None):
    m = len(sizes) if learned is None else len(learned)
    p = (m, *weight_shape)
    sigma = p if interpolation != "bilinear" else None
    return ndcls.ConvSpec.from_arguments(
        input_shape=input_shape, input_dtype="float32", weight_shape=weight_shape, weight_dtype="float32",
        positions_shape=p, positions_dtype="float32", sigma_shape=sigma, sigma_dtype=None if sigma is None else "float32",
        sizes=sizes, interpolation=interpolation, learned_dims=learned, padding=padding, groups=groups,
    )  # fmt: skip


def _flat_sizes(spec, p):
    k = spec.kernel
    return (
        spec.batch * spec.in_channels * math.prod(spec.spatial),
        spec.batch * spec.out_channels * math.prod(spec.out_spatial),
        p.n_rows * p.cells,
        p.n_rows * p.n_chunks * p.cap,
        k.n_learned * k.n_batch * k.n_dense * k.count,
    )


def _check_plan(spec, n_sm):
    """Invariants of cupy_conv.plan that the kernels rely on (and that fill the device)."""
    k = spec.kernel
    p = cc.plan(spec, n_sm)
    assert p.n_rows == spec.out_channels * spec.group_in == k.n_batch
    assert p.cells == k.block
    assert 1 <= p.cap <= p.cells
    if k.interpolation == "bilinear":
        assert p.cap == min(p.cells, k.n_dense * k.count * 2**k.n_learned)
    else:
        assert p.cap == p.cells
    # dL/dK: n_rows * n_chunks blocks, enough to fill the device unless a chunk would get
    # fewer than 4 values per thread
    work = spec.batch * math.prod(spec.out_spatial)
    assert p.n_chunks >= 1
    blocks = p.n_rows * p.n_chunks
    assert 1 <= blocks <= 2**31 - 1
    if p.n_chunks > 1:
        assert work // p.n_chunks >= 4 * p.threads
        assert (p.n_chunks - 1) * p.n_rows < 8 * n_sm  # no more chunks than filling the device needs
    else:
        assert p.n_rows >= 8 * n_sm or work < 8 * p.threads
    # index width: 32-bit only while every flat index (and a grid-stride step past it) fits
    if not p.int64:
        assert max(_flat_sizes(spec, p)) < 2**30
    # grids of the grid-stride loops and of the staged-tap kernel
    for items in (k.n_batch * k.n_dense * k.count, p.n_rows * p.cap, 1, 0):
        assert 1 <= p.grid(items, n_sm) <= 32 * 8 * n_sm
    assert p.compact_threads % 32 == 0 and 32 <= p.compact_threads <= 256
    acc = 8 if spec.kernel.dtype == np.float64 else 4
    for st, channels, plane_cells in (
        (p.forward, spec.out_channels, math.prod(spec.out_spatial)),
        (p.transposed, spec.in_channels, math.prod(spec.spatial)),
    ):
        assert st.span == min(p.cap, st.entries) >= 1  # a row's pass always fits one stage
        assert st.shared == st.entries * (4 * spec.ndim + acc) + 4 * (st.threads + 1)
        assert st.shared <= cc.STAGE_BYTES <= 48 * 1024  # no opting in
        assert st.shared + 4 * spec.ndim + acc > cc.STAGE_BYTES  # as many slots as the budget holds
        assert st.threads % 32 == 0 and 64 <= st.threads <= 1024
        tiles, walked = st.grid
        assert tiles * st.threads >= plane_cells and (tiles - 1) * st.threads < plane_cells
        # batch items per block: as many as keep 8 blocks per SM busy, at most the registers' 8
        assert 1 <= st.batch <= min(cc.BATCH_PER_BLOCK, max(spec.batch, 1))
        items = channels * -(-spec.batch // st.batch)
        if st.batch > 1:
            assert tiles * items >= 8 * n_sm  # the device stays filled
        assert 1 <= walked <= min(items, 65535) or (items == 0 and walked == 1)
    geometry = cc.geometry_value(spec, p)
    assert geometry.dtype == cc.geometry_dtype(p.int64)
    assert geometry["cap"] == p.cap and geometry["cells"] == p.cells
    return p


@pytest.mark.parametrize("interpolation", ["bilinear", "gauss"])
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c.version == "v0" and c.ndim < 3], ids=lambda c: c.name)
def test_plan_on_the_benchmark_shapes_with_h100_limits(case, interpolation):
    spec = _bench_spec(case, interpolation)
    p = _check_plan(spec, H100_SMS)
    assert not p.int64
    if "ConvNeXt" in case.name:  # 96 depthwise rows of 17x17 cells; 34 bilinear elements touch <= 136
        assert p.n_rows == 96 and p.cells == 289
        assert p.cap == (136 if interpolation == "bilinear" else 289)
        assert p.n_chunks == 11  # 96 * 11 blocks >= 8 per SM
    if "DiffWave" in case.name:  # 4096 rows of 1025 cells; 3 bilinear elements touch <= 6
        assert p.n_rows == 4096 and p.cap == (6 if interpolation == "bilinear" else 1025) and p.n_chunks == 1
    if "delays" in case.name:  # 256 * 700 rows, one element each: 2 bilinear taps
        assert p.n_rows == 256 * 700 and p.cap == (2 if interpolation == "bilinear" else 250) and p.n_chunks == 1
    # blocks serve 8 batch items: (tiles, channel x batch chunk items) fill the 132 SMs
    expected_grids = {"ConvNeXt": ((13, 96 * 4), (13, 96 * 4)), "DiffWave": ((32, 64), (32, 64)),
                      "delays": ((1, 256 * 8), (1, 700 * 8))}  # fmt: skip
    name = next(n for n in expected_grids if n in case.name)
    assert (p.forward.grid, p.transposed.grid) == expected_grids[name]
    assert p.forward.batch == p.transposed.batch == 8
    assert p.forward.span == p.cap  # every row's taps in one pass


def test_conv_kernels_use_no_atomics():
    """Every value of the route is written by one thread in a fixed order, so results are bitwise
    reproducible (docs/conv.md, section 7): the conv kernels' own code has no atomic operation,
    and the route does not build K with the construction kernel (which sums with atomics)."""
    def code(path):
        return "\n".join(line.split("//")[0].split("#")[0] for line in path.read_text().splitlines())

    kernels, host = code(Path(cc.__file__).parent / "cuda" / cc._SOURCE), code(Path(cc.__file__))
    assert "atomic" not in kernels.lower() and "construct_kernel" not in kernels
    assert "cb.construct(" not in host and "construct_grad(" in host


def test_planner_constants_are_the_kernels():
    """The batch items a block serves and the register sums of conv_planes_kernel are one number."""
    source = cb.kernel_source("dcls_conv.cu")
    assert f"#define NDCLS_CONV_BATCH {cc.BATCH_PER_BLOCK}\n" in source
    with pytest.raises(ValueError, match="whole warps"):
        cc.plan(_conv_spec((1, 2, 9), (2, 2, 1), (3,)), H100_SMS, threads=48)


@pytest.mark.parametrize("batch, wide", [(63, False), (64, True)])
def test_plan_takes_64bit_indices_when_a_flat_index_reaches_2_30(batch, wide):
    """A depthwise 3x3 over 256 channels of 256 x 256: K, positions and taps are small, the
    input and output hold batch * 2**24 values (2**30 at batch 64)."""
    spec = _conv_spec((batch, 256, 256, 256), (256, 1, 3), (3, 3), groups=256)
    assert not cb.index_is_64bit(spec.kernel)
    p = _check_plan(spec, H100_SMS)
    assert p.int64 == wide
    assert max(_flat_sizes(spec, p)) == batch * 2**24


def test_plan_on_a_small_device_splits_long_rows_into_chunks():
    spec = _conv_spec((2, 2, 1000), (2, 1, 2), (5,), groups=2)
    p = _check_plan(spec, emu.LIMITS.n_sm)
    assert p.n_chunks == 1  # 256 threads: 2000 values are too few to split
    p = _check_plan(spec, H100_SMS)
    assert p.n_chunks == 1
    p = cc.plan(spec, emu.LIMITS.n_sm, threads=emu.THREADS)
    assert p.n_chunks == 7  # 64 threads: 2000 // 256 chunks, fewer than the 8 that fill 2 SMs


# -- the kernels, emulated -------------------------------------------------------------------------


def _compare(backend, x, w, p, sizes, **kw):
    out = ndcls.conv(x, w, p, sizes, backend=backend, **kw)
    assert_close(out, ndcls.conv(x, w, p, sizes, backend="numpy", **kw), what="output")
    g = np.random.default_rng(7).standard_normal(out.shape).astype(x.dtype)
    got = ndcls.conv_grad(g, x, w, p, sizes, backend=backend, **kw)
    expected = ndcls.conv_grad(g, x, w, p, sizes, backend="numpy", **kw)
    for name, a, e in zip(("input", "weight", "positions", "sigma"), got, expected):
        if e is None:
            assert a is None, f"grad_{name} must be None"
        else:
            assert a.shape == e.shape
            assert_close(a, e, what=f"grad_{name}")


def _forced(monkeypatch, int64=None, stage_args=None):
    """Patch cupy_conv's plan: force the index width, or the keywords ``stage_args`` of
    ``cupy_conv.stage`` (``budget``: the bytes the taps are staged in; ``fill_blocks``)."""
    if int64 is not None:
        plan = cc.plan
        monkeypatch.setattr(cc, "plan", lambda *a, **kw: replace(plan(*a, **kw), int64=int64))
    if stage_args:
        stage = cc.stage
        monkeypatch.setattr(cc, "stage", lambda *a, **kw: stage(*a, **dict(kw, **stage_args)))


def _arrays(rng, x_shape, w_shape, sizes, learned, interpolation, dtype, spread=1.0):
    m = len(learned)
    rows = np.array([sizes[a] for a in learned], dtype=float).reshape((m,) + (1,) * len(w_shape))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    p = (rng.uniform(-0.5, 0.5, size=(m, *w_shape)) * spread + 0.5) * rows - 0.5
    s = rng.uniform(0.6, 2.0, size=p.shape).astype(dtype) if interpolation != "bilinear" else None
    return x, w, p.astype(dtype), s


# name -> (input, weight, sizes, learned, options, plan checks, stage keywords)
PATHS = {
    # 64 threads, 2 SMs: 7 chunks of the batch x output cells per row; planes of 1000 cells walked
    # by 3 of 4 tiles, 4 planes by 3 blocks (grid-stride loops)
    "chunked dL/dK, grid-stride planes": (
        (2, 2, 1000), (2, 1, 2), (5,), (0,), dict(groups=2, padding="same"),
        lambda spec, p: p.n_chunks == 7 and p.forward.grid == (4, 4), None,
    ),
    # one tap slot: every tap is a stage of its own
    "staged taps, one at a time": (
        (1, 6, 5, 4), (4, 3, 2), (3, 2), (0, 1), dict(groups=2, padding=1, stride=(2, 1)),
        lambda spec, p: p.forward.entries == p.transposed.entries == p.forward.span == 1 and p.cap > 1, dict(budget=30),
    ),
    # 3 or 4 slots for rows of up to 6 taps: two passes over the rows, the first staging one row
    # at a time, the second packing the rows' remaining taps
    "staged taps, partial passes": (
        (2, 3, 6, 5), (2, 3, 2), (3, 2), (0, 1), dict(padding="same"),
        lambda spec, p: p.forward.span == p.forward.entries in (3, 4) and p.cap == 6 and spec.group_in == 3,
        dict(budget=4 * 65 + 4 * 12),
    ),
    # 289 cells per row: the compaction scans two chunks of 256 cells, the marks cross rows
    "long rows": (
        (1, 2, 3, 4), (2, 1, 3), (17, 17), (1, 0), dict(groups=2, padding=8),
        lambda spec, p: p.cells == 289 and p.compact_threads == 256, None,
    ),
    # N = 3, one learned axis among dense ones, strides and uneven padding
    "3-D, dense axes": (
        (2, 2, 5, 4, 6), (2, 2, 2, 3, 2), (2, 3, 3), (2,), dict(padding=(1, 0, 2), stride=(2, 1, 2)),
        lambda spec, p: spec.kernel.n_dense == 6, None,
    ),
    # blocks serving 8 batch items, then the last 3; 70 source rows: stages of at most 64 rows
    "batch items per block, many rows": (
        (11, 70, 9), (3, 70, 2), (5,), (0,), dict(padding=2, stride=2),
        lambda spec, p: p.forward.batch == p.transposed.batch == 8 and spec.group_in > p.forward.threads,
        dict(fill_blocks=1),
    ),
}


@needs_gxx
@pytest.mark.cuda_compile
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("path", list(PATHS))
def test_emulated_conv_launch_paths(emulated, monkeypatch, path, interpolation, int64):
    x_shape, w_shape, sizes, learned, options, reached, stage_args = PATHS[path]
    _forced(monkeypatch, int64=int64, stage_args=stage_args)
    dtype = np.float64 if int64 else np.float32
    rng = np.random.default_rng(sum(map(ord, path + interpolation)))
    x, w, p, s = _arrays(rng, x_shape, w_shape, sizes, learned, interpolation, dtype)
    kw = dict(options, sigma=s, interpolation=interpolation, learned_dims=learned)
    spec = ndcls.ConvSpec.from_arguments(
        input_shape=x.shape, input_dtype=x.dtype, weight_shape=w.shape, weight_dtype=w.dtype, positions_shape=p.shape,
        positions_dtype=p.dtype, sigma_shape=None if s is None else s.shape, sigma_dtype=None if s is None else s.dtype,
        sizes=sizes, **{k: v for k, v in kw.items() if k != "sigma"},
    )  # fmt: skip
    plan, key, _ = emu.conv_plan(spec)
    assert key.int64 == int64
    assert reached(spec, plan), f"{path}: the plan {plan} misses the path"
    _compare(emulated, x, w, p, sizes, **kw)


@needs_gxx
@pytest.mark.cuda_compile
def test_emulated_conv_on_the_gpus_own_grids(emulated, monkeypatch):
    """The grids the GPU launches, uncut (every grid-stride loop takes one turn)."""
    monkeypatch.setattr(emu, "MAX_GRID", 2**31 - 1)
    rng = np.random.default_rng(5)
    x, w, p, s = _arrays(rng, (2, 4, 7, 6), (4, 2, 3), (3, 4), (0, 1), "gauss", np.float32)
    spec = _conv_spec(x.shape, w.shape, (3, 4), groups=2, padding=(1, 2))
    plan, _, _ = emu.conv_plan(spec)
    assert plan.forward.grid == (1, 8) and plan.grid(spec.kernel.n_batch * 3, emu.LIMITS.n_sm) == 1
    _compare(emulated, x, w, p, (3, 4), sigma=s, interpolation="gauss", groups=2, padding=(1, 2))


@needs_gxx
@pytest.mark.cuda_compile
def test_emulated_conv_with_64bit_indices(emulated, monkeypatch):
    """The harness's drawn cases with the conv kernels forced to 64-bit indices."""
    _forced(monkeypatch, int64=True)

    @settings(max_examples=10)
    @given(conv_cases(max_ndim=3, max_size=3, max_batch=2, max_count=2))
    def prop(case):
        assert emu.conv_plan(case.spec)[1].int64
        out = case.conv(emulated)
        assert_close(out, case.conv("numpy"), what="output")
        g = case.grad_output()
        for name, a, e in zip(("input", "weight", "positions", "sigma"), case.conv_grad(g, emulated), case.conv_grad(g, "numpy")):
            if e is None:
                assert a is None
            else:
                assert_close(a, e, what=f"grad_{name}")

    prop()


@needs_gxx
@pytest.mark.cuda_compile
def test_emulation_builds_the_kernels_the_backend_names():
    """Every conv specialisation's kernels are in the emulation's library under the names
    cupy_conv loads (``ConvSpecialisation.names``)."""
    for dtype in ("float32", "float64"):
        lib = emu._library(dtype)
        keys = emu.conv_keys(dtype)
        assert len(keys) == len([k for k in cc.specialisations() if k.dtype == dtype])
        for key in keys:
            for role, name in key.names.items():
                assert hasattr(lib, emu.conv_symbol(role, name)), name
