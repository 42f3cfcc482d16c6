"""Backend "numba-cuda" beyond the shared harness: its launch paths under the simulator, every
kernel specialisation compiled to PTX without a GPU, and large shapes, CuPy inputs and streams
on a real device (marked ``gpu``; nothing here touches CUDA at collection).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ndcls
from _cases import draw_positions, learned_row_sizes
from _tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
BACKEND = "numba-cuda"


def _problem(sizes, batch, count, interpolation, learned_dims=None, dtype="float64", seed=0, mode="around"):
    """Random ``(weight, positions, kwargs)`` for one construction."""
    rng = np.random.default_rng(seed)
    learned = tuple(range(len(sizes))) if learned_dims is None else tuple(learned_dims)
    dense = tuple(sizes[a] for a in range(len(sizes)) if a not in learned)
    w = rng.standard_normal((*batch, *dense, count))
    p = draw_positions(rng, (len(learned), *w.shape), learned_row_sizes(sizes, learned), mode)
    s = rng.uniform(0.6, 2.5, size=p.shape).astype(dtype) if interpolation != "bilinear" else None
    kw = dict(sigma=s, interpolation=interpolation, learned_dims=learned_dims)
    return w.astype(dtype), p.astype(dtype), kw


def _compare(sizes, w, p, kw, backend=BACKEND, reference="numpy", xp=np, seed=1):
    """Forward and backward of ``backend`` (inputs converted with ``xp.asarray``) against ``reference``."""
    rng = np.random.default_rng(seed)
    k = ndcls.construct(xp.asarray(w), xp.asarray(p), sizes, backend=backend, **_on(kw, xp))
    assert type(k) is type(xp.asarray(w)), "the result must be of the caller's array library"
    expected = ndcls.construct(w, p, sizes, backend=reference, **kw)
    assert_close(_host(k), expected, what="K")
    g = rng.standard_normal(expected.shape).astype(w.dtype)
    got = ndcls.construct_grad(xp.asarray(g), xp.asarray(w), xp.asarray(p), sizes, backend=backend, **_on(kw, xp))
    want = ndcls.construct_grad(g, w, p, sizes, backend=reference, **kw)
    for name, a, e in zip(("weight", "positions", "sigma"), got, want):
        if e is None:
            assert a is None
        else:
            assert_close(_host(a), e, what=f"grad_{name}")


def _on(kw, xp):
    return {**kw, "sigma": None if kw["sigma"] is None else xp.asarray(kw["sigma"])}


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


# -- launch paths under the simulator (or the GPU) --------------------------------------------------

needs_numba_cuda = pytest.mark.skipif(BACKEND not in ndcls.backends(), reason="numba-cuda is not registered")


def _module():
    return ndcls.get_backend(BACKEND).load()


@needs_numba_cuda
@pytest.mark.cudasim
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("tile", ["shared", "global"])
def test_tile_placements_and_chunks_match_reference(monkeypatch, interpolation, tile):
    """Both tile placements, gauss chunks of fewer threads than elements, grid-stride over batch."""
    mod = _module()
    monkeypatch.setattr(mod, "_MAX_GRID", 2)  # 3 batch indices: one block walks two of them
    monkeypatch.setattr(mod, "THREADS", 32)  # one warp per block: cheap under the simulator
    if tile == "global":
        monkeypatch.setattr(mod, "SHARED_BYTES", 8 * 110)  # a 5 x 6 tile leaves too few profile slots
    sizes, count = (5, 6), mod.THREADS + 3  # more elements per dense index than threads
    w, p, kw = _problem(sizes, (3,), count, interpolation)
    spec = ndcls.KernelSpec.from_arguments(
        weight_shape=w.shape, weight_dtype=w.dtype, positions_shape=p.shape, positions_dtype=p.dtype,
        sigma_shape=None if kw["sigma"] is None else p.shape, sigma_dtype=None if kw["sigma"] is None else p.dtype,
        sizes=sizes, interpolation=interpolation, learned_dims=None,
    )
    for direction in ("forward", "backward"):
        threads, shared_tile, _ = mod.plan(spec, direction)
        assert shared_tile == (tile == "shared") and 1 <= threads <= mod.THREADS
    _compare(sizes, w, p, kw)


@needs_numba_cuda
@pytest.mark.cudasim
@pytest.mark.parametrize("interpolation", ["triangle", "gauss"])
def test_dense_axes_and_float32(interpolation):
    """N-M-D with dense axes before, between and after learned ones, in float32."""
    sizes = (3, 4, 2, 5)
    w, p, kw = _problem(sizes, (2,), 3, interpolation, learned_dims=(3, 1), dtype="float32")
    _compare(sizes, w, p, kw)


@needs_numba_cuda
def test_plan_refuses_profiles_larger_than_shared_memory():
    mod = _module()
    size = mod.SHARED_BYTES // (3 * 8) + 1  # one element's backward profiles no longer fit
    w, p, kw = _problem((size,), (1,), 1, "gauss")
    with pytest.raises(ValueError, match="shared memory"):
        ndcls.construct_grad(np.zeros((1, size)), w, p, (size,), backend=BACKEND, **kw)
    spec = ndcls.KernelSpec.from_arguments(
        weight_shape=(1, 1), weight_dtype="float64", positions_shape=(2, 1, 1), positions_dtype="float64",
        sigma_shape=(2, 1, 1), sigma_dtype="float64", sizes=(17, 17), interpolation="gauss", learned_dims=None,
    )
    threads, shared_tile, dyn = mod.plan(spec, "backward")
    assert shared_tile and dyn <= mod.SHARED_BYTES and threads >= min(32, mod.THREADS)


# -- every specialisation compiles to PTX, without a GPU ----------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, types
    cc = tuple(int(x) for x in sys.argv[1].split("."))
    try:
        import numba.cuda.dispatcher as dispatcher
        from numba import cuda
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
    except Exception as exc:  # no numba-cuda or no libNVVM: an environment problem, not a kernel bug
        print(json.dumps({"unavailable": f"{type(exc).__name__}: {exc}"}))
        sys.exit(0)
    # Device functions are compiled for the current device's compute capability; there is no
    # device here, so name the target one (compile_ptx's cc covers the kernel itself).
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    from ndcls.kernels import numba_cuda, numba_cuda_conv
    results = []
    kernels = [("construct", *k) for k in numba_cuda.specialisations()]
    kernels += [("conv", *k) for k in numba_cuda_conv.specialisations()]
    for module, name, fn, sig in kernels:
        start = time.perf_counter()
        try:
            ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
            error = None
        except Exception as exc:
            ptx, error = "", f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        atomics = sorted(set(w for line in ptx.splitlines() for w in line.split() if w.startswith(("atom.", "red."))))
        target = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".target")), None)
        fma = sorted(set(w for line in ptx.splitlines() for w in line.split() if w.startswith("fma.")))
        results.append(dict(module=module, name=name, seconds=round(seconds, 3), target=target, atomics=atomics, fma=fma, error=error))
    print(json.dumps({"results": results}))
    """
)


