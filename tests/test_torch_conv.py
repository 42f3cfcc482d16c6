"""The direct convolution in torch: the op ``ndcls.torch_bridge.conv`` and the layers' ``method``."""

import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import ndcls  # noqa: E402
from ndcls.torch_bridge import Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3_2d, Dcls3d, conv, construct  # noqa: E402
from ndcls.torch_bridge import cost  # noqa: E402
from ndcls.torch_bridge._ops import _conv_op  # noqa: E402
from ndcls.torch_bridge.layers import VERSIONS  # noqa: E402

from _tolerances import assert_close  # noqa: E402

INTERPOLATIONS = ("bilinear", "triangle", "gauss")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _params(out_ch, in_per_group, sizes, learned, count, *, share=False, dtype=torch.float64, seed=0):
    """Weight, positions away from integers and borders (no bilinear or triangle kink nearby), widths."""
    g = torch.Generator().manual_seed(seed)
    dense = tuple(s for a, s in enumerate(sizes) if a not in learned)
    w = torch.randn(out_ch, in_per_group, *dense, count, generator=g, dtype=dtype)
    pbatch = (1, 1) if share else (out_ch, in_per_group)
    rows = [torch.randint(0, max(sizes[a] - 1, 1), (*pbatch, *dense, count), generator=g)
            + 0.2 + 0.6 * torch.rand(*pbatch, *dense, count, generator=g) for a in learned]
    p = torch.stack(rows).to(dtype)
    s = torch.randint(1, 3, p.shape, generator=g).to(dtype)
    return w, p, s


# (in_channels, out_channels, groups, sizes, learned_dims, count, stride, padding, spatial, shared positions)
CASES = [
    (2, 3, 1, (5,), (0,), 3, 1, 2, (9,), False),
    (4, 4, 2, (4,), (0,), 2, 2, "valid", (11,), False),
    (2, 2, 1, (3, 4), (0, 1), 2, 1, "same", (5, 6), False),
    (3, 3, 3, (5, 3), (1, 0), 3, (2, 1), (1, 0), (7, 5), False),  # depthwise, rows in reverse order
    (2, 4, 2, (2, 4), (1,), 2, 1, 1, (4, 6), False),  # 2-1D: dense axis 0
    (2, 2, 1, (3, 3, 2), (0, 2, 1), 2, 1, 1, (4, 3, 3), False),
    (2, 3, 1, (2, 3, 3), (1, 2), 1, 1, 0, (3, 4, 4), False),  # 3-2D
    (4, 6, 2, (5, 5), (0, 1), 3, 1, 2, (6, 6), True),  # positions shared by every channel
]


def _args(case, interpolation, dtype=torch.float64):
    cin, cout, groups, sizes, learned, count, stride, padding, spatial, share = case
    w, p, s = _params(cout, cin // groups, sizes, learned, count, share=share, dtype=dtype)
    x = torch.randn(2, cin, *spatial, dtype=dtype, generator=torch.Generator().manual_seed(1))
    sigma = None if interpolation == "bilinear" else s
    kw = dict(sigma=sigma, interpolation=interpolation, learned_dims=learned, stride=stride, padding=padding,
              groups=groups)
    return x, w, p, sizes, kw


def _dense(x, w, p, sizes, kw):
    """torch's convolution of the constructed kernel: what the op must equal."""
    K = construct(w, p, sizes, sigma=kw["sigma"], interpolation=kw["interpolation"], learned_dims=kw["learned_dims"])
    K = K.expand(*w.shape[:2], *sizes)
    return _CONV[len(sizes)](x, K, None, kw["stride"], kw["padding"], 1, kw["groups"])


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("case", CASES)
def test_equals_dense_route_values_and_gradients(case, interpolation):
    x, w, p, sizes, kw = _args(case, interpolation)
    leaves = [t.clone().requires_grad_() for t in (x, w, p)]
    sig = kw["sigma"].clone().requires_grad_() if kw["sigma"] is not None else None
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, p)]
    ref_sig = kw["sigma"].clone().requires_grad_() if kw["sigma"] is not None else None
    y = conv(*leaves, sizes, **{**kw, "sigma": sig})
    y_ref = _dense(*ref_leaves, sizes, {**kw, "sigma": ref_sig})
    assert_close(y.detach().numpy(), y_ref.detach().numpy(), what="output")
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, a, b in zip(("input", "weight", "positions", "sigma"), leaves + [sig], ref_leaves + [ref_sig]):
        if a is not None:
            assert_close(a.grad.numpy(), b.grad.numpy(), what=f"grad {name}")


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[7]])
def test_gradcheck(case, interpolation):
    x, w, p, sizes, kw = _args(case, interpolation)
    sigma = kw.pop("sigma")
    if sigma is None:
        fn = lambda x, w, p: conv(x, w, p, sizes, **kw)  # noqa: E731
        args = (x, w, p)
    else:
        fn = lambda x, w, p, s: conv(x, w, p, sizes, sigma=s, **kw)  # noqa: E731
        args = (x, w, p, sigma)
    assert torch.autograd.gradcheck(fn, tuple(a.clone().requires_grad_() for a in args), eps=1e-6, atol=1e-7,
                                    rtol=1e-6)


