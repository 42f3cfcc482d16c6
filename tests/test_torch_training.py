"""Training helpers and torch.compile of models with DCLS layers."""

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from ndcls.torch_bridge import Dcls1d, Dcls2d, Dcls3_2d  # noqa: E402
from ndcls.torch_bridge.training import (  # noqa: E402
    SigmaSchedule,
    clamp_parameters,
    convert_reference_state_dict,
    param_groups,
    repulsion_loss,
    share_positions,
    to_conv,
)

from _tolerances import assert_close  # noqa: E402


def _stage(version="gauss"):
    return nn.Sequential(
        Dcls2d(4, 4, 3, dilated_kernel_size=5, padding=2, groups=4, version=version),
        nn.LayerNorm(6),
        Dcls2d(4, 4, 3, dilated_kernel_size=5, padding=2, groups=4, version=version),
        nn.Conv2d(4, 4, 1),
    )


def test_param_groups():
    model = _stage()
    share_positions([model[0], model[2]])
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.05)}
    assert groups["positions"]["params"] == [model[0].P]  # shared: listed once
    assert groups["positions"]["lr"] == pytest.approx(5e-3) and groups["positions"]["weight_decay"] == 0
    assert groups["sigma"]["params"] == [model[0].SIG] and groups["sigma"]["weight_decay"] == 0
    decay = {id(p) for p in groups["decay"]["params"]}
    assert decay == {id(model[0].weight), id(model[2].weight), id(model[3].weight)}
    assert groups["decay"]["weight_decay"] == 0.05
    n_listed = sum(len(g["params"]) for g in groups.values())
    assert n_listed == len(list(model.parameters()))
    torch.optim.AdamW(list(groups.values()))  # a valid optimizer configuration


def test_share_positions_trains_one_parameter():
    model = _stage()
    share_positions([model[0], model[2]])
    assert model[2].P is model[0].P and model[2].SIG is model[0].SIG
    assert model[0].weight is not model[2].weight
    model(torch.randn(1, 4, 6, 6)).sum().backward()
    assert model[0].P.grad is not None
    # a state dict written with shared positions loads into an unshared copy
    copy = _stage()
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy[2].P, model[0].P)
    with pytest.raises(ValueError, match="cannot share"):
        share_positions([model[0], Dcls2d(4, 4, 3, dilated_kernel_size=7, groups=4)])


def test_sigma_schedule():
    s = SigmaSchedule(start=5.0, end=0.23, total_steps=100, fraction=0.25)
    assert s.value(0) == pytest.approx(5.0)
    assert s.value(25) == pytest.approx(0.23) and s.value(99) == pytest.approx(0.23)
    assert s.value(10) == pytest.approx(5.0 * (0.23 / 5.0) ** 0.4)
    values = [s.value(t) for t in range(30)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    lin = SigmaSchedule(start=5.0, end=1.0, total_steps=10, fraction=0.5, mode="linear")
    assert lin.value(2) == pytest.approx(3.4)
    model = nn.Sequential(Dcls1d(2, 2, 3, dilated_kernel_size=9, version="gauss"), Dcls1d(2, 2, 3, version="v0"))
    assert s.apply(model, 10) == pytest.approx(s.value(10))
    assert torch.all(model[0].SIG == s.value(10))
    with pytest.raises(ValueError, match="mode"):
        SigmaSchedule(1.0, total_steps=10, mode="cosine")


def test_repulsion_loss():
    layer = Dcls2d(1, 1, 3, dilated_kernel_size=9, version="v0", bias=False)
    with torch.no_grad():
        layer.P.copy_(torch.tensor([[0.0, 3.0, -3.0], [0.0, 0.0, 0.0]]).view(2, 1, 1, 3))
    assert repulsion_loss(layer, radius=2.0).item() == 0.0  # all pairs 3 or 6 cells apart
    with torch.no_grad():
        layer.P[0, ..., 1] = 0.5  # elements 0 and 1 half a cell apart
    loss = repulsion_loss(layer, radius=2.0)
    assert loss.item() == pytest.approx((2.0 - 0.5) ** 2 / 3)
    loss.backward()
    g = layer.P.grad[0, 0, 0]
    assert g[0] > 0 and g[1] < 0 and g[2] == 0  # descent moves 0 and 1 apart, leaves 2 alone


@pytest.mark.parametrize("version", ["v0", "gauss"])
def test_to_conv(version):
    layer = Dcls3_2d(2, 4, 3, dense_kernel_size=2, dilated_kernel_size=(5, 4), padding=(1, 2, 1), groups=2,
                     version=version)
    x = torch.randn(1, 2, 3, 6, 6)
    conv = to_conv(layer)
    assert isinstance(conv, nn.Conv3d) and conv.weight.shape == (4, 1, 2, 5, 4)
    assert_close(conv(x).detach().numpy(), layer(x).detach().numpy())
    rounded = to_conv(layer, round_positions=True).weight.detach()
    # every element lands on one cell with its full weight: at most `count` non-zeros per kernel row
    assert ((rounded != 0).sum((-2, -1)) <= 3).all()
    assert_close(rounded.sum((-2, -1)).numpy(), layer.weight.detach().sum(-1).numpy())


def test_clamp_all_layers():
    model = _stage("v0")
    with torch.no_grad():
        model[2].P.fill_(10.0)
    clamp_parameters(model)
    assert model[2].P.max().item() == 2.0


def test_convert_square_is_identity():
    layer = Dcls2d(2, 2, 3, dilated_kernel_size=5, version="gauss")
    sd = layer.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in convert_reference_state_dict(sd, layer).items())


def test_compile_fullgraph_matches_eager():
    """One compiled model with an N-D and an N-M-D layer, three versions: forward and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Dcls2d(2, 4, 3, dilated_kernel_size=5, padding=2, version="gauss"),
        nn.GELU(),
        Dcls2d(4, 4, 2, dilated_kernel_size=(3, 4), padding="same", groups=4, version="v0"),
    )
    extra = Dcls3_2d(4, 2, 2, dense_kernel_size=1, dilated_kernel_size=3, padding=(0, 1, 1), version="max")

    def run(x):
        return extra(model(x).unsqueeze(2)).square().mean()

    x = torch.randn(2, 2, 7, 7)
    params = list(model.parameters()) + list(extra.parameters())
    loss = run(x)
    eager = torch.autograd.grad(loss, params)
    compiled = torch.compile(run, fullgraph=True)
    loss_c = compiled(x)
    grads = torch.autograd.grad(loss_c, params)
    assert_close(loss_c.detach().numpy(), loss.detach().numpy(), what="loss")
    for g, e in zip(grads, eager):
        assert_close(g.numpy(), e.numpy(), what="gradient")
