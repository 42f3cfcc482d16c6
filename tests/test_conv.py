"""SPEC section 9: ``ndcls.conv`` / ``ndcls.conv_grad`` on every backend that has them.

Every backend agrees with the NumPy reference; the reference (and every backend) agrees with
torch's convolution of the constructed kernel; gradients agree with central differences;
poisoned positions never write outside the output; bad inputs raise before any kernel runs.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import ndcls
from _cases import poison
from _conv_cases import conv_cases
from _harness import backend_params, for_cases
from _tolerances import assert_close

ALL = backend_params("conv")
DEFAULT = None if "numba" in [p.values[0] for p in ALL] else "numpy"  # the CPU default once it has conv
FAST = [p for p in ALL if p.values[0] != "numpy"]

# conv cases run the reference over every kernel cell: fewer examples than construction cases
# keep this file within about a minute and a half on 2 cores once the kernels are compiled.
EXAMPLES = 40
FD_STEP = 1e-6
FD_RTOL = 1e-6

torch = pytest.importorskip("torch")


def _check_grads(got, expected, case, what):
    names = ("input", "weight", "positions", "sigma")
    likes = (case.input, case.weight, case.positions, case.sigma)
    for name, like, a, e in zip(names, likes, got, expected):
        if like is None:
            assert a is None and e is None, f"{what}: grad_{name} must be None for bilinear"
            continue
        assert a.shape == like.shape, f"{what}: grad_{name} shape {a.shape}, expected the input's {like.shape}"
        assert_close(a, e, what=f"{what}: grad_{name}")


@pytest.mark.parametrize("backend", FAST)
def test_conv_matches_reference(backend):
    @for_cases(backend, conv_cases, max_examples=EXAMPLES)
    def prop(case):
        out = case.conv(backend)
        assert type(out) is np.ndarray
        assert_close(out, case.conv("numpy"), what="output")
        g = case.grad_output()
        _check_grads(case.conv_grad(g, backend), case.conv_grad(g, "numpy"), case, "conv_grad")


@pytest.mark.parametrize("backend", ALL)
def test_conv_matches_torch_on_the_constructed_kernel(backend):
    """float64: output and grad_input against torch autograd, the other gradients against
    construct_grad of torch's dL/dK."""

    @for_cases(backend, conv_cases, dtypes=("float64",), max_examples=EXAMPLES // 2)
    def prop(case):
        kernel = case.kernel()
        fn = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[len(case.sizes) - 1]
        x = torch.tensor(np.array(case.input), requires_grad=True)
        k = torch.tensor(kernel, requires_grad=True)
        expected = fn(x, k, stride=case.stride, padding=case.padding, groups=case.groups)
        got = case.conv(backend)
        assert_close(got, expected.detach().numpy(), what="output vs torch")
        g = case.grad_output()
        expected.backward(torch.from_numpy(g))
        grads = case.conv_grad(g, backend)
        assert_close(grads[0], x.grad.numpy(), what="grad_input vs torch")
        through_k = ndcls.construct_grad(
            k.grad.numpy(), case.weight, case.positions, case.sizes, backend="numpy",
            sigma=case.sigma, interpolation=case.interpolation, learned_dims=case.learned_dims,
        )  # fmt: skip
        for name, a, e in zip(("weight", "positions", "sigma"), grads[1:], through_k):
            if e is not None:
                assert_close(a, e, what=f"grad_{name} vs construct_grad(torch dL/dK)")


def _smooth(case):
    """Positions and widths away from the kinks of bilinear and triangle (float64)."""
    rng = np.random.default_rng(case.seed + 3)
    rows = np.array([case.sizes[a] for a in case.learned_dims], dtype=np.float64)
    rows = rows.reshape((-1,) + (1,) * (case.positions.ndim - 1))
    cell = np.floor(rng.random(case.positions.shape) * (rows + 1)) - 1
    p = cell + 0.15 + 0.7 * rng.random(case.positions.shape)
    s = case.sigma
    if case.interpolation == "triangle":  # p +- s stays >= 0.05 away from integers
        s = rng.integers(1, 3, size=s.shape) + 0.1 * rng.random(s.shape)
    return p, s


@pytest.mark.parametrize("backend", ALL)
def test_conv_gradients_match_finite_differences(backend):
    @for_cases(backend, conv_cases, dtypes=("float64",), noncontiguous=False, max_examples=EXAMPLES // 2)
    def prop(case):
        p, s = _smooth(case)
        x, w = case.input, case.weight
        g = case.grad_output()

        def loss(x_, w_, p_, s_):
            return float((case.conv(backend, input=x_, weight=w_, positions=p_, sigma=s_) * g).sum())

        grads = case.conv_grad(g, backend, positions=p, sigma=s)
        rng = np.random.default_rng(case.seed + 5)
        params = [("input", x), ("weight", w), ("positions", p)] + ([("sigma", s)] if s is not None else [])
        for i, (name, value) in enumerate(params):
            v = rng.standard_normal(value.shape)
            plus, minus = [x, w, p, s], [x, w, p, s]
            plus[i] = value + FD_STEP * v
            minus[i] = value - FD_STEP * v
            numeric = (loss(*plus) - loss(*minus)) / (2 * FD_STEP)
            analytic = float((grads[i] * v).sum())
            scale = max(1.0, float(np.abs(grads[i]).sum()) * float(np.abs(v).max(initial=0.0)))
            assert abs(numeric - analytic) <= FD_RTOL * scale, f"d/d{name}: finite difference {numeric}, analytic {analytic}"


_BAD_POSITIONS = {np.float64: [np.nan, np.inf, -np.inf, 1e30, -1e300], np.float32: [np.nan, np.inf, -np.inf, 1e30, -3e38]}
_BAD_SIGMAS = [np.nan, np.inf, 0.0, -1.0, 1e-30, 1e4]
_GUARD = 64


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_positions_never_write_outside_the_output(backend):
    from ndcls._api import _prepare_conv

    @for_cases(backend, conv_cases, noncontiguous=False, max_examples=EXAMPLES)
    def prop(case):
        p, s = poison(case, case.seed + 11, _BAD_POSITIONS[case.dtype.type], _BAD_SIGMAS)
        options = case.kwargs(backend=backend)
        del options["sigma"]
        call = _prepare_conv("conv", case.input, case.weight, p, s, None, case.sizes, options)
        spec = call.spec
        size = math.prod(spec.output_shape)
        sentinel = np.array(-12345.0, dtype=case.dtype)
        buffer = np.full(size + 2 * _GUARD, sentinel, dtype=case.dtype)
        out = buffer[_GUARD : _GUARD + size].reshape(spec.output_shape)
        call.impl(spec, call.input, call.weight, call.positions, call.sigma, out=out)
        np.testing.assert_array_equal(buffer[:_GUARD], sentinel, err_msg="write before the output")
        np.testing.assert_array_equal(buffer[-_GUARD:], sentinel, err_msg="write after the output")
        assert_close(out, case.conv("numpy", positions=p, sigma=s), what="output with poisoned elements")
        g = case.grad_output()
        got = case.conv_grad(g, backend, positions=p, sigma=s)
        names = ("input", "weight", "positions", "sigma")
        for name, a, e in zip(names, got, case.conv_grad(g, "numpy", positions=p, sigma=s)):
            if e is not None:
                assert not np.isinf(a).any(), f"grad_{name} must be finite or NaN"
                assert_close(a, e, what=f"grad_{name} with poisoned elements")


# -- edge cases and properties -----------------------------------------------------------------------


def _simple(rng, **over):
    kw = dict(x=(2, 4, 9, 7), w=(6, 2, 3), sizes=(5, 4), groups=2)
    kw.update(over)
    x = rng.standard_normal(kw["x"])
    w = rng.standard_normal(kw["w"])
    p = rng.uniform(0, 3, size=(2, *kw["w"]))
    return x, w, p, kw["sizes"], kw["groups"]


@pytest.mark.parametrize("backend", ALL)
def test_empty_batch_and_size_one_kernel(backend):
    rng = np.random.default_rng(0)
    x, w, p, sizes, groups = _simple(rng, x=(0, 4, 9, 7))
    out = ndcls.conv(x, w, p, sizes, groups=groups, backend=backend)
    assert out.shape == (0, 6, 5, 4)
    gx, gw, gp, _ = ndcls.conv_grad(out, x, w, p, sizes, groups=groups, backend=backend)
    assert gx.shape == x.shape and not gw.any() and not gp.any()
    # a 1x1 kernel with every element at 0: a grouped 1x1 convolution by the summed weights
    x, w, p, _, groups = _simple(rng)
    p = np.zeros_like(p)
    out = ndcls.conv(x, w, p, (1, 1), groups=groups, backend=backend)
    k = torch.from_numpy(w.sum(-1)[..., None, None])
    assert_close(out, torch.nn.functional.conv2d(torch.from_numpy(x), k, groups=groups).numpy(), what="1x1")


@pytest.mark.parametrize("backend", ALL)
def test_conv_is_deterministic(backend):
    rng = np.random.default_rng(1)
    x, w, p, sizes, groups = _simple(rng)
    s = rng.uniform(0.5, 2.0, size=p.shape)
    kw = dict(sigma=s, interpolation="gauss", groups=groups, padding="same", backend=backend)
    first = ndcls.conv(x, w, p, sizes, **kw)
    np.testing.assert_array_equal(ndcls.conv(x, w, p, sizes, **kw), first)
    g = rng.standard_normal(first.shape)
    one, two = ndcls.conv_grad(g, x, w, p, sizes, **kw), ndcls.conv_grad(g, x, w, p, sizes, **kw)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_torch_tensors_in_torch_tensors_out():
    rng = np.random.default_rng(2)
    x, w, p, sizes, groups = _simple(rng)
    args = [torch.from_numpy(a) for a in (x, w, p)]
    out = ndcls.conv(*args, sizes, groups=groups, backend=DEFAULT)
    assert isinstance(out, torch.Tensor)
    assert_close(out.numpy(), ndcls.conv(x, w, p, sizes, groups=groups, backend="numpy"), what="torch output")
    grads = ndcls.conv_grad(out, *args, sizes, groups=groups, backend=DEFAULT)
    assert all(isinstance(a, torch.Tensor) for a in grads[:3]) and grads[3] is None


# -- the Gaussian cut and the cost model ---------------------------------------------------------------


@pytest.mark.parametrize("dtype, widths", [("float32", 5.8), ("float64", 8.6)])
def test_gauss_cut_is_the_rounding_of_the_peak(dtype, widths):
    r = ndcls.gauss_cut(dtype)
    assert abs(r - widths) < 0.05
    unit_roundoff = np.finfo(dtype).eps / 2
    assert math.isclose(math.exp(-0.5 * r * r), unit_roundoff, rel_tol=1e-9)
    # one cell past the cut is invisible next to the peak in this precision
    peak = np.array(1.0, dtype=dtype)
    assert peak + np.array(math.exp(-0.5 * (r + 1e-3) ** 2), dtype=dtype) == peak


def test_conv_cost_counts_taps_against_cells():
    x, w, p = np.zeros((2, 64, 8000)), np.zeros((64, 64, 3)), np.zeros((1, 64, 64, 3))
    spec = ndcls.ConvSpec.from_arguments(
        input_shape=x.shape, input_dtype=x.dtype, weight_shape=w.shape, weight_dtype=w.dtype,
        positions_shape=p.shape, positions_dtype=p.dtype, sizes=(1025,), interpolation="bilinear",
        learned_dims=None, padding="same",
    )  # fmt: skip
    cost = spec.cost()
    outputs = 2 * 8000
    assert cost["taps"] == 2 and cost["elements"] == 64 * 64 * 3
    assert cost["direct"] == outputs * 64 * 64 * 3 * 2
    assert cost["construct"] == 64 * 64 * 3 * 2 + outputs * 64 * 64 * 1025
    assert spec.out_spatial == (8000,)
    gauss = spec.cost(sigma=0.5)  # interpolation is a field of the spec: same spec, widths only matter for gauss
    assert gauss == cost


# -- validation before any kernel ----------------------------------------------------------------------

_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 4, 9, 7))
W = _rng.standard_normal((6, 2, 3))
P = _rng.uniform(0, 3, size=(2, 6, 2, 3))