def test_gradients_only_where_needed(monkeypatch):
    x, w, p, sizes, kw = _args(CASES[2], "gauss")
    calls = []
    real = ndcls.conv_grad
    monkeypatch.setattr(ndcls, "conv_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    w.requires_grad_()
    conv(x, w, p, sizes, **kw).sum().backward()
    assert w.grad is not None and x.grad is None and p.grad is None and kw["sigma"].grad is None
    assert len(calls) == 1
    # nothing requires grad: no graph, no backward call
    y = conv(x, w.detach(), p, sizes, **kw)
    assert y.grad_fn is None and len(calls) == 1


def test_non_contiguous_and_empty_batch():
    x, w, p, sizes, kw = _args(CASES[3], "bilinear")
    xt = torch.stack([x, -x], -1)[..., 0]  # strided views with the same values
    wt = torch.stack([w, -w], -1)[..., 0]
    assert not xt.is_contiguous() and not wt.is_contiguous()
    assert_close(conv(xt, wt, p, sizes, **kw).numpy(), conv(x, w, p, sizes, **kw).numpy(), what="non-contiguous")
    empty = conv(x[:0], w, p, sizes, **kw)
    assert empty.shape == (0, *conv(x, w, p, sizes, **kw).shape[1:])


def test_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    x, w, p, sizes, kw = _args(CASES[3], "gauss")
    x, w, p, s = (t.requires_grad_() for t in (x, w, p, kw["sigma"]))
    torch.library.opcheck(_conv_op, (x, w, p, list(sizes), s, "gauss", [1, 0], [2, 1], [1, 0], "", 3))
    x, w, p, sizes, kw = _args(CASES[2], "bilinear")
    torch.library.opcheck(_conv_op, (x, w.requires_grad_(), p, list(sizes), None, "bilinear", [0, 1], [1, 1], [0, 0],
                                     "same", 1))


# -- layers --------------------------------------------------------------------------------
LAYERS = {
    "1d": (Dcls1d, dict(dilated_kernel_size=7, padding=3), (2, 4, 12)),
    "2d": (Dcls2d, dict(dilated_kernel_size=(3, 5), padding="same", groups=2), (2, 4, 6, 7)),
    "3d": (Dcls3d, dict(dilated_kernel_size=3, padding=1, stride=(1, 2, 1)), (1, 4, 4, 5, 4)),
    "2_1d": (Dcls2_1d, dict(dense_kernel_size=2, dilated_kernel_size=5, padding=1, groups=4), (2, 4, 5, 7)),
    "3_1d": (Dcls3_1d, dict(dense_kernel_size=(2, 3), dilated_kernel_size=4, padding=(1, 1, 2)), (1, 4, 3, 4, 6)),
    "3_2d": (Dcls3_2d, dict(dense_kernel_size=2, dilated_kernel_size=(3, 4), padding="same"), (1, 4, 3, 4, 5)),
    "2dK1d-0": (Dcls2dK1d, dict(dilated_kernel_size=5, padding=(2, 0), flat_dim=0), (2, 4, 7, 6)),
    "2dK1d-1": (Dcls2dK1d, dict(dilated_kernel_size=5, padding=(1, 2), flat_dim=1), (2, 4, 6, 7)),
    "reflect": (Dcls2d, dict(dilated_kernel_size=5, padding=2, padding_mode="reflect"), (1, 4, 6, 6)),
    "circular": (Dcls1d, dict(dilated_kernel_size=5, padding=2, padding_mode="circular", groups=2), (2, 4, 9)),
}


def _layer(kind, version, method, dtype=torch.float64):
    cls, kw, xshape = LAYERS[kind]
    torch.manual_seed(0)
    layer = cls(4, 4, 3, version=version, method=method, **kw).to(dtype)
    if layer.SIG is not None:
        with torch.no_grad():
            layer.SIG.uniform_(0.1, 0.6)
    return layer, torch.randn(xshape, dtype=dtype, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", LAYERS)
def test_methods_agree(kind, version):
    """Same parameters, same state_dict keys, same outputs and gradients whatever the method."""
    results = {}
    for method in ("construct", "direct", "auto"):
        layer, x = _layer(kind, version, method)
        x.requires_grad_()
        y = layer(x)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
        grads = {n: p.grad for n, p in layer.named_parameters()}
        results[method] = (list(layer.state_dict()), y.detach(), x.grad, grads, layer.route(x))
    keys, y, gx, grads, _ = results["construct"]
    assert results["direct"][4] == "direct" and results["construct"][4] == "construct"
    for method in ("direct", "auto"):
        k, y2, gx2, grads2, _ = results[method]
        assert k == keys
        assert_close(y2.numpy(), y.numpy(), what=f"{method} output")
        assert_close(gx2.numpy(), gx.numpy(), what=f"{method} grad input")
        for name in grads:
            assert_close(grads2[name].numpy(), grads[name].numpy(), what=f"{method} grad {name}")


def test_state_dict_moves_between_methods():
    a, x = _layer("2d", "gauss", "construct")
    b = Dcls2d(4, 4, 3, version="gauss", method="direct", **LAYERS["2d"][1]).double()
    b.load_state_dict(a.state_dict(), strict=True)
    assert_close(b(x).detach().numpy(), a(x).detach().numpy(), what="output after loading")


def test_auto_falls_back_to_construct_where_direct_would_copy_or_reshape():
    for kind in ("reflect", "circular", "2dK1d-0", "2dK1d-1"):
        layer, x = _layer(kind, "v0", "auto")
        assert layer.route(x) == "construct", kind


def test_auto_follows_the_cost_model():
    # a long 1-D kernel with few elements: the direct route does ~1% of the dense multiply-adds
    sparse = Dcls1d(16, 16, 2, dilated_kernel_size=501, padding=250, version="v0")
    assert sparse.route(torch.zeros(1, 16, 600)) == "direct"
    # a small kernel full of Gaussian elements: the direct route touches more cells than K has
    dense = Dcls2d(8, 8, 12, dilated_kernel_size=5, padding=2, groups=8, version="gauss")
    assert dense.route(torch.zeros(1, 8, 20, 20)) == "construct"
    # the width enters the choice: widening every element switches a gauss layer's route
    layer = Dcls1d(16, 16, 2, dilated_kernel_size=501, padding=250, version="gauss")
    x = torch.zeros(1, 16, 600)
    assert layer.route(x) == "direct"
    with torch.no_grad():
        layer.SIG.fill_(100.0)  # in place: the layer notices through SIG's version counter
    assert layer.route(x) == "construct"


def test_bad_method():
    with pytest.raises(ValueError, match="method must be one of"):
        Dcls1d(2, 2, 1, dilated_kernel_size=3, method="fast")


def test_compile_fullgraph_both_routes():
    for method in ("direct", "auto"):
        layer, x = _layer("2d", "gauss", method, dtype=torch.float32)
        x = x.float()
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(x)
        y.sum().backward()
        assert_close(y.detach().numpy(), layer(x).detach().numpy(), dtype="float32", what=method)


# -- the cost model ------------------------------------------------------------------------
def test_taps_per_element():
    assert cost.taps_per_element("bilinear", (17, 17)) == 4
    assert cost.taps_per_element("bilinear", (1, 17)) == 2  # a size-1 axis holds one cell
    assert cost.taps_per_element("triangle", (9,), 1.5) == 5
    # gauss, width 0.5 in float32: |i - p| < 2.9 -> at most 7 cells per axis
    assert cost.taps_per_element("gauss", (1025,), 0.5) == 7
    assert cost.taps_per_element("gauss", (17, 17), 0.5, "float64") == 11 * 11
    assert cost.taps_per_element("gauss", (5, 5), 10.0) == 25  # capped by the kernel
    assert cost.taps_per_element("gauss", (5, 7), None) == 35  # unknown width: every cell


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_taps_agree_with_the_kernels_estimate(interpolation, dtype):
    from ndcls._spec import taps_per_element

    for sizes in ((1,), (17,), (1025,), (3, 8), (9, 9, 9)):
        for width in (0.1, 0.5, 0.99, 1.0, 1.5, 3.0, 40.0):
            w = None if interpolation == "bilinear" else width
            assert cost.taps_per_element(interpolation, sizes, w, dtype) == taps_per_element(interpolation, sizes, w, dtype)


def test_estimate_scales_with_the_work():
    shape = dict(batch=2, out_channels=8, in_per_group=8, out_spatial=(100,), sizes=(251,), learned_dims=(0,),
                 count=2, interpolation="bilinear")
    e1, e2 = cost.estimate(**shape), cost.estimate(**{**shape, "batch": 4})
    assert e1["work_dense"] == 2 * 8 * 8 * 100 * 251 and e1["work_direct"] == 2 * 8 * 8 * 100 * 2 * 2
    assert e2["direct_s"] > e1["direct_s"] and e2["construct_s"] > e1["construct_s"]
    assert math.isclose(e2["work_dense"], 2 * e1["work_dense"])


def test_estimate_merges_taps_and_uses_the_device_rates():
    """The direct route gathers each touched cell of a channel pair once (the CPU kernels merge
    a pair's shared cells, the GPU kernels list them once): its work is capped by the kernel's
    cells (34 gauss elements of 17 x 17 cut cells each on a 17 x 17 kernel), and the times use
    the device's rates."""
    shape = dict(batch=2, out_channels=4, in_per_group=1, out_spatial=(20, 20), sizes=(17, 17), learned_dims=(0, 1),
                 count=34, interpolation="gauss", width=2.0)
    cpu, gpu = cost.estimate(**shape), cost.estimate(**shape, device="cuda")
    for e, rates in ((cpu, cost.RATES), (gpu, cost.GPU_RATES)):
        assert e["work_direct"] == e["work_dense"] == 2 * 4 * 20 * 20 * 17 * 17
        assert math.isclose(e["direct_s"], rates.call_direct + e["work_direct"] / rates.direct_depthwise)
