"""What a new user meets first: compiled-kernel reuse, argument errors, torch tensors given to the
array API, the README's snippets."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ndcls
from ndcls.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]


def _arrays(interpolation, dtype=np.float32, batch=3):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((batch, 1, 4)).astype(dtype)
    p = (rng.random((2, batch, 1, 4)) * 5 + 0.5).astype(dtype)
    s = None if interpolation == "bilinear" else np.full_like(p, 0.8)
    return w, p, s


@pytest.mark.parametrize("interpolation", ["bilinear", "gauss"])
def test_read_only_inputs_reuse_the_compiled_kernels(interpolation):
    w, p, s = _arrays(interpolation)
    K = ndcls.construct(w, p, (7, 7), sigma=s, interpolation=interpolation)
    G = np.linspace(-1, 1, K.size, dtype=K.dtype).reshape(K.shape)
    grads = ndcls.construct_grad(G, w, p, (7, 7), sigma=s, interpolation=interpolation)
    compiled = dict(cpu._COMPILED)
    for x in (w, p, s, G):
        if x is not None:
            x.flags.writeable = False
    K_ro = ndcls.construct(w, p, (7, 7), sigma=s, interpolation=interpolation)
    grads_ro = ndcls.construct_grad(G, w, p, (7, 7), sigma=s, interpolation=interpolation)
    assert cpu._COMPILED == compiled  # nothing new compiled for read-only arrays
    np.testing.assert_array_equal(K_ro, K)
    for g, g_ro in zip(grads, grads_ro):
        if g is not None:
            np.testing.assert_array_equal(g_ro, g)


@pytest.mark.parametrize("interpolation", ["bilinear", "triangle", "gauss"])
def test_serial_and_parallel_kernels_agree(interpolation, monkeypatch):
    w, p, s = _arrays(interpolation, np.float64, batch=9)
    G = np.random.default_rng(2).standard_normal((9, 1, 7, 7))
    results = {}
    for threshold in (1 << 62, 0):  # never parallel, always parallel
        monkeypatch.setattr(cpu, "PARALLEL_MIN_WORK", threshold)
        K = ndcls.construct(w, p, (7, 7), sigma=s, interpolation=interpolation)
        grads = ndcls.construct_grad(G, w, p, (7, 7), sigma=s, interpolation=interpolation)
        results[threshold] = (K,) + tuple(g for g in grads if g is not None)
    variants = {key[1] for key in cpu._COMPILED if key[0] == "_construct"}
    if cpu.numba.get_num_threads() > 1:
        assert variants == {False, True}
    for a, b in zip(results[1 << 62], results[0]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("argument", ["weight", "positions", "grad_kernel"])
@pytest.mark.parametrize("value", [None, [[1.0, 2.0]], "abc"])
def test_non_arrays_are_a_type_error_naming_the_argument(argument, value):
    w, p, _ = _arrays("bilinear")
    args = dict(weight=w, positions=p, grad_kernel=np.zeros((3, 1, 7, 7), np.float32))
    args[argument] = value
    with pytest.raises(TypeError, match=f"^{argument}: expected an array.*got {type(value).__name__}"):
        if argument == "grad_kernel":
            ndcls.construct_grad(args["grad_kernel"], args["weight"], args["positions"], (7, 7))
        else:
            ndcls.construct(args["weight"], args["positions"], (7, 7))


def test_int_sizes_only_for_one_row_of_positions():
    w = np.ones((3, 4), np.float32)
    K = ndcls.construct(w, np.full((1, 3, 4), 2.5, np.float32), 17)  # unambiguous: a 1-D kernel
    assert K.shape == (3, 17)
    with pytest.raises(ValueError, match=r"sizes=17 is a single int.*positions has shape \(2, 3, 4\).*sizes=\(17, 17\)"):
        ndcls.construct(w, np.full((2, 3, 4), 2.5, np.float32), 17)
    with pytest.raises(ValueError, match="single int"):
        ndcls.construct_grad(np.zeros((3, 17)), w, np.full((3, 3, 4), 2.5, np.float32), np.int64(17))
    torch = pytest.importorskip("torch")
    from ndcls.torch_bridge import construct

    assert construct(torch.ones(3, 4), torch.full((1, 3, 4), 2.5), 17).shape == (3, 17)
    with pytest.raises(ValueError, match=r"single int.*sizes=\(17, 17\)"):
        construct(torch.ones(3, 4), torch.full((2, 3, 4), 2.5), 17)


def test_torch_tensors_that_require_grad_point_to_the_torch_bridge():
    torch = pytest.importorskip("torch")
    w = torch.randn(3, 4, requires_grad=True)
    p = torch.rand(1, 3, 4) * 4
    with pytest.raises(TypeError, match=r"weight requires grad.*ndcls\.torch_bridge\.construct"):
        ndcls.construct(w, p, (7,))
    with pytest.raises(TypeError, match=r"positions requires grad.*ndcls\.torch_bridge\.construct"):
        ndcls.construct_grad(torch.ones(3, 7), w.detach(), p.requires_grad_(), (7,))
    with torch.no_grad():  # no graph is expected there: allowed
        K = ndcls.construct(w, p, (7,))
    torch.testing.assert_close(K, ndcls.construct(w.detach(), p.detach(), (7,)))
    from ndcls.torch_bridge import construct

    construct(w, p, (7,)).sum().backward()  # the differentiable op still takes them
    assert w.grad is not None and p.grad is not None


def _readme_snippets():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(_readme_snippets()) >= 3


@pytest.mark.parametrize("index", range(len(_readme_snippets())))
def test_readme_snippet_runs_verbatim_on_its_own(index, tmp_path):
    code = _readme_snippets()[index]
    if "torch" in code:
        pytest.importorskip("torch")
    env = {k: v for k, v in __import__("os").environ.items()}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert res.returncode == 0, f"README snippet {index} failed:\n{code}\n{res.stderr[-3000:]}"


@pytest.mark.parametrize("ndim, interpolation", [(1, "bilinear"), (2, "gauss"), (3, "triangle")])
def test_demo_warm_up_prepares_every_kernel_the_training_uses(ndim, interpolation, monkeypatch):
    pytest.importorskip("torch")
    from ndcls import demo

    monkeypatch.setattr(cpu, "_COMPILED", {})  # as in a new process (the disk cache makes this cheap)
    config = demo.DemoConfig(ndim=ndim, interpolation=interpolation, steps=3, log_every=1)
    demo.warm_up(config)
    prepared = set(cpu._COMPILED)
    assert {key[0] for key in prepared} == {"_construct", "_construct_grad"}
    demo.run(config)
    assert set(cpu._COMPILED) == prepared  # nothing compiled after the progress bar would start


def test_demo_command_says_it_prepares_kernels_before_the_bar(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from ndcls.cli import main

    assert main(["demo", "--ndim", "1", "--steps", "5", "--candidates", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "preparing the kernels" in out.out
    assert out.out.index("preparing the kernels") < out.out.index("mean position error")
