"""The differentiable op ``ndcls.torch_bridge.construct``: values, gradients, custom-op checks."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ndcls  # noqa: E402
from ndcls.torch_bridge import construct  # noqa: E402
from ndcls.torch_bridge._ops import _construct_op  # noqa: E402

from _tolerances import assert_close  # noqa: E402

INTERPOLATIONS = ("bilinear", "triangle", "gauss")


def _inputs(batch, sizes, learned_dims, count, *, dtype=torch.float64, share_batch=False, seed=0):
    """Weight, positions (away from integers and borders) and integer widths, requiring grad.

    Positions have fractional parts in [0.2, 0.8] and widths are integers, so neither the
    bilinear floor nor the triangle's kink |i - p| = s is crossed by finite differences.
    """
    g = torch.Generator().manual_seed(seed)
    learned = tuple(learned_dims) if learned_dims is not None else tuple(range(len(sizes)))
    dense = tuple(s for a, s in enumerate(sizes) if a not in learned)
    w = torch.randn(*batch, *dense, count, generator=g, dtype=dtype)
    pbatch = tuple(1 for _ in batch) if share_batch else batch
    rows = []
    for a in learned:
        whole = torch.randint(0, max(sizes[a] - 1, 1), (*pbatch, *dense, count), generator=g)
        rows.append(whole + 0.2 + 0.6 * torch.rand(*pbatch, *dense, count, generator=g))
    p = torch.stack(rows).to(dtype)
    s = torch.randint(1, 3, p.shape, generator=g).to(dtype)
    return w.requires_grad_(), p.requires_grad_(), s.requires_grad_()


CASES = [
    # (batch, sizes, learned_dims, count, share_batch)
    ((2,), (5,), None, 3, False),
    ((2, 1), (4, 5), None, 3, False),
    ((2,), (3, 4, 3), (2, 0, 1), 2, False),  # permuted rows
    ((2,), (3, 5), (1,), 2, False),  # 2-1D: learned last axis
    ((2,), (2, 4, 5), (1, 2), 2, False),  # 3-2D
    ((3, 2), (4, 4), None, 3, True),  # positions shared by all batch kernels
]


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("batch,sizes,learned,count,share", CASES)
def test_gradcheck(interpolation, batch, sizes, learned, count, share):
    w, p, s = _inputs(batch, sizes, learned, count, share_batch=share)
    if interpolation == "bilinear":
        fn = lambda w, p: construct(w, p, sizes, learned_dims=learned)  # noqa: E731
        args = (w, p)
    else:
        fn = lambda w, p, s: construct(w, p, sizes, sigma=s, interpolation=interpolation, learned_dims=learned)  # noqa: E731
        args = (w, p, s)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_matches_array_api(interpolation):
    sizes, learned = (3, 5, 4), (2, 0)
    w, p, s = _inputs((2, 3), sizes, learned, 4, dtype=torch.float32)
    sigma = None if interpolation == "bilinear" else s
    K = construct(w, p, sizes, sigma=sigma, interpolation=interpolation, learned_dims=learned)
    expected = ndcls.construct(
        w.detach().numpy(), p.detach().numpy(), sizes,
        sigma=None if sigma is None else s.detach().numpy(),
        interpolation=interpolation, learned_dims=learned, backend="numpy",
    )
    assert K.dtype == torch.float32 and K.shape == (2, 3, 3, 5, 4)
    assert_close(K.detach().numpy(), expected)
    g = torch.randn_like(K)
    K.backward(g)
    gw, gp, gs = ndcls.construct_grad(
        g.numpy(), w.detach().numpy(), p.detach().numpy(), sizes,
        sigma=None if sigma is None else s.detach().numpy(),
        interpolation=interpolation, learned_dims=learned, backend="numpy",
    )
    assert_close(w.grad.numpy(), gw, what="grad weight")
    assert_close(p.grad.numpy(), gp, what="grad positions")
    if sigma is None:
        assert s.grad is None
    else:
        assert_close(s.grad.numpy(), gs, what="grad sigma")


def test_gradients_only_where_needed():
    w, p, s = _inputs((2,), (4, 4), None, 3)
    p.requires_grad_(False)
    s.requires_grad_(False)
    construct(w, p, (4, 4), sigma=s, interpolation="gauss").sum().backward()
    assert w.grad is not None and p.grad is None and s.grad is None


def test_non_contiguous_and_empty_batch():
    w, p, s = _inputs((3,), (5, 5), None, 4)
    wt = w.detach().t().contiguous().t()  # column-major views
    pt = p.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert not wt.is_contiguous() and not pt.is_contiguous()
    assert torch.equal(construct(wt, pt, (5, 5)), construct(w.detach(), p.detach(), (5, 5)))
    empty = construct(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(2, 0, 4, dtype=torch.float64), (5, 5))
    assert empty.shape == (0, 5, 5)


def test_validation_errors_come_from_the_spec():
    w, p, _ = _inputs((2,), (4, 4), None, 3)
    with pytest.raises(ValueError, match="sigma is required"):
        construct(w, p, (4, 4), interpolation="gauss")
    with pytest.raises(TypeError, match="dtype of weight"):
        construct(w, p.float(), (4, 4))


def test_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    w, p, s = _inputs((2,), (3, 4, 3), (2, 0), 2)
    torch.library.opcheck(_construct_op, (w, p, [3, 4, 3], s, "gauss", [2, 0]))
    torch.library.opcheck(_construct_op, (w, p, [3, 4, 3], None, "bilinear", [2, 0]))


def test_import_ndcls_does_not_import_torch():
    code = "import sys, ndcls; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_cuda_matches_cpu_and_gradcheck(interpolation):
    sizes, learned = (3, 5, 4), (2, 0)
    w, p, s = _inputs((2,), sizes, learned, 3)
    sigma = None if interpolation == "bilinear" else s
    kw = dict(interpolation=interpolation, learned_dims=learned)
    cpu = construct(w, p, sizes, sigma=sigma, **kw)
    wc, pc = w.detach().cuda().requires_grad_(), p.detach().cuda().requires_grad_()
    sc = None if sigma is None else s.detach().cuda().requires_grad_()
    gpu = construct(wc, pc, sizes, sigma=sc, **kw)
    assert gpu.device.type == "cuda"
    assert_close(gpu.detach().cpu().numpy(), cpu.detach().numpy())
    args = (wc, pc) if sc is None else (wc, pc, sc)
    fn = lambda w, p, *a: construct(w, p, sizes, sigma=a[0] if a else None, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("needs", [(w, p, s) for w in (0, 1) for p in (0, 1) for s in (0, 1) if w or p or s])
def test_every_subset_of_inputs_requiring_grad(needs):
    """Eager path and custom op: each requested gradient equals construct_grad's, the others stay None."""
    from ndcls.torch_bridge._ops import _EagerConstruct

    w, p, s = (x.detach().requires_grad_(bool(n)) for x, n in zip(_inputs((2,), (4, 5), None, 3), needs))
    g = torch.randn(2, 4, 5, dtype=torch.float64)
    expected = ndcls.construct_grad(g, w.detach(), p.detach(), (4, 5), sigma=s.detach(), interpolation="triangle")
    for route in ("eager", "custom op"):
        for x in (w, p, s):
            x.grad = None
        if route == "eager":
            k = _EagerConstruct.apply(w, p, s, [4, 5], "triangle", [0, 1])
        else:
            k = _construct_op(w, p, [4, 5], s, "triangle", [0, 1])
        k.backward(g)
        for x, n, e in zip((w, p, s), needs, expected):
            if n:
                assert_close(x.grad.numpy(), e.numpy(), what=route)
            else:
                assert x.grad is None, route


def test_eager_path_skips_the_custom_op_and_compile_uses_it(monkeypatch):
    import ndcls.torch_bridge._ops as ops

    w, p, s = _inputs((2,), (4, 5), None, 3)
    calls = []
    monkeypatch.setattr(ops, "_construct_op", lambda *a: calls.append(a) or ndcls.construct(a[0].detach(), a[1].detach(), a[2]))
    construct(w, p, (4, 5)).sum().backward()
    with torch.no_grad():
        construct(w, p, (4, 5))
    assert calls == [] and w.grad is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    construct(w, p, (4, 5))
    assert len(calls) == 1
