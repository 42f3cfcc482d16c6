"""The "cupy" backend on a real GPU (marker ``gpu``; skipped without a device).

Nothing here touches CUDA at import or collection: CuPy and torch are imported inside tests.
The shared harness (test_backends.py) also runs "cupy" on NumPy inputs; these tests add CuPy
and torch CUDA inputs, float16, streams, the chunked fallback and agreement with numba-cuda.
"""

from __future__ import annotations

import numpy as np
import pytest

import ndcls
from _cases import draw_positions, learned_row_sizes
from _tolerances import assert_close

pytestmark = pytest.mark.gpu

# (sizes, learned_dims) for N = 1..4, plain and N-M-D
LAYOUTS = [
    ((9,), None),
    ((7, 6), None),
    ((5, 6), (1,)),
    ((4, 5, 3), None),
    ((4, 5, 3), (2, 0)),
    ((3, 4, 3, 5), None),
    ((3, 4, 3, 5), (3, 1)),
]


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def _inputs(sizes, learned, interpolation, dtype, *, batch=(3, 2), count=4, seed=0, poison=True):
    rng = np.random.default_rng(seed)
    rows = tuple(range(len(sizes))) if learned is None else learned
    dense = tuple(sizes[a] for a in range(len(sizes)) if a not in rows)
    w = rng.standard_normal((*batch, *dense, count))
    p = draw_positions(rng, (len(rows), *w.shape), learned_row_sizes(sizes, rows), "around")
    s = rng.uniform(0.6, 2.5, size=p.shape) if interpolation != "bilinear" else None
    if poison:  # a few invalid elements: NaN / inf positions, bad widths
        p[0, ..., 0] = np.nan
        p[-1, ..., 1] = np.inf
        if s is not None:
            s[0, ..., 2] = 0.0
    g = rng.standard_normal((*batch, *sizes))
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return cast(w), cast(p), cast(s), cast(g)


def _reference(sizes, learned, interpolation, w, p, s, g):
    """float64 reference on the same (possibly float16) input values."""
    up = lambda x: None if x is None else np.asarray(x, dtype=np.float64)  # noqa: E731
    kw = dict(sigma=up(s), interpolation=interpolation, learned_dims=learned, backend="numpy")
    k = ndcls.construct(up(w), up(p), sizes, **kw)
    return k, ndcls.construct_grad(up(g), up(w), up(p), sizes, **kw)


def _check(k, grads, expected_k, expected_grads, dtype):
    assert_close(k, expected_k, dtype=dtype, what="K")
    for name, a, e in zip(("weight", "positions", "sigma"), grads, expected_grads):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, dtype=dtype, what=f"grad_{name}")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}-{x[1]}")
def test_cupy_arrays_match_reference(cp, layout, interpolation, dtype):
    sizes, learned = layout
    w, p, s, g = _inputs(sizes, learned, interpolation, dtype)
    kw = dict(sigma=None if s is None else cp.asarray(s), interpolation=interpolation, learned_dims=learned)
    k = ndcls.construct(cp.asarray(w), cp.asarray(p), sizes, **kw)
    assert isinstance(k, cp.ndarray) and k.dtype == np.dtype(dtype)
    grads = ndcls.construct_grad(cp.asarray(g), cp.asarray(w), cp.asarray(p), sizes, **kw)
    assert all(x is None or isinstance(x, cp.ndarray) for x in grads)
    expected_k, expected_grads = _reference(sizes, learned, interpolation, w, p, s, g)
    _check(cp.asnumpy(k), [None if x is None else cp.asnumpy(x) for x in grads], expected_k, expected_grads, dtype)


@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}-{x[1]}")
def test_agrees_with_numba_cuda(cp, layout, interpolation):
    if "numba-cuda" not in ndcls.backends():
        pytest.skip("numba-cuda is not registered")
    sizes, learned = layout
    for dtype in ("float32", "float64"):
        w, p, s, g = _inputs(sizes, learned, interpolation, dtype, seed=3)
        kw = dict(sigma=s, interpolation=interpolation, learned_dims=learned)
        ours = ndcls.construct(w, p, sizes, backend="cupy", **kw)
        theirs = ndcls.construct(w, p, sizes, backend="numba-cuda", **kw)
        assert_close(ours, theirs, what="K vs numba-cuda")
        for a, b in zip(ndcls.construct_grad(g, w, p, sizes, backend="cupy", **kw), ndcls.construct_grad(g, w, p, sizes, backend="numba-cuda", **kw)):
            if b is not None:
                assert_close(a, b, what="grad vs numba-cuda")