def _conv(**over):
    kw = dict(input=X, weight=W, positions=P, sizes=(5, 4), groups=2)
    kw.update(over)
    return ndcls.conv(kw.pop("input"), kw.pop("weight"), kw.pop("positions"), kw.pop("sizes"), **kw)


BAD = {
    "groups do not divide in_channels": (dict(groups=3, weight=W[:, :1], positions=P[:, :, :1]), ValueError, r"in_channels \(4, input axis 1\) .* divisible by groups \(3\)"),
    "weight axis 1 wrong": (dict(groups=1), ValueError, r"weight axis 1 must be in_channels // groups = 4 // 1 = 4, got 2"),
    "spatial smaller than kernel": (dict(input=X[..., :3]), ValueError, r"input spatial axis 1 has size 3, smaller than the kernel size 4"),
    "input rank": (dict(input=X[0]), ValueError, r"input must have shape \(batch, in_channels, \*spatial\) with 2 spatial axes.*got \(4, 9, 7\)"),
    "weight rank": (dict(weight=W[None], positions=P[:, None]), ValueError, r"weight must have shape \(out_channels, in_channels // groups, \*dense_sizes, count\)"),
    "input dtype": (dict(input=X.astype(np.float32)), TypeError, r"input must have the dtype of weight \(float64\), got float32"),
    "integer input": (dict(input=X.astype(np.int32)), TypeError, r"input must have the dtype of weight"),
    "stride zero": (dict(stride=0), ValueError, r"stride\[0\] must be >= 1, got 0"),
    "stride length": (dict(stride=(1, 1, 1)), ValueError, r"stride must be an int or 2 ints"),
    "negative padding": (dict(padding=(1, -1)), ValueError, r"padding\[1\] must be >= 0, got -1"),
    "unknown padding": (dict(padding="full"), ValueError, r"padding must be an int, 2 ints, 'valid' or 'same', got 'full'"),
    "same with stride": (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1"),
    "groups zero": (dict(groups=0), ValueError, r"groups must be >= 1, got 0"),
    "positions channels": (dict(positions=P[:, :3]), ValueError, r"positions must have shape .*got \(2, 3, 2, 3\)"),
    "backend without conv": (dict(backend="cupy"), NotImplementedError, r"backend 'cupy' does not implement 'conv' yet; backends that do: \('numpy'"),
}


@pytest.mark.parametrize("name", BAD, ids=list(BAD))
def test_bad_conv_input_raises_before_any_kernel(name, monkeypatch):
    import ndcls._registry as registry

    def boom(*args, **kwargs):
        raise AssertionError("a kernel module was loaded before validation finished")

    monkeypatch.setattr(registry.Backend, "load", boom)
    monkeypatch.setattr(registry.importlib, "import_module", boom)
    if name == "backend without conv":  # every registered backend has conv now: take cupy's away
        monkeypatch.delitem(registry._OPERATIONS, ("conv", "cupy"))
    over, exc, pattern = BAD[name]
    with pytest.raises(exc, match=pattern):
        _conv(**over)


def test_bad_grad_output_and_mixed_libraries():
    with pytest.raises(ValueError, match=re.escape("grad_output must have the output's shape (2, 6, 5, 4), got (2, 6, 4, 5)")):
        ndcls.conv_grad(np.zeros((2, 6, 4, 5)), X, W, P, (5, 4), groups=2)
    with pytest.raises(TypeError, match="mixed array libraries"):
        ndcls.conv(torch.from_numpy(X), W, P, (5, 4), groups=2)


# -- large planes ----------------------------------------------------------------------------------------

#: shapes past the CPU kernel's task split (docs/conv.md, section 6): planes longer than one run
#: of CHUNK cells (several runs per plane), short planes sharing a task (batch and channel blocks
#: that cross group boundaries), strides whose output rows fall in different runs
LARGE_CASES = [
    # (input shape, sizes, learned_dims, count, groups, out_channels, stride, padding, interpolation)
    ((2, 4, 9000), (25,), (0,), 3, 2, 6, (1,), 12, "bilinear"),
    ((1, 2, 8200), (9,), (0,), 2, 1, 3, (3,), (4,), "gauss"),
    ((5, 6, 7), (5,), (0,), 2, 3, 9, (1,), 2, "bilinear"),
    ((2, 4, 70, 90), (7, 9), (0, 1), 4, 2, 4, (2, 1), (3, 5), "gauss"),
    ((1, 3, 9, 40, 50), (3, 5, 5), (1, 2), 2, 3, 3, (1, 2, 1), 1, "bilinear"),
]


@pytest.mark.parametrize("backend", [p for p in FAST if p.values[0] != "numba-cuda"])  # too large for the simulator
@pytest.mark.parametrize("shape, sizes, learned, count, groups, out_channels, stride, padding, interpolation", LARGE_CASES)
def test_large_planes_match_reference(backend, shape, sizes, learned, count, groups, out_channels, stride, padding, interpolation):
    rng = np.random.default_rng(11)
    cin = shape[1]
    dense = tuple(s for a, s in enumerate(sizes) if a not in learned)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((out_channels, cin // groups, *dense, count))
    # positions in [-size, size] along each learned axis: many elements partly or wholly outside
    row_sizes = np.array([sizes[a] for a in learned], dtype=float).reshape(-1, *[1] * (3 + len(dense)))
    p = rng.uniform(-1, 1, size=(len(learned), out_channels, cin // groups, *dense, count)) * row_sizes
    sigma = rng.uniform(0.3, 1.5, size=p.shape) if interpolation == "gauss" else None
    kw = dict(sigma=sigma, interpolation=interpolation, learned_dims=learned, stride=stride, padding=padding, groups=groups)
    out = ndcls.conv(x, w, p, sizes, backend=backend, **kw)
    assert_close(out, ndcls.conv(x, w, p, sizes, backend="numpy", **kw), what="output")
    g = rng.standard_normal(out.shape)
    got = ndcls.conv_grad(g, x, w, p, sizes, backend=backend, **kw)
    expected = ndcls.conv_grad(g, x, w, p, sizes, backend="numpy", **kw)
    for name, a, e in zip(("input", "weight", "positions", "sigma"), got, expected):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, what=f"grad_{name}")


@pytest.mark.parametrize("below", [0, 1 << 40], ids=["one-plane-per-batch-index", "interleaved"])
@pytest.mark.parametrize("case", [LARGE_CASES[0], LARGE_CASES[2], LARGE_CASES[3]], ids=["1-D", "short", "2-D"])
def test_batch_layouts_agree(case, below, monkeypatch):
    """The CPU kernels read a plane per batch index or batch-interleaved planes (cpu_conv._interleaved,
    chosen by plane length): both layouts, forced on shapes of either kind, match the reference."""
    from ndcls.kernels import cpu_conv

    shape, sizes, learned, count, groups, out_channels, stride, padding, interpolation = case
    rng = np.random.default_rng(12)
    dense = tuple(s for a, s in enumerate(sizes) if a not in learned)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((out_channels, shape[1] // groups, *dense, count)).astype(np.float32)
    top = np.array([sizes[a] for a in learned], dtype=float).reshape(-1, *[1] * (3 + len(dense)))
    p = (rng.uniform(-0.2, 1.2, size=(len(learned), out_channels, shape[1] // groups, *dense, count)) * top).astype(np.float32)
    sigma = rng.uniform(0.3, 1.5, size=p.shape).astype(np.float32) if interpolation == "gauss" else None
    kw = dict(sigma=sigma, interpolation=interpolation, learned_dims=learned, stride=stride, padding=padding, groups=groups)
    g = rng.standard_normal(ndcls.conv(x, w, p, sizes, backend="numpy", **kw).shape).astype(np.float32)
    monkeypatch.setattr(cpu_conv, "INTERLEAVE_BELOW", below)
    out = ndcls.conv(x, w, p, sizes, backend="numba", **kw)
    got = ndcls.conv_grad(g, x, w, p, sizes, backend="numba", **kw)
    assert_close(out, ndcls.conv(x, w, p, sizes, backend="numpy", **kw), what="output")
    expected = ndcls.conv_grad(g, x, w, p, sizes, backend="numpy", **kw)
    for name, a, e in zip(("input", "weight", "positions", "sigma"), got, expected):
        if e is not None:
            assert_close(a, e, what=f"grad_{name}")


def test_scratch_left_by_a_larger_call_changes_nothing():
    """The CPU backend keeps its scratch buffers between calls (cpu_conv._Scratch): a call
    after a larger one, whose data still sits in them, gives bitwise the same results."""

    def call(shape, sizes, count, pad):
        x = rng.standard_normal(shape).astype(np.float32)
        w = rng.standard_normal((shape[1], shape[1], count)).astype(np.float32)
        p = rng.uniform(0, sizes[0] - 1, size=(len(sizes), shape[1], shape[1], count)).astype(np.float32)
        kw = dict(padding=pad, backend="numba")
        out = ndcls.conv(x, w, p, sizes, **kw)
        return (out, *ndcls.conv_grad(np.ones_like(out), x, w, p, sizes, **kw))

    small = dict(shape=(2, 3, 20, 30), sizes=(5, 5), count=3, pad=2)
    rng = np.random.default_rng(5)
    first = call(**small)
    call(shape=(3, 5, 60, 70), sizes=(9, 9), count=4, pad=4)  # larger: fills the buffers with its data
    rng = np.random.default_rng(5)
    again = call(**small)
    for a, b in zip(first, again):
        if a is not None:
            np.testing.assert_array_equal(a, b)


# -- threads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [p for p in FAST if p.values[0] == "numba"])
def test_results_do_not_depend_on_threads(backend):
    """Large enough to run in parallel (above SMALL_WORK): one thread, all threads, and two
    Python threads at once (the kernels release the GIL) give identical results."""
    import threading

    import numba

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 40, 40)).astype(np.float32)
    w = rng.standard_normal((8, 4, 5)).astype(np.float32)
    p = rng.uniform(0, 8, size=(2, 8, 4, 5)).astype(np.float32)
    s = rng.uniform(0.5, 2, size=p.shape).astype(np.float32)
    kw = dict(sigma=s, interpolation="gauss", groups=2, padding="same", backend=backend)
    g = rng.standard_normal((2, 8, 40, 40)).astype(np.float32)

    def run():
        return (ndcls.conv(x, w, p, (9, 9), **kw), *ndcls.conv_grad(g, x, w, p, (9, 9), **kw))

    threads = numba.get_num_threads()
    reference = run()
    numba.set_num_threads(1)
    try:
        single = run()
    finally:
        numba.set_num_threads(threads)
    assert numba.get_num_threads() == threads
    results = [None, None]

    def worker(k):
        results[k] = run()

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for other in (single, *results):
        for a, b in zip(other, reference):
            np.testing.assert_array_equal(a, b)


def _taps_call(w, p, s):
    """conv and conv_grad of one small gauss layer on the numba backend, with the given element arrays."""
    x = np.random.default_rng(3).standard_normal((2, 4, 30))
    kw = dict(sigma=s, interpolation="gauss", padding=4, backend="numba")
    out = ndcls.conv(x, w, p, (9,), **kw)
    return (out, *ndcls.conv_grad(np.cos(out), x, w, p, (9,), **kw))


def _assert_bitwise(a, b):
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            np.testing.assert_array_equal(u.view(np.uint64), v.view(np.uint64))


def test_taps_memo_reuses_only_bitwise_equal_elements():
    """The CPU backend keeps the taps of recent calls (cpu_conv._TapsMemo): conv_grad after conv
    reuses them, and a call whose weight, positions or sigma differ in any bit (an in-place
    update of the same array, a -0.0 for a 0.0) builds its own: every result is bitwise what a
    call with no memo gives."""
    from ndcls.kernels import cpu_conv

    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 4, 3))
    w[0, 0, 0] = 0.0
    p = rng.uniform(0, 8, size=(1, 4, 4, 3))
    s = rng.uniform(0.3, 2.0, size=(1, 4, 4, 3))

    def fresh(*arrays):
        cpu_conv._MEMO.clear()
        return _taps_call(*arrays)

    cpu_conv._MEMO.clear()
    first = _taps_call(w, p, s)
    assert len(cpu_conv._MEMO.entries) == 1  # conv built the taps, conv_grad found them
    _assert_bitwise(first, fresh(w, p, s))
    for change in (
        lambda: w.__setitem__((0, 0, 0), -0.0),  # -0.0 == 0.0, but not bitwise
        lambda: p.__setitem__((0, 1, 2, 0), p[0, 1, 2, 0] + 0.5),  # in place: same array object
        lambda: s.__setitem__((0, 3, 3, 2), s[0, 3, 3, 2] * 2.0),
    ):
        change()
        got = _taps_call(w, p, s)
        _assert_bitwise(got, fresh(w, p, s))
    other = s[..., ::-1].copy()  # another sigma of the same shape
    _assert_bitwise(_taps_call(w, p, other), fresh(w, p, other))


def test_taps_memo_recovers_from_an_oversized_call_and_recycles_per_kernel(monkeypatch):
    """A call too large for MEMO_BYTES is not kept, and keeps nothing: the next layers are
    memoized again (a backward after its forward builds no taps). A new entry that would not
    fit takes the buffers of the oldest entry of its own kernel (the same layer, earlier step),
    as entries or as bytes."""
    from ndcls.kernels import cpu_conv

    rng = np.random.default_rng(10)
    w, p, s = rng.standard_normal((4, 4, 3)), rng.uniform(0, 8, size=(1, 4, 4, 3)), np.full((1, 4, 4, 3), 0.7)
    cpu_conv._MEMO.clear()
    _taps_call(w, p, s)
    small = cpu_conv._MEMO.nbytes
    monkeypatch.setattr(cpu_conv, "MEMO_BYTES", 4 * small)
    cpu_conv._MEMO.clear()
    big = (rng.standard_normal((4, 4, 200)), rng.uniform(0, 8, size=(1, 4, 4, 200)), np.full((1, 4, 4, 200), 0.7))
    _taps_call(*big)  # larger than MEMO_BYTES
    assert cpu_conv._MEMO.entries == [] and cpu_conv._MEMO.nbytes == 0
    builds = []
    build = cpu_conv._Taps
    monkeypatch.setattr(cpu_conv, "_Taps", lambda *a, **k: builds.append(1) or build(*a, **k))
    _taps_call(w + 1, p, s)
    assert len(builds) == 1  # conv built the taps, conv_grad reused them
    monkeypatch.setattr(cpu_conv, "MEMO_ENTRIES", 2)
    cpu_conv._MEMO.clear()
    _taps_call(w, p, s)
    oldest = cpu_conv._MEMO.entries[0][5]
    other = rng.standard_normal((4, 4, 4)), rng.uniform(0, 8, size=(1, 4, 4, 4)), np.full((1, 4, 4, 4), 0.7)
    _taps_call(*other)  # another kernel (count 4): the memo is full now
    _taps_call(w + 2, p, s)  # the same kernel as the oldest entry: its buffers are taken
    assert [e[5] is oldest for e in cpu_conv._MEMO.entries] == [True, False]
    assert cpu_conv._MEMO.nbytes <= cpu_conv.MEMO_BYTES
    monkeypatch.setattr(cpu_conv, "MEMO_ENTRIES", 8)  # now bytes: 3 entries of one layer fit, a 4th does not
    monkeypatch.setattr(cpu_conv, "MEMO_BYTES", 3 * small + small // 2)
    cpu_conv._MEMO.clear()
    x = np.random.default_rng(3).standard_normal((2, 4, 30))
    for step in range(3):  # forwards only (inference): no entry is spent
        ndcls.conv(x, w + 3 + step, p, (9,), sigma=s, interpolation="gauss", padding=4, backend="numba")
    oldest = cpu_conv._MEMO.entries[-1][5]
    _taps_call(w + 10, p, s)
    assert len(cpu_conv._MEMO.entries) == 3 and cpu_conv._MEMO.entries[0][5] is oldest
    cpu_conv._MEMO.clear()


def test_taps_memo_gives_a_spent_entry_to_the_next_step():
    """Training: once conv_grad has used an entry (spent), the next new entry of its kernel (the
    next step's parameters) takes its buffers, so the memo faults in fresh pages for one entry
    per layer; entries of other kernels and unspent ones stay, and a spent entry still serves a
    call with its own parameters until then."""
    from ndcls.kernels import cpu_conv

    rng = np.random.default_rng(13)
    w, p, s = rng.standard_normal((4, 4, 3)), rng.uniform(0, 8, size=(1, 4, 4, 3)), np.full((1, 4, 4, 3), 0.7)
    other = rng.standard_normal((4, 4, 4)), rng.uniform(0, 8, size=(1, 4, 4, 4)), np.full((1, 4, 4, 4), 0.7)
    cpu_conv._MEMO.clear()
    _taps_call(*other)  # another layer (count 4), spent too
    _taps_call(w, p, s)
    first = cpu_conv._MEMO.entries[0]
    assert first[4].spent
    builds = []
    build = cpu_conv._Taps
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_conv, "_Taps", lambda *a, **k: builds.append(1) or build(*a, **k))
        _taps_call(w, p, s)  # the same parameters again (gradient accumulation): reused
        assert builds == []
        for step in range(1, 4):
            _taps_call(w + step, p, s)
            assert len(cpu_conv._MEMO.entries) == 2 and cpu_conv._MEMO.entries[0][5] is first[5]
    assert len(builds) == 3
    cpu_conv._MEMO.clear()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "shape",
    [
        dict(batch=2, out=16, cin=16, groups=1, spatial=(14,), sizes=(7,), learned=None, dense=(), count=3, stride=1),
        dict(batch=1, out=32, cin=32, groups=2, spatial=(9, 10), sizes=(5, 4), learned=None, dense=(), count=6, stride=2),
        dict(batch=2, out=16, cin=16, groups=1, spatial=(6, 7, 5), sizes=(3, 4, 3), learned=(0, 2), dense=(4,), count=4, stride=1),
    ],
)
def test_shared_positions_as_matrix_products_match_reference(shape, dtype):
    """Positions and sigma broadcast over both channel axes, channels enough, overlapping
    Gaussians: the CPU runs the taps as matrix products over channels (cpu_conv._SharedTaps);
    output and every gradient match the reference, an invalid element's included."""
    from ndcls.kernels import cpu_conv

    rng = np.random.default_rng(21)
    m = len(shape["sizes"]) if shape["learned"] is None else len(shape["learned"])
    x = rng.standard_normal((shape["batch"], shape["cin"], *shape["spatial"])).astype(dtype)
    w = rng.standard_normal((shape["out"], shape["cin"] // shape["groups"], *shape["dense"], shape["count"])).astype(dtype)
    learned = range(len(shape["sizes"])) if shape["learned"] is None else shape["learned"]
    top = np.array([shape["sizes"][a] for a in learned], dtype=np.float64).reshape(m, 1, 1, *[1] * len(shape["dense"]), 1)
    p = (rng.uniform(0, 1, size=(m, 1, 1, *shape["dense"], shape["count"])) * (top - 1)).astype(dtype)
    p.reshape(-1)[0] = np.nan
    s = rng.uniform(0.8, 2.0, size=p.shape).astype(dtype)
    kw = dict(sigma=s, interpolation="gauss", groups=shape["groups"], stride=shape["stride"],
              padding=[k // 2 for k in shape["sizes"]], learned_dims=shape["learned"])
    spec = ndcls.ConvSpec.from_arguments(
        input_shape=x.shape, input_dtype=x.dtype, weight_shape=w.shape, weight_dtype=w.dtype, positions_shape=p.shape,
        positions_dtype=p.dtype, sigma_shape=s.shape, sigma_dtype=s.dtype, sizes=shape["sizes"], interpolation="gauss",
        learned_dims=shape["learned"], stride=shape["stride"], padding=kw["padding"], groups=shape["groups"])
    canonical = [a.reshape(a.shape[0], a.shape[1], a.shape[2], -1, a.shape[-1]) for a in (p, s)]
    w_canonical = w.reshape(w.shape[0], w.shape[1], -1, w.shape[-1])
    assert cpu_conv._shared_taps(spec, cpu_conv._Grid(spec), w_canonical, *canonical) is not None  # the route is taken
    out = ndcls.conv(x, w, p, shape["sizes"], backend="numba", **kw)
    assert_close(out, ndcls.conv(x, w, p, shape["sizes"], backend="numpy", **kw), what="output")
    gy = rng.standard_normal(out.shape).astype(dtype)
    got = ndcls.conv_grad(gy, x, w, p, shape["sizes"], backend="numba", **kw)
    expected = ndcls.conv_grad(gy, x, w, p, shape["sizes"], backend="numpy", **kw)
    for name, a, e in zip(("input", "weight", "positions", "sigma"), got, expected):
        assert_close(a, e, what=f"grad_{name}")


def test_taps_memo_is_bounded_and_per_thread(monkeypatch):
    """At most MEMO_ENTRIES entries and MEMO_BYTES bytes; another thread has its own memo."""
    import threading

    from ndcls.kernels import cpu_conv

    rng = np.random.default_rng(9)
    cpu_conv._MEMO.clear()
    w, p, s = rng.standard_normal((4, 4, 3)), rng.uniform(0, 8, size=(1, 4, 4, 3)), np.full((1, 4, 4, 3), 0.7)
    x = np.random.default_rng(3).standard_normal((2, 4, 30))
    for step in range(cpu_conv.MEMO_ENTRIES + 3):  # forwards only: no entry is spent, none gives way early
        ndcls.conv(x, w + step, p, (9,), sigma=s, interpolation="gauss", padding=4, backend="numba")
    assert len(cpu_conv._MEMO.entries) == cpu_conv.MEMO_ENTRIES
    seen = []
    thread = threading.Thread(target=lambda: seen.append(len(cpu_conv._MEMO.entries)))
    thread.start()
    thread.join()
    assert seen == [0]
    one = cpu_conv._MEMO.entries[0][5].nbytes
    monkeypatch.setattr(cpu_conv, "MEMO_BYTES", 2 * one)
    _taps_call(w - 1, p, s)
    assert len(cpu_conv._MEMO.entries) == 2
    monkeypatch.setattr(cpu_conv, "MEMO_BYTES", one - 1)  # an entry too large is not kept
    cpu_conv._MEMO.clear()
    _taps_call(w, p, s)
    assert cpu_conv._MEMO.entries == []
    cpu_conv._MEMO.clear()


@pytest.mark.parametrize("backend", FAST)
def test_elements_whose_profile_underflows_contribute_nothing(backend, monkeypatch):
    """Elements whose every cell value is 0 (a triangle exactly one width outside the kernel or
    with its support between cells; a Gaussian ~39 widths away) are empty: no tap of theirs may
    add anything, whatever memory their tap slots were given (poisoned here: a plausible cell,
    a NaN value)."""
    from ndcls.kernels import cpu_conv

    monkeypatch.setattr(cpu_conv, "_uninitialised", lambda buffers, role, shape, dtype: np.full(shape, 1 if dtype == np.int64 else np.nan, dtype))
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 12))
    for interpolation, p_row, s_row in (
        ("triangle", [-1.0, 0.5, 2.3, 5.0], [1.0, 0.5, 0.7, 1.0]),
        ("gauss", [-39.0 * 0.1 - 0.0, 2.3, 4.0 + 39.0 * 0.1, 1.0], [0.1, 0.7, 0.1, 0.3]),
    ):
        w = rng.standard_normal((3, 1, 4))
        p = np.broadcast_to(np.array(p_row), (1, 3, 1, 4)).copy()
        s = np.broadcast_to(np.array(s_row), (1, 3, 1, 4)).copy()
        kw = dict(sigma=s, interpolation=interpolation, groups=3, padding=2)
        for _ in range(3):  # fresh scratch each call: garbage would differ between calls
            cpu_conv._MEMO.clear()  # (else the taps of the first call are reused)
            got = ndcls.conv(x, w, p, (5,), backend=backend, **kw)
            assert_close(got, ndcls.conv(x, w, p, (5,), backend="numpy", **kw), what=f"{interpolation} output")
        g = rng.standard_normal(got.shape)
        expected = ndcls.conv_grad(g, x, w, p, (5,), backend="numpy", **kw)
        for name, a, e in zip(("input", "weight", "positions", "sigma"), ndcls.conv_grad(g, x, w, p, (5,), backend=backend, **kw), expected):
            assert_close(a, e, what=f"{interpolation} grad_{name}")


def test_half_precision_layers_take_the_construct_route():
    from ndcls.torch_bridge import Dcls1d

    layer = Dcls1d(16, 16, 2, dilated_kernel_size=1025, padding=512, version="v0")
    x = torch.randn(1, 16, 4000)
    assert layer.route(x) == "direct"  # the shape favours the direct route (2 taps against 1025 cells) ...
    layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    assert layer.route(x) == "construct"  # ... but its rates are float32 rates: half precision goes to construct
    assert layer(x).dtype == torch.bfloat16
    method = Dcls1d(16, 16, 2, dilated_kernel_size=1025, padding=512, version="v0", method="direct").to(torch.bfloat16)
    method.load_state_dict(layer.state_dict())
    _close_half(method(x).double().detach().numpy(), layer(x).double().detach().numpy(), "bfloat16", "direct bf16")


def _close_half(actual, expected, dtype, what):
    from ndcls._tolerances import worst_error

    worst, same_nan = worst_error(actual, expected, dtype)
    assert same_nan and worst <= 1.0, f"{what}: {worst:.3g} x the {dtype} tolerance"


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_computes_in_float32(backend, dtype):
    """Half-precision arrays (torch tensors for bfloat16, which NumPy lacks) go through float32
    and come back rounded to their dtype: equal, within the dtype's tolerance, to the float64
    reference on the same rounded inputs. Mixed dtypes are refused."""
    rng = np.random.default_rng(5)
    x, w, p, sizes, groups = _simple(rng)
    s = rng.uniform(0.5, 2.0, size=p.shape)
    g = rng.standard_normal((x.shape[0], w.shape[0], *x.shape[2:]))
    half = getattr(torch, dtype)
    args = [torch.from_numpy(a).to(half) for a in (x, w, p, s, g)]
    rounded = [a.double().numpy() for a in args]
    kw = dict(interpolation="gauss", groups=groups, padding="same")
    out = ndcls.conv(*args[:3], sizes, sigma=args[3], backend=backend, **kw)
    assert out.dtype == half
    want = ndcls.conv(*rounded[:3], sizes, sigma=rounded[3], backend="numpy", **kw)
    _close_half(out.double().numpy(), want, dtype, f"{dtype} output")
    grads = ndcls.conv_grad(args[4], *args[:3], sizes, sigma=args[3], backend=backend, **kw)
    wants = ndcls.conv_grad(rounded[4], *rounded[:3], sizes, sigma=rounded[3], backend="numpy", **kw)
    for name, a, e in zip(("input", "weight", "positions", "sigma"), grads, wants):
        assert a.dtype == half
        _close_half(a.double().numpy(), e, dtype, f"{dtype} grad_{name}")
    with pytest.raises(TypeError, match=f"input must have the dtype of weight \\({dtype}\\), got float32"):
        ndcls.conv(args[0].float(), *args[1:3], sizes, sigma=args[3], backend=backend, **kw)


# -- Gaussian rows computed a block at a time (cpu._gauss_rows) -----------------------------------------


def _mixed_gauss_rows(rng, shape):
    """Positions and widths of Gaussian rows along an axis of 9 cells: mostly regular, with every
    kind of row the block path leaves to the scalar one (invalid, too wide, far outside)."""
    p = rng.uniform(-1.0, 9.0, size=shape)
    s = rng.uniform(0.3, 0.8, size=shape)
    flat_p, flat_s = p.reshape(-1), s.reshape(-1)
    odd = [
        (np.nan, 0.5), (np.inf, 0.5), (3.0, np.nan), (3.0, 0.0), (3.0, -1.0), (3.0, 1e-150), (4.2, 3.0), (4.2, 1e5),
        (-35.0 * 0.5, 0.5), (9.0 + 38.0 * 0.5, 0.5), (-45.0 * 0.5, 0.5), (4.0 + 1e-9, 1e-3), (0.0, 0.5), (8.0, 0.5),
    ]
    picks = rng.choice(flat_p.size, size=len(odd), replace=False)
    for at, (pv, sv) in zip(picks, odd):
        flat_p[at], flat_s[at] = pv, sv
    return p, s


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "shape, sizes, learned",
    [((2, 10, 30), (9,), (0,)), ((2, 5, 14, 14), (9, 9), (0, 1)), ((1, 6, 12, 13), (5, 9), (1,))],
    ids=["1-D", "2-D", "2-1-D"],
)
def test_gaussian_rows_in_blocks_match_reference(shape, sizes, learned, dtype):
    """The numba backend computes Gaussian rows ROW_BLOCK elements at a time (cpu._gauss_rows)
    and leaves irregular rows to the scalar path: element counts that are not a multiple of the
    block, and rows of every irregular kind among regular ones, match the reference."""
    rng = np.random.default_rng(21)
    out_channels, cin, count = 7, shape[1], 3
    dense = tuple(n for a, n in enumerate(sizes) if a not in learned)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((out_channels, cin, *dense, count)).astype(dtype)
    p, s = _mixed_gauss_rows(rng, (len(learned), out_channels, cin, *dense, count))
    p, s = p.astype(dtype), s.astype(dtype)
    kw = dict(sigma=s, interpolation="gauss", learned_dims=learned, padding="same")
    out = ndcls.conv(x, w, p, sizes, backend="numba", **kw)
    assert_close(out, ndcls.conv(x, w, p, sizes, backend="numpy", **kw), what="output")
    g = rng.standard_normal(out.shape).astype(dtype)
    got = ndcls.conv_grad(g, x, w, p, sizes, backend="numba", **kw)
    expected = ndcls.conv_grad(g, x, w, p, sizes, backend="numpy", **kw)
    for name, a, e in zip(("input", "weight", "positions", "sigma"), got, expected):
        assert_close(a, e, what=f"grad_{name}")


def test_gaussian_rows_in_blocks_are_the_scalar_profiles():
    """Row by row, cpu._gauss_rows gives what cpu._profiles gives (support, normalised profile,
    centred derivatives, sums) wherever it calls a row regular, and it calls regular every
    valid row of at most ROW_WIDEST cells whose peak is within ROW_GAP widths of the kernel."""
    from numba import njit

    from ndcls._spec import gauss_cut
    from ndcls.kernels import cpu

    B, fields = cpu.ROW_BLOCK, cpu.ROW_FIELDS

    @njit
    def both(p, s, size, radius):
        n_el = p.shape[1]
        rows = np.zeros((n_el // B + 1, fields * B))
        scalar = np.zeros((n_el, 3, size))
        sums = np.zeros((n_el, 3))
        bounds = np.zeros((n_el, 3), np.int64)
        sizes = np.array([size], np.int64)
        for blk in range(0, n_el, B):
            cpu._gauss_rows(p, s, 0, blk, min(B, n_el - blk), size, radius, True, rows[blk // B])
        a, dp, ds = np.zeros((1, size)), np.zeros((1, size)), np.zeros((1, size))
        sc, lo, hi = np.zeros((3, 1)), np.zeros(1, np.int64), np.zeros(1, np.int64)
        for e in range(n_el):
            a[:] = 0.0
            dp[:] = 0.0
            ds[:] = 0.0
            status, _ = cpu._profiles(2, True, p, s, e, 0, 0, sizes, a, dp, ds, sc, lo, hi, True, radius)
            bounds[e, 0], bounds[e, 1], bounds[e, 2] = status, lo[0], hi[0]
            scalar[e, 0], scalar[e, 1], scalar[e, 2] = a[0], dp[0], ds[0]
            sums[e, 0], sums[e, 1], sums[e, 2] = sc[0, 0], sc[1, 0], sc[2, 0]
        return rows, scalar, sums, bounds

    rng = np.random.default_rng(5)
    size = 9
    p, s = _mixed_gauss_rows(rng, (1, 150, 1, 1))
    radius = gauss_cut(np.float32)
    rows, scalar, sums, bounds = both(p, s, size, radius)
    n_regular = 0
    for e in range(p.shape[1]):
        r = rows[e // B].reshape(fields, B)[:, e % B]
        width = int(r[cpu._WIDTH])
        pe, se = p[0, e, 0, 0], s[0, e, 0, 0]
        status, lo, hi = bounds[e]
        valid = np.isfinite(pe) and np.isfinite(se) and se >= 1e-140
        gap = abs(pe - np.floor(np.clip(pe, 0, size - 1) + 0.5)) if valid else np.inf
        expect_regular = valid and gap <= cpu.ROW_GAP * se and 1 <= hi - lo <= cpu.ROW_WIDEST
        assert (width > 0) == expect_regular, (e, pe, se, width, lo, hi)
        if not width:
            continue
        n_regular += 1
        assert status == 2 and (int(r[cpu._LO]), int(r[cpu._LO]) + width) == (lo, hi)
        for field, q in ((cpu._A, 0), (cpu._DA_DP, 1), (cpu._DA_DS, 2)):
            np.testing.assert_allclose(r[field : field + width], scalar[e, q, lo:hi], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(r[cpu._SUM : cpu._SUM + 3], sums[e], rtol=1e-13, atol=1e-15)
    assert n_regular >= 100


@pytest.mark.parametrize("interpolation", ["bilinear", "gauss"])
def test_taps_sharing_cells_are_merged(interpolation, monkeypatch):
    """Where a channel pair's elements share cells, the numba backend gathers and correlates
    each distinct cell once (cpu_conv._Taps._merge) and hands each tap its cell's dL/dK: the
    results match the reference, merged or not."""
    from ndcls.kernels import cpu_conv

    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 4, 11, 12))
    w = rng.standard_normal((4, 1, 12))
    p = rng.uniform(0.0, 4.0, size=(2, 4, 1, 12))  # 12 elements in a 5 x 5 kernel: many shared cells
    s = rng.uniform(0.3, 0.6, size=p.shape) if interpolation == "gauss" else None
    kw = dict(sigma=s, interpolation=interpolation, groups=4, padding="same")
    g = rng.standard_normal((2, 4, 11, 12))
    expected = [ndcls.conv(x, w, p, (5, 5), backend="numpy", **kw), *ndcls.conv_grad(g, x, w, p, (5, 5), backend="numpy", **kw)]
    for below in (cpu_conv.MERGE_BELOW, 0.0):
        monkeypatch.setattr(cpu_conv, "MERGE_BELOW", below)
        cpu_conv._MEMO.clear()
        got = [ndcls.conv(x, w, p, (5, 5), backend="numba", **kw), *ndcls.conv_grad(g, x, w, p, (5, 5), backend="numba", **kw)]
        taps = cpu_conv._MEMO.entries[0][4]
        assert (taps.cell_of_tap is not None) == (below > 0), "merged exactly where MERGE_BELOW allows"
        if below:
            assert len(taps.values) < 0.9 * len(taps.value)
        for name, a, e in zip(("output", "input", "weight", "positions", "sigma"), got, expected):
            if e is not None:
                assert_close(a, e, what=f"{interpolation} {name} (MERGE_BELOW {below})")


def test_lane_exp_is_within_its_stated_accuracy():
    """cpu._exp, the branch-free exp of the Gaussian rows, is within 6e-16 of NumPy's exp
    (relative) over its range [-700, 0], and clamps outside it."""
    from numba import njit

    from ndcls.kernels import cpu

    @njit
    def lane_exp(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = cpu._exp(x[i])
        return out

    rng = np.random.default_rng(17)
    x = np.concatenate([-rng.random(500_000) * 700.0, -rng.random(500_000) * 2.0, [0.0, -0.0, -700.0, -1e-300]])
    got, expected = lane_exp(x), np.exp(x)
    assert np.max(np.abs(got - expected) / expected) < 6e-16
    np.testing.assert_array_equal(lane_exp(np.array([-800.0, 3.0])), lane_exp(np.array([-700.0, 0.0])))
