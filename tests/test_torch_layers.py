"""DCLS layers: gradients, agreement with F.convNd and with the reference implementation."""

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import ndcls  # noqa: E402
from ndcls.torch_bridge import Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3_2d, Dcls3d  # noqa: E402
from ndcls.torch_bridge.layers import _VERSION_KERNEL, VERSIONS  # noqa: E402
from ndcls.torch_bridge.training import convert_reference_state_dict  # noqa: E402

from _tolerances import assert_close  # noqa: E402

# (layer, constructor kwargs, input shape): small shapes, every kind, non-square kernels
LAYERS = {
    "1d": (Dcls1d, dict(dilated_kernel_size=5, padding=2), (1, 2, 7)),
    "2d": (Dcls2d, dict(dilated_kernel_size=(3, 4), padding=1), (1, 2, 5, 5)),
    "3d": (Dcls3d, dict(dilated_kernel_size=(2, 3, 3), padding=1), (1, 2, 3, 4, 3)),
    "2_1d": (Dcls2_1d, dict(dense_kernel_size=2, dilated_kernel_size=4, padding=1), (1, 2, 4, 5)),
    "3_1d": (Dcls3_1d, dict(dense_kernel_size=(2, 1), dilated_kernel_size=3, padding=1), (1, 2, 3, 3, 4)),
    "3_2d": (Dcls3_2d, dict(dense_kernel_size=2, dilated_kernel_size=(3, 2), padding=1), (1, 2, 3, 4, 4)),
    "2dK1d": (Dcls2dK1d, dict(dilated_kernel_size=4, padding=(1, 2), flat_dim=1), (1, 2, 4, 5)),
}


def _make(kind, version, dtype=torch.float64, seed=0, **extra):
    cls, kw, xshape = LAYERS[kind]
    torch.manual_seed(seed)
    layer = cls(2, 2, 2, version=version, **{**kw, **extra}).to(dtype)
    with torch.no_grad():  # positions with fractional parts in [0.45, 0.55], widths 1.1 to 1.3:
        for j, (lo, hi) in enumerate(layer.position_limits):  # no kink of any version nearby
            layer.P[j].copy_(torch.randint(lo, hi + 1, layer.P[j].shape) - 0.05 + 0.1 * torch.rand(layer.P[j].shape))
            layer.P[j].clamp_(lo - 0.45, hi + 0.45)
        if layer.SIG is not None:
            layer.SIG.uniform_(0.1, 0.3)
    return layer, torch.randn(xshape, dtype=dtype)


