"""Backend "numba-cuda", direct convolution (``ndcls.kernels.numba_cuda_conv``) beyond the shared
harness of ``test_conv.py``: its launch planner with real device limits, its launch paths
(chunks, tap rounds, grid-stride loops, broadcast reductions) under the simulator, and on a real
device realistic shapes, CuPy inputs, streams and CUDA-graph capture (marked ``gpu``). The PTX
compilation of its kernels is tested in ``test_numba_cuda.py`` (one compile run for both).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import ndcls
from _tolerances import assert_close

BACKEND = "numba-cuda"
needs_numba_cuda = pytest.mark.skipif(BACKEND not in ndcls.backends(), reason="numba-cuda is not registered")


def _module():
    from ndcls.kernels import numba_cuda_conv

    return numba_cuda_conv


def _spec(x_shape, w_shape, sizes, *, interpolation="bilinear", learned=None, groups=1, padding=0, stride=1, dtype="float32"):
    p_shape = (len(sizes) if learned is None else len(learned), *w_shape)
    normalised = interpolation != "bilinear"
    return ndcls.ConvSpec.from_arguments(
        input_shape=x_shape, input_dtype=dtype, weight_shape=w_shape, weight_dtype=dtype,
        positions_shape=p_shape, positions_dtype=dtype, sigma_shape=p_shape if normalised else None,
        sigma_dtype=dtype if normalised else None, sizes=sizes, interpolation=interpolation,
        learned_dims=learned, groups=groups, padding=padding, stride=stride,
    )  # fmt: skip


# -- launch planning: a pure function, checked with real limits ------------------------------------------

#: H100: 132 SMs, 48 KiB of shared memory per block without opt-in, grid.x < 2**31.
H100 = dict(max_threads=128, max_grid=1 << 20, target_blocks=8 * 132)


def _check_plan(spec, plan, max_threads=128, max_grid=1 << 20):
    work = spec.batch * math.prod(spec.out_spatial)
    assert plan.chunks >= 1 and plan.chunk_len >= 1
    assert plan.chunks * plan.chunk_len >= work and (plan.chunks - 1) * plan.chunk_len < max(work, 1)
    for name, (blocks, threads) in plan.launches.items():
        assert 0 <= blocks <= max_grid and blocks < 2**31, name
        assert threads % 32 == 0 and 32 <= threads <= max_threads, name
    assert 8 * plan.launches["tap_partials"][1] <= 48 * 1024  # its dynamic shared memory
    k = spec.kernel
    cells_bytes = k.n_batch * k.block
    assert plan.scratch_bytes["conv"] >= cells_bytes * (2 * spec.dtype.itemsize + 5)  # K, mask, taps: O(B * cells)


@needs_numba_cuda
def test_conv_plan_with_h100_limits():
    mod = _module()
    # DiffWave 1-D, 64 -> 64, count 3, size 1025, length 8000: 4096 pairs already fill the GPU
    spec = _spec((1, 64, 8000), (64, 64, 3), (1025,), padding="same")
    plan = mod.conv_plan(spec, **H100)
    _check_plan(spec, plan)
    assert (plan.chunks, plan.chunk_len) == (1, 8000)
    assert plan.launches["tap_partials"] == (4096, 128)
    assert plan.launches["forward"] == (64 * 8000 // 128, 128)
    assert plan.launches["compact"] == (32, 128)
    # ConvNeXt depthwise 96, 56x56, 17x17, count 34: 96 pairs, so the batch x output cells are chunked
    spec = _spec((2, 96, 56, 56), (96, 1, 34), (17, 17), groups=96, padding="same")
    plan = mod.conv_plan(spec, **H100)
    _check_plan(spec, plan)
    assert plan.chunks == 7 and plan.chunk_len == 896  # ceil(2 * 3136 / 1024) chunks of at least 1024 cells
    assert plan.launches["tap_partials"] == (96 * 7, 128)
    # one pair with a large 3-D kernel: chunks bounded by the memory of their partials
    spec = _spec((1, 1, 64, 64, 64), (1, 1, 4), (31, 31, 31), padding="same", interpolation="gauss")
    plan = mod.conv_plan(spec, **H100, partial_bytes=16 * 2**20)
    _check_plan(spec, plan)
    assert plan.chunks == 16 * 2**20 // (31**3 * 8) and plan.chunks * 31**3 * 8 <= 16 * 2**20
    # a large grid is walked grid-stride, never launched beyond the limit
    spec = _spec((256, 256, 64, 64), (256, 1, 8), (7, 7), groups=256, padding="same")
    plan = mod.conv_plan(spec, **H100)
    _check_plan(spec, plan)
    assert plan.launches["forward"][0] == 1 << 20
    # small work: one warp, not 128 threads, and nothing to launch for an empty batch
    spec = _spec((1, 1, 9), (1, 1, 2), (3,))
    plan = mod.conv_plan(spec, **H100)
    _check_plan(spec, plan)
    assert plan.launches["forward"] == (1, 32) and plan.launches["tap_partials"] == (1, 32)
    spec = _spec((0, 4, 9), (4, 4, 2), (3,))
    plan = mod.conv_plan(spec, **H100)
    _check_plan(spec, plan)
    assert plan.launches["forward"][0] == 0 and plan.launches["grad_input"][0] == 0 and plan.chunks == 1


@needs_numba_cuda
def test_conv_plan_is_pure_and_the_same_under_the_simulator():
    import os
    import subprocess
    import sys
    from pathlib import Path

    mod = _module()
    spec = _spec((2, 96, 56, 56), (96, 1, 34), (17, 17), groups=96, padding="same")
    assert mod.conv_plan(spec) == mod.conv_plan(spec)
    assert mod.conv_plan(spec) == mod.conv_plan(spec, max_threads=mod.THREADS, max_grid=mod.MAX_GRID)
    code = (
        "import os; os.environ['NUMBA_ENABLE_CUDASIM'] = '1'; import ndcls; from ndcls.kernels import numba_cuda_conv as m; "
        "s = ndcls.ConvSpec.from_arguments(input_shape=(2, 96, 56, 56), input_dtype='float32', weight_shape=(96, 1, 34), "
        "weight_dtype='float32', positions_shape=(2, 96, 1, 34), positions_dtype='float32', sizes=(17, 17), "
        "interpolation='bilinear', learned_dims=None, groups=96, padding='same'); print(m.conv_plan(s))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert out == str(mod.conv_plan(spec))


# -- launch paths under the simulator (or the GPU) ------------------------------------------------------


def _problem(x_shape, w_shape, sizes, interpolation, *, learned=None, p_channels=None, dtype="float64", seed=0, width=(0.6, 2.5)):
    rng = np.random.default_rng(seed)
    m = len(sizes) if learned is None else len(learned)
    rows = [sizes[a] for a in (range(len(sizes)) if learned is None else learned)]
    p_shape = (m, *(p_channels or w_shape[:2]), *w_shape[2:])
    hi = np.array(rows, dtype=np.float64).reshape((m,) + (1,) * (len(p_shape) - 1))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    p = (rng.random(p_shape) * (hi + 1) - 1).astype(dtype)
    s = None if interpolation == "bilinear" else rng.uniform(*width, size=p_shape).astype(dtype)
    return x, w, p, s


def _compare(x, w, p, s, sizes, reference="numpy", xp=np, **kw):
    """conv and conv_grad of numba-cuda (inputs through ``xp.asarray``) against ``reference``."""
    on = (lambda a: None if a is None else xp.asarray(a)) if xp is not np else (lambda a: a)
    got = ndcls.conv(on(x), on(w), on(p), sizes, sigma=on(s), backend=BACKEND, **kw)
    assert type(got) is type(on(x)), "the result must be of the caller's array library"
    expected = ndcls.conv(x, w, p, sizes, sigma=s, backend=reference, **kw)
    assert_close(_host(got), expected, what="output")
    g = np.random.default_rng(9).standard_normal(expected.shape).astype(x.dtype)
    grads = ndcls.conv_grad(on(g), on(x), on(w), on(p), sizes, sigma=on(s), backend=BACKEND, **kw)
    want = ndcls.conv_grad(g, x, w, p, sizes, sigma=s, backend=reference, **kw)
    for name, a, e in zip(("input", "weight", "positions", "sigma"), grads, want):
        if e is None:
            assert a is None
        else:
            assert a.shape == e.shape, name
            assert_close(_host(a), e, what=f"grad_{name}")


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


@needs_numba_cuda
@pytest.mark.cudasim
@pytest.mark.parametrize("chunking", ["many-chunks", "one-chunk"])
@pytest.mark.parametrize("interpolation", ["bilinear", "gauss"])
def test_conv_launch_paths_match_reference(monkeypatch, interpolation, chunking):
    """Grid-stride loops in every kernel (3 blocks at most), one warp per block, and the dL/dK
    correlation in many chunks of 4 cells (gauss: 42 taps per pair, more than the block's 32
    threads, so the taps take two rounds) or in one chunk (bilinear: several lanes per tap);
    positions shared by the output channels, sigma by the input channels (both reduced)."""
    from ndcls.kernels import numba_cuda

    mod = _module()
    monkeypatch.setattr(mod, "MAX_GRID", 3)
    monkeypatch.setattr(mod, "THREADS", 32)
    monkeypatch.setattr(numba_cuda, "_MAX_GRID", 2)
    monkeypatch.setattr(numba_cuda, "THREADS", 32)
    if chunking == "many-chunks":
        monkeypatch.setattr(mod, "MIN_CHUNK", 4)
        monkeypatch.setattr(mod, "TARGET_BLOCKS", 10**6)
    sizes = (7, 6)
    x, w, p, s = _problem((2, 4, 5, 4), (4, 2, 6, 2), sizes, interpolation, learned=(0,), p_channels=(1, 2), width=(2.0, 3.0))
    if s is not None:
        s = s[:, :, :1] * np.ones((1, 4, 1, 1, 1))  # sigma (M, O, 1, D, C)
    kw = dict(interpolation=interpolation, learned_dims=(0,), groups=2, padding=(2, 3), stride=(2, 1))
    spec = _spec(x.shape, w.shape, sizes, interpolation=interpolation, learned=(0,), groups=2, padding=(2, 3), stride=(2, 1), dtype="float64")
    plan = mod.conv_plan(spec)
    if chunking == "many-chunks":
        assert plan.chunks > 1 and plan.chunk_len == 4 and plan.launches["tap_partials"] == (3, 32)
    else:
        assert plan.chunks == 1
    assert all(blocks <= 3 for blocks, _ in plan.launches.values())
    _compare(x, w, p, s, sizes, **kw)


@needs_numba_cuda
@pytest.mark.cudasim
def test_conv_float32_dense_axes_and_tiny_widths():
    """float32, a 3-D kernel with a dense axis between learned ones, triangle widths down to
    a fraction of a cell (supports of one cell or none), no padding, stride 2."""
    sizes = (3, 2, 4)
    x, w, p, s = _problem((1, 2, 6, 4, 7), (2, 2, 2, 3), sizes, "triangle", learned=(2, 0), dtype="float32", width=(0.2, 1.5))
    _compare(x, w, p, s, sizes, interpolation="triangle", learned_dims=(2, 0), stride=2)


@needs_numba_cuda
@pytest.mark.cudasim
def test_bilinear_elements_on_integer_positions_keep_their_position_gradient():
    """A bilinear element at an integer position puts 0 on its upper corner, whose dL/dK the
    position gradient still needs: the touched cells come from the supports, not from K != 0."""
    x, w, _, _ = _problem((1, 1, 9), (1, 1, 2), (5,), "bilinear")
    p = np.array([[[[1.0, 3.0]]]])
    _compare(x, w, p, None, (5,))
    gp = ndcls.conv_grad(np.ones((1, 1, 5)), x, w, p, (5,), backend=BACKEND)[2]
    assert np.all(gp != 0)


# -- real GPU: realistic shapes, CuPy, streams, CUDA graphs -----------------------------------------------

REALISTIC = {
    "diffwave-1d": dict(x=(1, 16, 2000), w=(16, 16, 3), sizes=(257,), padding="same"),
    "convnext-dw": dict(x=(2, 96, 56, 56), w=(96, 1, 34), sizes=(17, 17), padding="same", groups=96),
    "3d-dw": dict(x=(1, 8, 16, 24, 24), w=(8, 1, 10), sizes=(9, 9, 9), padding="same", groups=8),
    "strided-dense-axis": dict(x=(4, 12, 33, 31), w=(24, 4, 5, 6), sizes=(5, 11), learned=(1,), padding=(2, 3), stride=2, groups=3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("shape", REALISTIC, ids=list(REALISTIC))
def test_realistic_shapes_match_the_cpu_backend(shape, interpolation, dtype):
    e = dict(REALISTIC[shape])
    x_shape, w_shape, sizes, learned = e.pop("x"), e.pop("w"), e.pop("sizes"), e.pop("learned", None)
    x, w, p, s = _problem(x_shape, w_shape, sizes, interpolation, learned=learned, dtype=dtype, width=(0.5, 1.5))
    _compare(x, w, p, s, sizes, reference="numba", interpolation=interpolation, learned_dims=learned, **e)


@pytest.mark.gpu
@pytest.mark.parametrize("interpolation", ["bilinear", "gauss"])
def test_cupy_inputs_stay_on_device_on_the_current_stream(interpolation):
    """Inputs written on a non-blocking stream by a slow producer, results read back on it only:
    correct only if every kernel (and every copy) of the pipeline ran on that stream."""
    cp = pytest.importorskip("cupy")
    x, w, p, s = _problem((2, 96, 56, 56), (96, 1, 34), (17, 17), interpolation, p_channels=(1, 1), dtype="float32")
    kw = dict(interpolation=interpolation, padding="same", groups=96)
    g = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        big = cp.ones((4096, 4096), dtype=cp.float32)
        for _ in range(8):
            big = big @ big * 0
        dx, dw, dp = (cp.asarray(a) + big[0, 0] for a in (x, w, p))
        ds = None if s is None else cp.asarray(s) + big[0, 0]
        out = ndcls.conv(dx, dw, dp, (17, 17), sigma=ds, backend=BACKEND, **kw)
        grads = ndcls.conv_grad(cp.asarray(g), dx, dw, dp, (17, 17), sigma=ds, backend=BACKEND, **kw)
        assert all(isinstance(a, cp.ndarray) for a in (out, *[a for a in grads if a is not None]))
        host = [a.get(stream=stream) for a in (out, *[a for a in grads if a is not None])]
        stream.synchronize()
    expected = [ndcls.conv(x, w, p, (17, 17), sigma=s, backend="numba", **kw)]
    expected += [a for a in ndcls.conv_grad(g, x, w, p, (17, 17), sigma=s, backend="numba", **kw) if a is not None]
    for a, e in zip(host, expected):
        assert_close(a, e, what="result on a non-default stream")


@pytest.mark.gpu
@pytest.mark.xfail(
    reason="known failure, not yet investigated: on an H100 (2026-11-23) the capture succeeded and "
    "replaying the graph raised cudaErrorInvalidValue (docs/conv.md, section 7)",
    strict=False,
)
def test_conv_and_conv_grad_capture_in_a_cuda_graph():
    """No host synchronisation and no host copy in the pipeline: conv and conv_grad on CuPy arrays
    are captured into a CUDA graph (stream-ordered allocations), and replaying the graph on new
    inputs gives the new results."""
    cp = pytest.importorskip("cupy")
    x, w, p, s = _problem((2, 16, 20, 20), (16, 4, 6), (7, 7), "gauss", dtype="float32")
    kw = dict(interpolation="gauss", padding="same", groups=4)
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    previous = cp.cuda.get_allocator()
    cp.cuda.set_allocator(cp.cuda.MemoryAsyncPool().malloc)  # capturable allocations
    try:
        dx, dw, dp, ds, dg = (cp.asarray(a) for a in (x, w, p, s, g))
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            ndcls.conv(dx, dw, dp, (7, 7), sigma=ds, backend=BACKEND, **kw)  # compile and load the kernels first
            ndcls.conv_grad(dg, dx, dw, dp, (7, 7), sigma=ds, backend=BACKEND, **kw)
            stream.synchronize()
            stream.begin_capture()
            out = ndcls.conv(dx, dw, dp, (7, 7), sigma=ds, backend=BACKEND, **kw)
            grads = ndcls.conv_grad(dg, dx, dw, dp, (7, 7), sigma=ds, backend=BACKEND, **kw)
            graph = stream.end_capture()
            for scale in (1.0, -2.0):
                dx[...] = cp.asarray(x) * scale
                graph.launch(stream)
                stream.synchronize()
                expected = ndcls.conv(x * scale, w, p, (7, 7), sigma=s, backend="numba", **kw)
                assert_close(out.get(), expected, what=f"graph replay, input x {scale}")
                want = ndcls.conv_grad(g, x * scale, w, p, (7, 7), sigma=s, backend="numba", **kw)
                for name, a, e in zip(("input", "weight", "positions", "sigma"), grads, want):
                    assert_close(a.get(), e, what=f"graph replay grad_{name}, input x {scale}")
    finally:
        cp.cuda.set_allocator(previous)
