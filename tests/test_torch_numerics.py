"""The torch bridge's numerics where the other torch tests do not look: negative widths
parameters (``SIG`` goes negative in training), and gradients for every subset of inputs
that require them."""

import itertools
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ndcls  # noqa: E402
from ndcls.torch_bridge import Dcls1d, Dcls2d, Dcls3_1d, construct  # noqa: E402

from _tolerances import assert_close  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    R = pytest.importorskip("DCLS.construct.modules")
    logging.getLogger().setLevel(logging.ERROR)  # its Dcls2d logs warnings about a CUDA kernel
    return R


# (reference class name, our class, constructor kwargs, input shape)
_LAYERS = {
    "1d": ("Dcls1d", Dcls1d, dict(dilated_kernel_size=7, padding=3), (2, 2, 11)),
    "2d": ("Dcls2d", Dcls2d, dict(dilated_kernel_size=5, padding=2, use_implicit_gemm=False), (1, 2, 7, 7)),
    "3_1d": ("Dcls3_1d", Dcls3_1d, dict(dense_kernel_size=(2, 1), dilated_kernel_size=5, padding=1), (1, 2, 3, 3, 6)),
}


@pytest.mark.parametrize("sign", ["negative", "mixed"])
@pytest.mark.parametrize("version", ["max", "gauss"])
@pytest.mark.parametrize("layer", _LAYERS)
def test_negative_sig_matches_reference(reference, layer, version, sign):
    """The width is ``abs(SIG) + c``: with ``SIG < 0`` (where "max", starting at 0, goes in
    training) outputs and every gradient, ``SIG``'s included, equal the reference's."""
    name, cls, kw, xshape = _LAYERS[layer]
    torch.manual_seed(3)
    ref = getattr(reference, name)(2, 2, 3, version=version, **kw).double()
    ours = cls(2, 2, 3, version=version, **{k: v for k, v in kw.items() if k != "use_implicit_gemm"}).double()
    with torch.no_grad():
        ref.P.uniform_(-1.5, 1.5)
        low, high = (-0.9, -0.05) if sign == "negative" else (-0.6, 0.6)
        ref.SIG.uniform_(low, high)
        ref.SIG.masked_fill_(ref.SIG.abs() < 0.02, -0.1)  # keep away from the kink of abs at 0
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(xshape, dtype=torch.float64)
    g = None
    for module in (ref, ours):
        y = module(x)
        if g is None:
            g = torch.randn_like(y)
            y_ref = y
        y.backward(g)
    assert_close(y.detach().numpy(), y_ref.detach().numpy(), what="output")
    mine = dict(ours.named_parameters())
    for pname, p in ref.named_parameters():
        assert_close(mine[pname].grad.numpy(), p.grad.numpy(), what=f"{pname} grad")
    assert (ref.SIG.grad != 0).any()


def _inputs(interpolation, dtype=torch.float64):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2, 3, 4, dtype=dtype, generator=gen)
    p = torch.rand(2, 2, 3, 4, dtype=dtype, generator=gen) * 4 - 0.5
    s = torch.rand(2, 2, 3, 4, dtype=dtype, generator=gen) * 1.5 + 0.6 if interpolation != "bilinear" else None
    return w, p, s


_SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(("weight", "positions", "sigma"), r)]


@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("subset", _SUBSETS, ids=["+".join(s) for s in _SUBSETS])
def test_gradients_for_every_subset_requiring_them(interpolation, subset):
    """Exactly the inputs that require a gradient get one, equal to the reference's."""
    if interpolation == "bilinear" and subset == ("sigma",):
        pytest.skip("bilinear has no sigma")
    w, p, s = _inputs(interpolation)
    tensors = {"weight": w, "positions": p, "sigma": s}
    for name in subset:
        if tensors[name] is not None:
            tensors[name].requires_grad_(True)
    k = construct(w, p, (4, 3, 5), sigma=s, interpolation=interpolation, learned_dims=(0, 2))
    g = torch.randn(k.shape, dtype=k.dtype, generator=torch.Generator().manual_seed(6))
    k.backward(g)
    expected = ndcls.construct_grad(
        g.numpy(), w.detach().numpy(), p.detach().numpy(), (4, 3, 5), sigma=None if s is None else s.detach().numpy(),
        interpolation=interpolation, learned_dims=(0, 2), backend="numpy",
    )  # fmt: skip
    for name, e in zip(("weight", "positions", "sigma"), expected):
        t = tensors[name]
        if t is None:
            continue
        if name in subset:
            assert t.grad is not None, f"{name} requires grad but got none"
            assert_close(t.grad.numpy(), e, what=f"grad {name}")
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


def test_no_input_requiring_grad_gives_a_constant():
    w, p, s = _inputs("gauss")
    k = construct(w, p, (4, 3, 5), sigma=s, interpolation="gauss", learned_dims=(0, 2))
    assert not k.requires_grad
    expected = ndcls.construct(w.numpy(), p.numpy(), (4, 3, 5), sigma=s.numpy(), interpolation="gauss", learned_dims=(0, 2),
                               backend="numpy")  # fmt: skip
    assert_close(k.numpy(), expected, what="K")