@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
def test_chunked_fallback_for_kernels_larger_than_shared_memory(cp, interpolation):
    sizes = (48, 48, 40)  # 92160 cells: 720 KiB in float64, beyond any block's shared memory
    w, p, s, g = _inputs(sizes, None, interpolation, "float64", batch=(2,), count=3)
    kw = dict(sigma=s, interpolation=interpolation)
    from ndcls.kernels import cupy_backend as cb

    spec = ndcls.KernelSpec.from_arguments(
        weight_shape=w.shape, weight_dtype=w.dtype, positions_shape=p.shape, positions_dtype=p.dtype,
        sigma_shape=None if s is None else s.shape, sigma_dtype=None if s is None else s.dtype,
        sizes=sizes, interpolation=interpolation, learned_dims=None,
    )  # fmt: skip
    assert cb.forward_launch(spec, cb._limits(cp.cuda.Device().id)).span < spec.block
    k = ndcls.construct(w, p, sizes, backend="cupy", **kw)
    grads = ndcls.construct_grad(g, w, p, sizes, backend="cupy", **kw)
    _check(k, grads, *_reference(sizes, None, interpolation, w, p, s, g), "float64")


def test_backward_is_deterministic(cp):
    w, p, s, g = _inputs((9, 9), None, "gauss", "float32", batch=(16, 8), count=8, poison=False)
    args = (cp.asarray(g), cp.asarray(w), cp.asarray(p), (9, 9))
    first = ndcls.construct_grad(*args, sigma=cp.asarray(s), interpolation="gauss")
    for _ in range(3):
        again = ndcls.construct_grad(*args, sigma=cp.asarray(s), interpolation="gauss")
        for a, b in zip(first, again):
            cp.testing.assert_array_equal(a, b)


def test_new_shapes_reuse_compiled_kernels(cp):
    from ndcls.kernels import cupy_backend as cb

    for sizes, batch, count in [((5, 5), (2,), 3), ((11, 7), (4, 3), 5), ((31, 2), (1,), 1)]:
        w, p, _, _ = _inputs(sizes, None, "bilinear", "float32", batch=batch, count=count, poison=False)
        ndcls.construct(cp.asarray(w), cp.asarray(p), sizes)
    keys = [key for (dev, key) in cb._KERNELS if dev == cp.cuda.Device().id and key.dtype == "float32" and key.interpolation == "bilinear" and key.n_learned == 2]
    assert len(keys) == 1


_LATE_DOUBLE = r"""
extern "C" __global__ void late_double(double* x, int n, long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] *= 2.0;
}
"""


def test_runs_on_the_current_cupy_stream(cp):
    """Work queued earlier on the caller's stream (a slow kernel doubling the weights) must be
    seen by construct: it is ordered after it only if it runs on that stream."""
    w, p, _, _ = _inputs((6, 6), None, "bilinear", "float64", batch=(64,), count=4, poison=False)
    late = cp.RawKernel(_LATE_DOUBLE, "late_double")
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        wd, pd = cp.asarray(w), cp.asarray(p)
        stream.synchronize()
        late((1,), (256,), (wd, np.int32(wd.size), np.int64(200_000_000)))
        k = ndcls.construct(wd, pd, (6, 6))
        stream.synchronize()
    expected = ndcls.construct(2 * w, p, (6, 6), backend="numpy")
    assert_close(cp.asnumpy(k), expected, what="K after work queued on the stream")


def test_torch_cuda_tensors(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    w, p, s, g = _inputs((5, 7), None, "gauss", "float32")
    t = lambda x: torch.from_numpy(x).cuda()  # noqa: E731
    k = ndcls.construct(t(w), t(p), (5, 7), sigma=t(s), interpolation="gauss")
    assert isinstance(k, torch.Tensor) and k.is_cuda and k.dtype == torch.float32
    grads = ndcls.construct_grad(t(g), t(w), t(p), (5, 7), sigma=t(s), interpolation="gauss")
    assert all(isinstance(x, torch.Tensor) and x.is_cuda for x in grads)
    _check(k.cpu().numpy(), [x.cpu().numpy() for x in grads], *_reference((5, 7), None, "gauss", w, p, s, g), "float32")

    # torch's current stream: a slow op queued on a side stream, then construct on it
    side = torch.cuda.Stream()
    wt = t(w.astype(np.float64))
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        wt.mul_(2)
        k = ndcls.construct(wt, t(p.astype(np.float64)), (5, 7), sigma=t(s.astype(np.float64)), interpolation="gauss")
    side.synchronize()
    expected = ndcls.construct(2 * w.astype(np.float64), p.astype(np.float64), (5, 7), sigma=s.astype(np.float64), interpolation="gauss", backend="numpy")
    assert_close(k.cpu().numpy(), expected, what="K on torch's current stream")


def test_empty_batch_and_host_arrays(cp):
    w, p, s, g = _inputs((4, 4), None, "triangle", "float32", batch=(0, 3))
    k = ndcls.construct(cp.asarray(w), cp.asarray(p), (4, 4), sigma=cp.asarray(s), interpolation="triangle")
    assert k.shape == (0, 3, 4, 4) and isinstance(k, cp.ndarray)
    w, p, s, g = _inputs((4, 4), None, "triangle", "float32")
    k = ndcls.construct(w, p, (4, 4), sigma=s, interpolation="triangle", backend="cupy")
    assert isinstance(k, np.ndarray)
    assert_close(k, _reference((4, 4), None, "triangle", w, p, s, g)[0], dtype="float32", what="K from host arrays")
