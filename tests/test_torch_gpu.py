"""torch on a real GPU (marker ``gpu``; skipped without a device): the caller's allocator and
stream, CUDA-graph capture, torch.compile(mode="reduce-overhead"), bfloat16/float16 layers and
autocast. Nothing here touches CUDA at import or collection."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import ndcls  # noqa: E402
from ndcls._tolerances import worst_error  # noqa: E402

pytestmark = pytest.mark.gpu

BACKENDS = ["cupy", "numba-cuda"]


def _inputs(interpolation, dtype=torch.float32, batch=(8, 4), count=5, sizes=(9, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*batch, count, generator=g, dtype=torch.float64)
    p = torch.rand(len(sizes), *batch, count, generator=g, dtype=torch.float64) * (torch.tensor(sizes).view(-1, 1, 1, 1) - 1)
    s = torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.6 if interpolation != "bilinear" else None
    cuda = lambda x: None if x is None else x.to(device="cuda", dtype=dtype)  # noqa: E731
    return cuda(w), cuda(p), cuda(s), sizes


# -- item 3: the caller's memory and stream --------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_torch_allocations(backend):
    """K and the gradients come from torch's caching allocator (memory_allocated sees them), not CuPy's pool."""
    cupy = pytest.importorskip("cupy")
    w, p, s, sizes = _inputs("gauss")
    kw = dict(sigma=s, interpolation="gauss", backend=backend)
    ndcls.construct(w, p, sizes, **kw)  # compile and warm up
    torch.cuda.synchronize()
    pool = cupy.get_default_memory_pool()
    pool_before = pool.used_bytes()
    before = torch.cuda.memory_allocated()
    k = ndcls.construct(w, p, sizes, **kw)
    assert torch.cuda.memory_allocated() - before >= k.numel() * k.element_size()
    grads = ndcls.construct_grad(torch.ones_like(k), w, p, sizes, **kw)
    need = sum(g.numel() * g.element_size() for g in grads) + k.numel() * k.element_size()
    assert torch.cuda.memory_allocated() - before >= need
    assert pool.used_bytes() == pool_before, "results must not come from CuPy's pool"
    del k, grads
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 4096 + 2 * w.numel() * 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_side_stream_is_not_blocked_by_the_default_stream(backend):
    """A call on a side stream neither waits for nor joins work queued on the default stream."""
    w, p, s, sizes = _inputs("triangle")
    kw = dict(sigma=s, interpolation="triangle", backend=backend)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # compile, and fill the caching allocator's pool of this stream
        for _ in range(2):  # (a first cudaMalloc may synchronise the device)
            k = ndcls.construct(w, p, sizes, **kw)
            ndcls.construct_grad(k, w, p, sizes, **kw)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # about a second of spinning on the default stream
    with torch.cuda.stream(side):
        k = ndcls.construct(w, p, sizes, **kw)
        grads = ndcls.construct_grad(k, w, p, sizes, **kw)
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    assert not torch.cuda.default_stream().query(), "the side stream waited for the default stream"
    torch.cuda.synchronize()
    expected = ndcls.construct(w.cpu().double(), p.cpu().double(), sizes, sigma=s.cpu().double(), interpolation="triangle")
    worst, same_nan = worst_error(k.cpu().numpy(), expected.numpy(), "float32")
    assert same_nan and worst <= 1 and all(g.device.type == "cuda" for g in grads if g is not None)


# -- item 4: CUDA graphs ---------------------------------------------------------------------------


def _layer(version="gauss", dtype=torch.float32):
    from ndcls.torch_bridge import Dcls2d

    torch.manual_seed(0)
    return Dcls2d(8, 16, kernel_count=5, dilated_kernel_size=9, padding=4, version=version).to(device="cuda", dtype=dtype)


@pytest.mark.parametrize("version", ["v0", "v1", "max", "gauss"])
def test_forward_backward_captured_in_a_cuda_graph(version):
    m = _layer(version)
    static_x = torch.randn(4, 8, 16, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, caches) outside the capture
        for _ in range(3):
            m.zero_grad(set_to_none=True)
            m(static_x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    m.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = m(static_x)
        static_y.square().sum().backward()
    for seed in (1, 2):
        static_x.copy_(torch.randn(4, 8, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        replayed = [static_y.clone()] + [t.grad.clone() for t in m.parameters() if t.grad is not None]
        eager = _layer(version)
        eager.load_state_dict(m.state_dict())
        y = eager(static_x)
        y.square().sum().backward()
        expected = [y] + [t.grad for t in eager.parameters() if t.grad is not None]
        assert len(replayed) == len(expected)
        for a, b in zip(replayed, expected):  # float32 atomics and cuDNN algorithms: not bitwise
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_compile_reduce_overhead():
    from torch._dynamo.utils import counters

    m = _layer("gauss")
    eager = _layer("gauss")

    def step(model, x):
        y = model(x)
        y.square().mean().backward()
        return y

    compiled = torch.compile(step, mode="reduce-overhead")
    counters.clear()
    for seed in range(4):
        x = torch.randn(4, 8, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        m.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        y = compiled(m, x).clone()
        y_eager = step(eager, x)
        torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.P.grad, eager.P.grad, rtol=1e-4, atol=1e-5)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


# -- item 7: half precision ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
def test_half_precision_on_cupy_matches_reference(dtype, interpolation):
    w, p, s, sizes = _inputs(interpolation, dtype=getattr(torch, dtype))
    kw = dict(sigma=s, interpolation=interpolation)
    k = ndcls.construct(w, p, sizes, backend="cupy", **kw)
    assert k.dtype == getattr(torch, dtype) and k.device.type == "cuda"
    g = torch.randn(k.shape, device="cuda").to(k.dtype)
    grads = ndcls.construct_grad(g, w, p, sizes, backend="cupy", **kw)
    up = lambda x: None if x is None else x.double().cpu().numpy()  # noqa: E731
    ref_kw = dict(sigma=up(s), interpolation=interpolation, backend="numpy")
    expected = [ndcls.construct(up(w), up(p), sizes, **ref_kw), *ndcls.construct_grad(up(g), up(w), up(p), sizes, **ref_kw)]
    for name, a, e in zip(("K", "grad_weight", "grad_positions", "grad_sigma"), [k, *grads], expected):
        if e is None:
            assert a is None
            continue
        assert a.dtype == getattr(torch, dtype), name
        worst, same_nan = worst_error(up(a), e, dtype)
        assert same_nan and worst <= 1, f"{name}: {worst:.3g} x the {dtype} tolerance"


def test_bfloat16_broadcast_positions_reduce_in_torch():
    w, p, s, sizes = _inputs("gauss", dtype=torch.bfloat16)
    p1, s1 = p[:, :1, :1], s[:, :1, :1]
    grads = ndcls.construct_grad(torch.ones((*w.shape[:-1], *sizes), device="cuda", dtype=torch.bfloat16), w, p1, sizes, sigma=s1, interpolation="gauss")
    assert grads[1].shape == p1.shape and grads[2].shape == s1.shape and grads[1].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("version", ["v0", "max", "gauss"])
def test_half_precision_layers(dtype, version):
    m32 = _layer(version)
    m = _layer(version, dtype)
    x = torch.randn(2, 8, 16, 16, device="cuda")
    y = m(x.to(dtype))
    assert y.dtype == dtype
    y.float().square().mean().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in m.parameters())
    y32 = m32(x)
    scale = y32.abs().max()
    assert (y.float() - y32).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layers_under_autocast(dtype):
    m = _layer("gauss")
    x = torch.randn(2, 8, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = m(x)
    assert y.dtype == dtype
    y.float().square().mean().backward()
    assert m.P.grad.dtype == torch.float32 and torch.isfinite(m.P.grad).all()
