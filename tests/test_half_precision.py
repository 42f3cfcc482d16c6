"""float16 and bfloat16 on the CPU (SPEC section 6): computed in float32, returned in the input
dtype; torch bfloat16 CPU tensors (which NumPy cannot hold); the layers in half precision and
under autocast. The GPU side is in test_torch_gpu.py and test_cupy_cpu.py (emulated bf16 kernels)."""

from __future__ import annotations

import numpy as np
import pytest

import ndcls
from ndcls._tolerances import worst_error

rng = np.random.default_rng(4)


def _problem(interpolation, batch=(3,), count=4, sizes=(6, 5)):
    w = rng.standard_normal((*batch, count))
    p = rng.uniform(0, 1, (len(sizes), *batch, count)) * (np.array(sizes).reshape(-1, 1, 1) - 1)
    s = rng.uniform(0.6, 2.0, p.shape) if interpolation != "bilinear" else None
    return w, p, s, sizes


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
def test_float16_is_float32_work_rounded_once(backend, interpolation):
    w, p, s, sizes = _problem(interpolation)
    half = [None if x is None else x.astype(np.float16) for x in (w, p, s)]
    single = [None if x is None else x.astype(np.float32) for x in half]
    kw = dict(interpolation=interpolation, backend=backend)
    k = ndcls.construct(half[0], half[1], sizes, sigma=half[2], **kw)
    assert k.dtype == np.float16
    np.testing.assert_array_equal(k, ndcls.construct(single[0], single[1], sizes, sigma=single[2], **kw).astype(np.float16))
    g = rng.standard_normal(k.shape).astype(np.float16)
    got = ndcls.construct_grad(g, half[0], half[1], sizes, sigma=half[2], **kw)
    want = ndcls.construct_grad(g.astype(np.float32), single[0], single[1], sizes, sigma=single[2], **kw)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            assert a.dtype == np.float16
            np.testing.assert_array_equal(a, b.astype(np.float16))


@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
def test_torch_bfloat16_cpu_tensors(interpolation):
    torch = pytest.importorskip("torch")
    w, p, s, sizes = _problem(interpolation)
    bf = lambda x: None if x is None else torch.from_numpy(x).bfloat16()  # noqa: E731
    tw, tp, ts = bf(w), bf(p[:, :1]), bf(s if s is None else s[:, :1])  # broadcast positions
    k = ndcls.construct(tw, tp, sizes, sigma=ts, interpolation=interpolation)
    assert k.dtype == torch.bfloat16 and k.shape == (3, *sizes)
    up = lambda x: None if x is None else x.double().numpy()  # noqa: E731
    kw = dict(sigma=up(ts), interpolation=interpolation, backend="numpy")
    worst, same_nan = worst_error(up(k), ndcls.construct(up(tw), up(tp), sizes, **kw), "bfloat16")
    assert same_nan and worst <= 1
    g = torch.randn(k.shape).bfloat16()
    grads = ndcls.construct_grad(g, tw, tp, sizes, sigma=ts, interpolation=interpolation)
    want = ndcls.construct_grad(up(g), up(tw), up(tp), sizes, **kw)
    for a, b in zip(grads, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        worst, same_nan = worst_error(up(a), b, "bfloat16")
        assert same_nan and worst <= 1


def test_registry_says_how_each_backend_takes_half_precision():
    assert ndcls.get_backend("cupy").compute_mode("bfloat16") == "bits"
    assert ndcls.get_backend("cupy").compute_mode("float16") == "native"
    for name in ("numpy", "numba", "numba-cuda"):
        assert ndcls.get_backend(name).compute_mode("bfloat16") == "float32"
    with pytest.raises(TypeError, match=r"takes dtypes .* got float128"):
        ndcls.get_backend("numba").compute_mode(np.longdouble)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("version", ["v0", "v1", "max", "gauss"])
def test_half_precision_layers_on_the_cpu(dtype, version):
    torch = pytest.importorskip("torch")
    from ndcls.torch_bridge import Dcls2d

    torch.manual_seed(0)
    m32 = Dcls2d(4, 6, kernel_count=3, dilated_kernel_size=7, padding=3, version=version)
    m = Dcls2d(4, 6, kernel_count=3, dilated_kernel_size=7, padding=3, version=version)
    m.load_state_dict(m32.state_dict())
    m = m.to(getattr(torch, dtype))
    x = torch.randn(2, 4, 10, 10)
    y = m(x.to(m.weight.dtype))
    assert y.dtype == getattr(torch, dtype)
    y.float().square().mean().backward()
    for t in m.parameters():
        assert t.grad is not None and t.grad.dtype == t.dtype and torch.isfinite(t.grad).all()
    k, k32 = m.construct_kernel().float(), m32.construct_kernel()
    assert (k - k32).abs().max() <= 2e-2 * k32.abs().max()


def test_layers_under_cpu_autocast():
    torch = pytest.importorskip("torch")
    from ndcls.torch_bridge import Dcls2d

    m = Dcls2d(4, 6, kernel_count=3, dilated_kernel_size=7, padding=3, version="gauss")
    x = torch.randn(2, 4, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert m.P.grad.dtype == torch.float32 and torch.isfinite(m.P.grad).all() and m.P.grad.abs().sum() > 0
