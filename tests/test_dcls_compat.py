"""Client code of the reference implementation runs unchanged on ndcls (SPEC section 7).

The reference package (``dcls``, import ``DCLS``) is imported here under its real name, for
comparisons; ndcls stands in for it only inside :func:`_shim` (removed again afterwards, so no
other test sees it) and in subprocesses started with ``python -m ndcls.torch_bridge.as_dcls``.
"""

import copy
import importlib
import inspect
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import ndcls.torch_bridge as tb  # noqa: E402
from ndcls.torch_bridge import modules as ours  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIENT = Path(__file__).parent / "clients" / "delays_and_stages.py"
#: the reference's public classes (dcls 0.1.1)
REFERENCE_CLASSES = ("Dcls1d", "Dcls2d", "Dcls3d", "Dcls3_1d", "Dcls2dK1d", "_DclsNd", "_DclsN_Md",
                     "ConstructKernel1d", "ConstructKernel2d", "ConstructKernel3d", "ConstructKernel3_1d")


def _reference():
    return pytest.importorskip("DCLS.construct.modules")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@contextmanager
def _shim():
    tb.install_as_dcls(force=True)
    try:
        yield
    finally:
        tb.uninstall_as_dcls()


def test_client_code_runs_unchanged_and_equals_the_reference(tmp_path):
    _reference()
    ckpt, ref_out, our_out = tmp_path / "init.pt", tmp_path / "ref.pt", tmp_path / "ours.pt"
    runs = [
        [sys.executable, str(CLIENT), str(ckpt), str(ref_out)],  # the reference; saves the checkpoint
        [sys.executable, "-m", "ndcls.torch_bridge.as_dcls", str(CLIENT), str(ckpt), str(our_out)],  # loads it
    ]
    for cmd in runs:
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    ref, got = torch.load(ref_out), torch.load(our_out)
    assert set(got) == set(ref)
    assert got["meta"].all()
    for key in ref:
        assert got[key].dtype == ref[key].dtype == (torch.bool if key == "meta" else torch.float64), key
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-12, msg=key)
    # the evaluation switch changed the result (the test would not see a switch that does nothing)
    assert (ref["eval/out"] - ref["restored/out"]).abs().max() > 1e-3


def test_module_form_runs_a_module_with_ndcls_as_dcls(tmp_path):
    (tmp_path / "client_mod.py").write_text(
        "import sys\nfrom DCLS.construct.modules import Dcls1d\nprint(Dcls1d.__module__, sys.argv[1:])\n"
    )
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "ndcls.torch_bridge.as_dcls", "-m", "client_mod", "a", "--b"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ndcls.torch_bridge.layers", "['a',", "'--b']"]


def test_install_and_uninstall_leave_the_real_package_in_place():
    real = _reference()
    before = {n: sys.modules.get(n) for n in ("DCLS", "DCLS.construct", "DCLS.construct.modules")}
    with pytest.raises(RuntimeError, match="already imported"):
        tb.install_as_dcls()
    with _shim():
        tb.install_as_dcls()  # a second call does nothing
        from DCLS.construct.modules import ConstructKernel1d, Dcls1d, _DclsNd  # noqa: F401

        assert Dcls1d is ours.Dcls1d and _DclsNd is ours._DclsNd
        assert importlib.import_module("DCLS.construct.modules") is ours
        assert importlib.util.find_spec("DCLS") is not None
        import DCLS

        assert DCLS.construct.modules is ours
    assert {n: sys.modules.get(n) for n in before} == before
    assert importlib.import_module("DCLS.construct.modules") is real


@pytest.mark.parametrize("name", REFERENCE_CLASSES)
def test_reference_names_and_signatures(name):
    ref_cls, our_cls = getattr(_reference(), name), getattr(ours, name)
    if name.startswith("_"):
        return  # base classes: the layers' isinstance relations are checked below
    ref_params = inspect.signature(ref_cls.__init__).parameters
    our_params = inspect.signature(our_cls.__init__).parameters
    # the reference's parameters, in its order and with its defaults; ndcls adds only `method` after them
    assert list(our_params)[: len(ref_params)] == list(ref_params)
    assert [p.default for p in our_params.values()][: len(ref_params)] == [p.default for p in ref_params.values()]
    assert list(our_params)[len(ref_params):] in ([], ["method"])
    ref_fwd, our_fwd = inspect.signature(ref_cls.forward).parameters, inspect.signature(our_cls.forward).parameters
    assert list(our_fwd)[: len(ref_fwd)] == list(ref_fwd)


LAYER_ARGS = {
    "Dcls1d": dict(dilated_kernel_size=5, padding=2),
    "Dcls2d": dict(dilated_kernel_size=5, padding=2, groups=2),
    "Dcls3d": dict(dilated_kernel_size=3, padding=1, stride=2),
    "Dcls3_1d": dict(dense_kernel_size=3, dilated_kernel_size=5, padding=(1, 1, 2)),
    "Dcls2dK1d": dict(dilated_kernel_size=5, padding=(2, 0), flat_dim=0),
}