def _functional(layer, x):
    names = [n for n, _ in layer.named_parameters()]

    def fn(*params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    return fn, tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_gradcheck(kind, version):
    layer, x = _make(kind, version)
    fn, params = _functional(layer, x)
    # fast mode: Jacobian-vector products along random directions, a few passes instead of one
    # per parameter and output element (the op itself is checked element-wise in test_torch_ops)
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


def _expected_kernel(layer):
    """The conv weight built directly with ndcls.construct (NumPy reference backend)."""
    P = layer.P.detach().numpy()
    rows = [P[j] + layer.kernel_sizes[a] // 2 for j, a in enumerate(layer.row_axes)]
    interpolation, offset = _VERSION_KERNEL[layer.version]
    sigma = None
    if interpolation != "bilinear":
        sigma = np.ones_like(P) if offset is None else np.abs(layer.SIG.detach().numpy()) + offset
    K = ndcls.construct(layer.weight.detach().numpy(), np.stack(rows), layer.kernel_sizes, sigma=sigma,
                        interpolation=interpolation, learned_dims=layer.row_axes, backend="numpy")
    return torch.from_numpy(K).reshape(layer.out_channels, -1, *layer.conv_kernel_size)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_equals_conv_with_constructed_kernel(kind, version):
    layer, x = _make(kind, version, dtype=torch.float32, stride=2, groups=2, bias=True)
    K = _expected_kernel(layer)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.conv_dims]
    expected = conv(x, K, layer.bias, layer.stride, layer.padding, 1, layer.groups)
    assert_close(layer(x).detach().numpy(), expected.detach().numpy())


@pytest.mark.parametrize("version", VERSIONS)
def test_rows_move_their_axes_from_the_centre(version):
    """P = 0 puts an element at the centre of a non-square kernel; row j moves axis row_axes[j]."""
    layer = Dcls3d(1, 1, 1, dilated_kernel_size=(3, 5, 8), version=version, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.P.zero_()
        if layer.SIG is not None:  # narrowest widths: the mass stays on its cell
            layer.SIG.fill_(0.0)
        K0 = layer.construct_kernel()[0, 0]
        layer.P[0].fill_(1.0)
        K1 = layer.construct_kernel()[0, 0]
    centre = (1, 2, 4)
    assert torch.unravel_index(K0.argmax(), K0.shape) == centre
    moved = list(centre)
    moved[layer.row_axes[0]] += 1
    assert torch.unravel_index(K1.argmax(), K1.shape) == tuple(moved)


@pytest.mark.parametrize("size", [4, 5])
def test_clamp_keeps_positions_inside_even_and_odd(size):
    layer = Dcls2d(2, 2, 6, dilated_kernel_size=(size, size + 1), version="v0", bias=False)
    with torch.no_grad():
        layer.P.uniform_(-3 * size, 3 * size)
    layer.clamp_parameters()
    pos = layer.kernel_positions()
    for j, a in enumerate(layer.row_axes):
        assert pos[j].min() >= 0 and pos[j].max() <= layer.kernel_sizes[a] - 1
    # bilinear with every element inside: no mass lost
    K = layer.construct_kernel()
    assert_close(K.sum((2, 3)).detach().numpy(), layer.weight.sum(-1).detach().numpy())


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", "valid", (2, 1)])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")  # torch's nn.Conv2d, the reference
def test_padding(padding, padding_mode):
    layer = Dcls2d(2, 4, 3, dilated_kernel_size=(4, 3), padding=padding, padding_mode=padding_mode, version="gauss")
    x = torch.randn(1, 2, 6, 7)
    ref = torch.nn.Conv2d(2, 4, (4, 3), padding=padding, padding_mode=padding_mode)
    with torch.no_grad():
        ref.weight.copy_(layer.construct_kernel())
        ref.bias.copy_(layer.bias)
    y = layer(x)
    assert_close(y.detach().numpy(), ref(x).detach().numpy())
    if padding == "same":
        assert y.shape[-2:] == x.shape[-2:]


def test_constructor_errors():
    with pytest.raises(ValueError, match="version"):
        Dcls2d(2, 2, 3, dilated_kernel_size=5, version="v2")
    with pytest.raises(ValueError, match="divisible by groups"):
        Dcls2d(3, 2, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        Dcls1d(2, 2, 3, padding_mode="wrap")
    with pytest.raises(ValueError, match="strided"):
        Dcls2d(2, 2, 3, dilated_kernel_size=5, stride=2, padding="same")


def test_state_dict_round_trip_and_repr():
    layer, x = _make("3_2d", "gauss", dtype=torch.float32, bias=True)
    assert set(layer.state_dict()) == {"weight", "P", "SIG", "bias"}
    other = Dcls3_2d(2, 2, 2, dense_kernel_size=2, dilated_kernel_size=(3, 2), padding=1, version="gauss")
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))
    assert "dilated_kernel_size=(3, 2)" in repr(layer) and "version=gauss" in repr(layer)


# -- the reference implementation (PyPI dcls 0.1.1) ------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    R = pytest.importorskip("DCLS.construct.modules")
    logging.getLogger().setLevel(logging.ERROR)  # its Dcls2d logs warnings about a CUDA kernel
    return R


# (reference name, our class, constructor kwargs, input shape): square / cubic kernels
REFERENCE_CASES = {
    "1d": ("Dcls1d", Dcls1d, dict(dilated_kernel_size=7, padding=3, groups=2), (2, 4, 12)),
    "2d": ("Dcls2d", Dcls2d, dict(dilated_kernel_size=5, padding=2, groups=2, padding_mode="reflect"), (2, 4, 8, 8)),
    "2d-even": ("Dcls2d", Dcls2d, dict(dilated_kernel_size=4, padding=1, groups=4, stride=2), (2, 4, 8, 8)),
    "3d": ("Dcls3d", Dcls3d, dict(dilated_kernel_size=3, padding=1), (1, 4, 5, 5, 5)),
    "3_1d": ("Dcls3_1d", Dcls3_1d, dict(dense_kernel_size=(2, 3), dilated_kernel_size=5, padding=1), (1, 4, 5, 5, 7)),
    "2dK1d": ("Dcls2dK1d", Dcls2dK1d, dict(dilated_kernel_size=5, padding=(2, 0), flat_dim=0), (1, 4, 7, 6)),
}