@pytest.fixture(scope="module")
def compiled_ptx():
    """Compile every specialisation for sm_80 and sm_90 in two parallel subprocesses (no simulator)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = {
        cc: subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, f"{cc[0]}.{cc[1]}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cc in ((8, 0), (9, 0))
    }
    out = {}
    for cc, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"PTX compilation for sm_{cc[0]}{cc[1]} crashed:\n{stderr[-4000:]}"
        report = json.loads(stdout.strip().splitlines()[-1])
        if "unavailable" in report:
            pytest.skip(f"numba-cuda cannot compile PTX here: {report['unavailable']}")
        out[cc] = report["results"]
    return out


@needs_numba_cuda
@pytest.mark.cuda_compile
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
def test_every_specialisation_compiles_to_ptx(compiled_ptx, cc):
    results = [r for r in compiled_ptx[cc] if r["module"] == "construct"]
    names = [r["name"] for r in results]
    assert len(names) == len(set(names)) == 2 * 3 * 2 * 2, names  # direction x interpolation x tile x dtype
    failures = {r["name"]: r["error"] for r in results if r["error"]}
    assert not failures, failures
    for r in results:
        assert r["target"] == f"sm_{cc[0]}{cc[1]}", r
        if "backward" in r["name"] or "gauss" in r["name"]:  # gathers: deterministic, no atomics
            assert r["atomics"] == [], r
        elif "shared" in r["name"]:  # scatter into the float64 shared tile
            assert r["atomics"] == ["atom.shared.add.f64"], r
        else:  # scatter into K in global memory, in its dtype
            dtype = "f32" if r["name"].endswith("float32") else "f64"
            assert all(a.endswith(f".add.{dtype}") and "shared" not in a for a in r["atomics"]) and r["atomics"], r
    timings = ", ".join(f"{r['name'].removeprefix('ndcls_')} {r['seconds']:.2f}s" for r in results)
    print(f"\ncompile_ptx sm_{cc[0]}{cc[1]}: total {sum(r['seconds'] for r in results):.1f}s: {timings}")


@needs_numba_cuda
@pytest.mark.cuda_compile
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
def test_every_conv_kernel_compiles_to_ptx(compiled_ptx, cc):
    """The direct convolution's kernels (ndcls.kernels.numba_cuda_conv), float32 and float64:
    no atomics anywhere (deterministic), the forward and grad_input sums in the working dtype,
    the dL/dK correlation in float64."""
    from ndcls.kernels import numba_cuda_conv

    results = [r for r in compiled_ptx[cc] if r["module"] == "conv"]
    names = [r["name"] for r in results]
    expected = {f"ndcls_conv_{name}_{dtype}" for name in numba_cuda_conv._SOURCES for dtype in ("float32", "float64")}
    assert {re.sub(r"_\d$", "", n) for n in names} == expected, names  # the zero kernel has two signatures
    failures = {r["name"]: r["error"] for r in results if r["error"]}
    assert not failures, failures
    for r in results:
        assert r["target"] == f"sm_{cc[0]}{cc[1]}", r
        assert r["atomics"] == [], r
        if r["name"].startswith(("ndcls_conv_forward", "ndcls_conv_grad_input")):
            assert r["fma"] == [f"fma.rn.f{r['name'][-2:]}"], r
        if r["name"].startswith("ndcls_conv_tap_partials"):
            assert r["fma"] == ["fma.rn.f64"], r
    timings = ", ".join(f"{r['name'].removeprefix('ndcls_conv_')} {r['seconds']:.2f}s" for r in results)
    print(f"\nconv compile_ptx sm_{cc[0]}{cc[1]}: total {sum(r['seconds'] for r in results):.1f}s: {timings}")


# -- real GPU: large shapes, CuPy, streams, 64-bit indices ----------------------------------------------

LARGE = {
    "convnext-dw-17x17": dict(sizes=(17, 17), batch=(768, 1), count=34),
    "dense-3d-7x7x7": dict(sizes=(7, 7, 7), batch=(64, 32), count=8),
    "global-tile-81x81": dict(sizes=(81, 81), batch=(16,), count=20),
    "3-1d": dict(sizes=(5, 5, 31), batch=(96, 1), count=6, learned_dims=(2,)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("shape", LARGE, ids=list(LARGE))
def test_large_shapes_match_reference_and_cpu(shape, interpolation, dtype):
    e = LARGE[shape]
    w, p, kw = _problem(e["sizes"], e["batch"], e["count"], interpolation, e.get("learned_dims"), dtype)
    _compare(e["sizes"], w, p, kw, reference="numba")
    if shape == "convnext-dw-17x17":
        _compare(e["sizes"], w, p, kw, reference="numpy")


@pytest.mark.gpu
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
def test_cupy_inputs_stay_on_device(interpolation):
    cp = pytest.importorskip("cupy")
    w, p, kw = _problem((17, 17), (768, 1), 34, interpolation, dtype="float32")
    _compare((17, 17), w, p, kw, xp=cp, reference="numba")


@pytest.mark.gpu
def test_out_is_written_in_place_on_device():
    cp = pytest.importorskip("cupy")
    w, p, kw = _problem((9, 9), (32,), 5, "gauss", dtype="float32")
    call_kw = _on(kw, cp)
    from ndcls._api import _prepare

    call = _prepare(cp.asarray(w), cp.asarray(p), call_kw["sigma"], None, (9, 9), "gauss", None, BACKEND)
    buffer = cp.full(32 * 81 + 128, -7.0, dtype=cp.float32)
    out = buffer[64:-64].reshape(32, 81)
    result = call.backend.load().construct(call.spec, call.weight, call.positions, call.sigma, out=out)
    assert result is out
    assert (buffer[:64] == -7).all() and (buffer[-64:] == -7).all()
    assert_close(out.get().reshape(32, 9, 9), ndcls.construct(w, p, (9, 9), backend="numpy", **kw), what="K")


@pytest.mark.gpu
@pytest.mark.parametrize("interpolation", ["bilinear", "gauss"])
def test_runs_on_cupys_current_stream(interpolation):
    """Inputs written on a non-blocking stream and read back on it only: correct if the kernels ran there."""
    cp = pytest.importorskip("cupy")
    w, p, kw = _problem((17, 17), (768, 1), 34, interpolation, dtype="float32")
    g = np.random.default_rng(5).standard_normal((768, 1, 17, 17)).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        # a slow producer on the stream: the inputs are only ready once it finished
        big = cp.ones((4096, 4096), dtype=cp.float32)
        for _ in range(8):
            big = big @ big * 0
        dw = cp.asarray(w) + big[0, 0]
        dp = cp.asarray(p) + big[0, 0]
        dkw = _on(kw, cp)
        k = ndcls.construct(dw, dp, (17, 17), backend=BACKEND, **dkw)
        grads = ndcls.construct_grad(cp.asarray(g), dw, dp, (17, 17), backend=BACKEND, **dkw)
        host = [x.get(stream=stream) for x in (k, *[x for x in grads if x is not None])]
        stream.synchronize()
    expected = [ndcls.construct(w, p, (17, 17), backend="numba", **kw)]
    expected += [x for x in ndcls.construct_grad(g, w, p, (17, 17), backend="numba", **kw) if x is not None]
    for a, e in zip(host, expected):
        assert_close(a, e, what="result on a non-default stream")


@pytest.mark.gpu
def test_int64_indices_beyond_2_31_cells():
    """``n_batch * prod(sizes) > 2**31``: the last batch indices land where 32-bit offsets wrap."""
    cp = pytest.importorskip("cupy")
    sizes, count = (17, 17), 2
    n_batch = (2**31) // 289 + 1024
    need = n_batch * 289 * 4 + n_batch * count * 4 * 5
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < 1.5 * need:
        pytest.skip(f"needs {1.5 * need / 2**30:.1f} GiB of free device memory, has {free / 2**30:.1f}")
    rng = np.random.default_rng(3)
    tail = 1024  # compare the last batch indices (beyond 2**31 cells) with the reference
    w_tail = rng.standard_normal((tail, count)).astype(np.float32)
    p_tail = (rng.random((2, tail, count)) * 16).astype(np.float32)
    w = cp.zeros((n_batch, count), dtype=cp.float32)
    p = cp.zeros((2, n_batch, count), dtype=cp.float32)
    w[-tail:] = cp.asarray(w_tail)
    p[:, -tail:] = cp.asarray(p_tail)
    assert n_batch * math.prod(sizes) > 2**31
    k = ndcls.construct(w, p, sizes, backend=BACKEND)
    assert_close(k[-tail:].get(), ndcls.construct(w_tail, p_tail, sizes, backend="numpy"), what="K beyond 2**31")
    assert int(cp.count_nonzero(k[:-tail])) == 0
    g_tail = rng.standard_normal((tail, *sizes)).astype(np.float32)
    del k
    g = cp.zeros((n_batch, *sizes), dtype=cp.float32)
    g[-tail:] = cp.asarray(g_tail)
    gw, gp, _ = ndcls.construct_grad(g, w, p, sizes, backend=BACKEND)
    ew, ep, _ = ndcls.construct_grad(g_tail, w_tail, p_tail, sizes, backend="numpy")
    assert_close(gw[-tail:].get(), ew, what="grad_weight beyond 2**31")
    assert_close(gp[:, -tail:].get(), ep, what="grad_positions beyond 2**31")



# -- launch planning: a pure function, checked with real limits ----------------------------------


def _spec(sizes, batch, count, interpolation="gauss", learned=None, dtype="float32"):
    rows = tuple(range(len(sizes))) if learned is None else learned
    w_shape = (*batch, *(sizes[a] for a in range(len(sizes)) if a not in rows), count)
    p_shape = (len(rows), *w_shape)
    normalised = interpolation != "bilinear"
    return ndcls.KernelSpec.from_arguments(
        weight_shape=w_shape, weight_dtype=dtype, positions_shape=p_shape, positions_dtype=dtype,
        sigma_shape=p_shape if normalised else None, sigma_dtype=dtype if normalised else None,
        sizes=sizes, interpolation=interpolation, learned_dims=learned,
    )


@needs_numba_cuda
def test_plan_is_pure_and_the_same_under_the_simulator():
    mod = _module()
    assert mod.THREADS == 128  # no simulator-specific block size
    spec = _spec((17, 17), (768,), 34)
    for direction in ("forward", "backward"):
        assert mod.plan(spec, direction) == mod.plan(spec, direction, shared_bytes=48 * 1024, max_threads=128)
    code = (
        "import os; os.environ['NUMBA_ENABLE_CUDASIM'] = '1'; import ndcls; from ndcls.kernels import numba_cuda as m; "
        "s = ndcls.KernelSpec((17, 17), (0, 1), 'gauss', (768,), 34, __import__('numpy').dtype('float32')); "
        "print(m.plan(s, 'forward'), m.plan(s, 'backward'))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert out == f"{mod.plan(spec, 'forward')} {mod.plan(spec, 'backward')}"


@needs_numba_cuda
def test_plan_with_h100_limits():
    mod = _module()
    h100 = dict(shared_bytes=48 * 1024, max_threads=128)
    # ConvNeXt depthwise 17x17, 34 elements: tile in shared memory, whole warps, within 48 KiB
    for direction in ("forward", "backward"):
        threads, shared_tile, dyn = mod.plan(_spec((17, 17), (768,), 34), direction, **h100)
        assert shared_tile and threads % 32 == 0 and threads >= 32 and dyn <= 48 * 1024
    # blocks sized by the work: 3 elements per batch index need one warp, not 128 threads
    assert mod.plan(_spec((5,), (64,), 3, "bilinear"), "backward", **h100)[0] == 32
    assert mod.plan(_spec((7, 7), (4,), 100, "triangle"), "forward", **h100)[0] == 128
    # gauss forward threads also split the tile's cells
    assert mod.plan(_spec((9, 9), (4,), 2), "forward", **h100)[0] == 96
    # backward: a shared tile that would cost threads stays in global memory
    threads, shared_tile, _ = mod.plan(_spec((60, 60), (2,), 64, learned=(1,)), "backward", **h100)
    assert not shared_tile and threads == 32
    # forward: the same shape accumulates in global memory only when no warp fits beside the tile
    assert not mod.plan(_spec((80, 80), (2,), 64, learned=(1,)), "forward", **h100)[1]