@pytest.mark.parametrize("name", sorted(LAYER_ARGS))
def test_layers_expose_the_references_attributes(name, caplog):
    ref_mod = _reference()
    ref = getattr(ref_mod, name)(2, 4, 3, version="gauss", **LAYER_ARGS[name])
    got = getattr(ours, name)(2, 4, 3, version="gauss", **LAYER_ARGS[name])
    public = [k for k in vars(ref) if not k.startswith("_") and k not in ("training", "cond")]
    assert {k: getattr(got, k) for k in public if not isinstance(getattr(ref, k), torch.nn.Module)} == {
        k: getattr(ref, k) for k in public if not isinstance(getattr(ref, k), torch.nn.Module)
    }
    assert type(got.DCK).__name__ == type(ref.DCK).__name__
    for attr in ("version", "out_channels", "in_channels", "groups", "kernel_count", "dilated_kernel_size"):
        assert getattr(got.DCK, attr) == getattr(ref.DCK, attr), attr
    base = "_DclsN_Md" if name == "Dcls3_1d" else "_DclsNd"
    assert isinstance(ref, getattr(ref_mod, base)) and isinstance(got, getattr(ours, base))
    assert got.state_dict().keys() == ref.state_dict().keys()
    assert [n for n, _ in got.named_modules()] == [n for n, _ in ref.named_modules()]


@pytest.mark.parametrize("name", ["Dcls2d", "Dcls3d"])
@pytest.mark.parametrize("switch", ["layer", "DCK"])
def test_version_switch_equals_the_reference(name, switch, caplog):
    ref_mod = _reference()
    torch.manual_seed(0)
    ref = getattr(ref_mod, name)(2, 2, 3, version="gauss", **LAYER_ARGS[name]).double()
    got = getattr(ours, name)(2, 2, 3, version="gauss", **LAYER_ARGS[name]).double()
    got.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 2, *([7] * (3 if name == "Dcls3d" else 2)), dtype=torch.float64)
    for version in ("max", "v1", "v0", "gauss"):
        ref.DCK.version = version  # what the reference's forward reads
        target = got.DCK if switch == "DCK" else got
        target.version = version
        assert got.version == got.DCK.version == version
        torch.testing.assert_close(got(x), ref(x), rtol=1e-10, atol=1e-12, msg=version)


def test_version_switch_moves_rows_and_centres_of_a_non_square_kernel():
    layer = ours.Dcls2d(1, 1, 1, dilated_kernel_size=(3, 6), version="gauss")
    assert layer.row_axes == (1, 0) and layer.position_limits == ((-3, 2), (-1, 1))
    with torch.no_grad():
        layer.P.zero_()
    centre = layer.kernel_positions().flatten().tolist()
    layer.DCK.version = "v0"
    assert layer.version == "v0" and layer.row_axes == (0, 1) and layer.position_limits == ((-1, 1), (-3, 2))
    assert layer.kernel_positions().flatten().tolist() == centre[::-1]  # (row 0, row 1) = (axis 0, axis 1)
    K = layer.construct_kernel()[0, 0]
    assert K[1, 3] == layer.weight.flatten()[0] and K.count_nonzero() == 1


def test_a_version_with_widths_needs_sig():
    layer = ours.Dcls1d(1, 1, 2, dilated_kernel_size=5, version="v1")
    layer.DCK.version = "max"
    with pytest.raises(ValueError, match="SIG"):
        layer(torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match="version must be one of"):
        layer.version = "bogus"
    assert layer.version == "max"


def test_deepcopy_and_shared_positions_follow_the_switch():
    a = ours.Dcls1d(2, 2, 3, dilated_kernel_size=7, padding=3, version="gauss")
    b = ours.Dcls1d(2, 2, 3, dilated_kernel_size=7, padding=3, version="gauss")
    b.weight, b.bias, b.P, b.SIG = a.weight, a.bias, a.P, a.SIG
    c = copy.deepcopy(a)
    c.DCK.version = "max"
    assert a.version == "gauss" and c.version == "max" and c.DCK is not a.DCK
    x = torch.randn(1, 2, 9)
    before = b(x)
    with torch.no_grad():
        a.P.add_(0.7).round_()
        a.SIG *= 0.5
        a.clamp_parameters()
    assert b.P is a.P
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    assert not torch.allclose(b(x), before)


def test_integer_positions_are_accepted_as_the_reference_accepts_them():
    ref_mod = _reference()
    ref = ref_mod.Dcls3_1d(2, 2, 2, dense_kernel_size=1, dilated_kernel_size=3, padding=(0, 0, 1), version="v1")
    got = ours.Dcls3_1d(2, 2, 2, dense_kernel_size=1, dilated_kernel_size=3, padding=(0, 0, 1), version="v1")
    got.load_state_dict(ref.state_dict())
    for layer in (ref, got):  # fixed integer delays, as a public spiking ResNet sets them
        layer.P.requires_grad = False
        layer.P.data = torch.tensor([-1, 1, 0, 1, 1, -1, 0, 0]).view(layer.P.shape)
    x = torch.randn(1, 2, 3, 3, 6)
    assert got.construct_kernel().dtype == got.weight.dtype
    torch.testing.assert_close(got(x), ref(x), rtol=1e-6, atol=1e-6)