def _relative_error(actual, expected):
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _compare_with_reference(ref, ours, x):
    """Same outputs and gradients (input and every parameter), float32, 1e-5 of the largest value."""
    y_ref, y = ref(x), ours(x)
    g = torch.randn_like(y_ref)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(xr), ours(xo)
    y_ref.backward(g)
    y.backward(g)
    errors = {"output": _relative_error(y, y_ref), "input grad": _relative_error(xo.grad, xr.grad)}
    ours_params = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        errors[f"{name} grad"] = _relative_error(ours_params[name].grad, p.grad)
    assert max(errors.values()) < 1e-5, errors
    assert_close(y.detach().numpy(), y_ref.detach().numpy(), what="output")
    return errors


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_checkpoint_same_outputs_and_gradients(reference, case, version):
    name, cls, kw, xshape = REFERENCE_CASES[case]
    if name == "Dcls3_1d" and version == "v0":
        pytest.skip("the reference Dcls3_1d has no v0")
    torch.manual_seed(1)
    ref = getattr(reference, name)(4, 4, 3, version=version, **kw)
    torch.manual_seed(1)
    ours = cls(4, 4, 3, version=version, **kw)
    # same names, shapes and initialisation (same random draws; for even sizes our clamp keeps
    # the initial positions inside the kernel, one cell tighter than the reference's)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    for k, v in ref.state_dict().items():
        if k == "P":
            v = torch.stack([v[j].clamp(lo, hi) for j, (lo, hi) in enumerate(ours.position_limits)])
        assert torch.equal(ours.state_dict()[k], v), k
    with torch.no_grad():  # a trained-looking checkpoint: spread positions, non-trivial widths
        ref.P.uniform_(-2.0, 2.0)
        ref.clamp_parameters()
        if ref.SIG is not None:
            ref.SIG.uniform_(0.05, 0.8)
    ours.load_state_dict(ref.state_dict())
    _compare_with_reference(ref, ours, torch.randn(xshape))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,cls,sizes", [("Dcls2d", Dcls2d, (3, 7)), ("Dcls3d", Dcls3d, (3, 5, 8))])
def test_non_square_reference_checkpoint_converts(reference, name, cls, sizes, version):
    torch.manual_seed(2)
    ref = getattr(reference, name)(2, 2, 3, dilated_kernel_size=sizes, padding=1, version=version)
    with torch.no_grad():
        ref.P.uniform_(-1.0, 1.0)
        if ref.SIG is not None:
            ref.SIG.uniform_(0.05, 0.8)
    model = torch.nn.Sequential(torch.nn.Identity(), cls(2, 2, 3, dilated_kernel_size=sizes, padding=1, version=version))
    checkpoint = {f"1.{k}": v for k, v in ref.state_dict().items()}
    converted = convert_reference_state_dict(checkpoint, model)
    assert all(torch.equal(converted[k], v) for k, v in checkpoint.items() if not k.endswith("P"))
    model.load_state_dict(converted)
    x = torch.randn(1, 2, *(s + 2 for s in sizes))
    _compare_with_reference(ref, model[1], x)
    if version != "v0" or name == "Dcls3d":  # (v0 in 2-D centres each row correctly)
        assert not torch.equal(converted["1.P"], checkpoint["1.P"])


@pytest.mark.gpu
@pytest.mark.parametrize("version", VERSIONS)
def test_cuda_layer_matches_cpu(version):
    layer, x = _make("3_2d", version, dtype=torch.float32)
    y = layer(x)
    y.sum().backward()
    cuda_layer, _ = _make("3_2d", version, dtype=torch.float32)
    cuda_layer = cuda_layer.cuda()
    yc = cuda_layer(x.cuda())
    yc.sum().backward()
    assert_close(yc.detach().cpu().numpy(), y.detach().numpy())
    assert_close(cuda_layer.P.grad.cpu().numpy(), layer.P.grad.numpy(), what="P grad")
