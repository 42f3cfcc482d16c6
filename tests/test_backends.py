"""The shared backend harness: SPEC sections 3-5 as properties, every backend against the reference."""

from __future__ import annotations

import numpy as np
import pytest

import ndcls
from _cases import ADVERSARIAL, adversarial_cases, cases, check_against_reference, draw_positions, learned_row_sizes, poison
from _harness import backend_params, for_cases
from _tolerances import assert_close
from ndcls._api import _prepare

ALL = backend_params()  # the reference and every fast backend runnable here
FAST = [p for p in ALL if p.values[0] != "numpy"]

FD_STEP = 1e-6
FD_RTOL = 1e-6  # central differences in float64 with this step: error ~ step**2 + 1e-16 / step


def _kernel_axes(case):
    spec = case.spec
    return tuple(range(len(spec.batch_shape), len(spec.batch_shape) + spec.ndim))


def _learned_axes_sizes(case):
    return learned_row_sizes(case.sizes, case.learned_dims)


# -- agreement with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST)
def test_forward_and_backward_match_reference(backend):
    @for_cases(backend, cases, position_mode="around")
    def prop(case):
        expected = case.construct("numpy")
        got = case.construct(backend)
        assert_close(got, expected, what="K")
        assert type(got) is np.ndarray
        g = case.grad_kernel()
        for name, e, a in zip(("weight", "positions", "sigma"), case.construct_grad(g, "numpy"), case.construct_grad(g, backend)):
            if e is None:
                assert a is None, f"grad_{name} must be None for bilinear"
                continue
            shape = {"weight": case.weight, "positions": case.positions, "sigma": case.sigma}[name].shape
            assert a.shape == shape, f"grad_{name}: shape {a.shape}, expected the input's {shape}"
            assert_close(a, e, what=f"grad_{name}")


# -- SPEC section 3 properties, on every backend (the reference included) ---------------------------


@pytest.mark.parametrize("backend", ALL)
def test_sum_equals_weights(backend):
    @for_cases(backend, cases, position_mode="inside")
    def prop(case):
        k = case.construct(backend).astype(np.float64)
        spec = case.spec
        got = k.sum(axis=_kernel_axes(case))
        w = np.asarray(case.weight, dtype=np.float64)
        expected = w.sum(axis=tuple(range(len(spec.batch_shape), w.ndim)))
        scale = max(1.0, float(np.abs(w).sum()))
        # normalised kinds lose w * eps / (Z + eps) per element, Z >= 0.1 for these widths
        slack = 1e-5 * scale if spec.normalised else 0.0
        tol = {np.float64: 1e-11, np.float32: 2e-6}[case.dtype.type] * scale
        np.testing.assert_allclose(got, expected, rtol=0, atol=tol + slack)


@pytest.mark.parametrize("backend", ALL)
def test_linear_in_weight(backend):
    @for_cases(backend, cases, position_mode="around")
    def prop(case):
        rng = np.random.default_rng(case.seed + 7)
        w2 = rng.standard_normal(case.weight.shape).astype(case.dtype)
        a, b = 0.75, -1.5
        combined = case.construct(backend, weight=(a * case.weight + b * w2).astype(case.dtype))
        separate = a * case.construct(backend).astype(np.float64) + b * case.construct(backend, weight=w2).astype(np.float64)
        tol = {np.float64: 1e-11, np.float32: 1e-5}[case.dtype.type] * max(1.0, float(np.abs(separate).max(initial=0.0)))
        np.testing.assert_allclose(combined, separate, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", ALL)
def test_permuting_elements_leaves_kernel_unchanged(backend):
    @for_cases(backend, cases, position_mode="around")
    def prop(case):
        perm = np.random.default_rng(case.seed).permutation(case.weight.shape[-1])
        permuted = case.construct(
            backend,
            weight=case.weight[..., perm],
            positions=case.positions[..., perm],
            sigma=None if case.sigma is None else case.sigma[..., perm],
        )
        assert_close(permuted, case.construct(backend), what="permuted K")


@pytest.mark.parametrize("backend", ALL)
def test_integer_shift_shifts_kernel(backend):
    @for_cases(backend, cases, position_mode="inside", interpolations=("bilinear", "triangle"))
    def prop(case):
        rng = np.random.default_rng(case.seed)
        row = int(rng.integers(len(case.learned_dims)))
        axis = case.learned_dims[row]
        size = case.sizes[axis]
        shift = 1
        p = np.array(case.positions, dtype=np.float64)
        s = None if case.sigma is None else np.array(case.sigma, dtype=np.float64)
        if case.interpolation == "triangle":  # keep every support inside before and after the shift
            if size < 5:
                return
            s[row] = rng.uniform(0.55, 1.0, size=s[row].shape)
            p[row] = rng.uniform(s[row], size - 1 - shift - s[row])
        else:
            if size < 2:
                return
            p[row] = p[row] * (size - 1 - shift) / max(size - 1, 1)
        p = p.astype(case.dtype)
        s = None if s is None else s.astype(case.dtype)
        before = case.construct(backend, positions=p, sigma=s)
        moved = p.copy()
        moved[row] += shift
        after = case.construct(backend, positions=moved, sigma=s)
        kaxis = len(case.spec.batch_shape) + axis
        assert_close(after, np.roll(before, shift, axis=kaxis), what=f"shift along kernel axis {axis}")


@pytest.mark.parametrize("backend", ALL)
def test_bilinear_integer_positions_place_each_weight_on_one_cell(backend):
    @for_cases(backend, cases, interpolations=("bilinear",), broadcast=False, noncontiguous=False)
    def prop(case):
        rng = np.random.default_rng(case.seed)
        rows = _learned_axes_sizes(case).reshape((-1,) + (1,) * case.weight.ndim)
        p = np.floor(rng.random(case.positions.shape) * rows).astype(case.dtype)
        got = case.construct(backend, positions=p)
        spec = case.spec
        expected = np.zeros(spec.kernel_shape, dtype=np.float64)
        nb = len(spec.batch_shape)
        for index in np.ndindex(case.weight.shape):
            batch, dense, _ = index[:nb], index[nb:-1], index[-1]
            cell = [0] * spec.ndim
            for a, i in zip(spec.dense_dims, dense):
                cell[a] = i
            for j, a in enumerate(spec.learned_dims):
                cell[a] = int(p[(j, *index)])
            expected[(*batch, *cell)] += case.weight[index]
        assert_close(got, expected.astype(case.dtype), what="integer positions")


# -- SPEC section 4: gradients against central finite differences (float64) ---------------------


def _smooth_case(case):
    """Positions and widths away from the kinks of bilinear and triangle."""
    rng = np.random.default_rng(case.seed + 3)
    rows = _learned_axes_sizes(case)
    p = draw_positions(rng, case.positions.shape, rows, "smooth")
    s = case.sigma
    if case.interpolation == "triangle":  # integer + [0, 0.1): p +- s stays >= 0.05 from integers
        s = rng.integers(1, 3, size=s.shape) + 0.1 * rng.random(s.shape)
    return p, s


@pytest.mark.parametrize("backend", ALL)
def test_gradients_match_finite_differences(backend):
    @for_cases(backend, cases, dtypes=("float64",), noncontiguous=False)
    def prop(case):
        p, s = _smooth_case(case)
        w = case.weight
        g = case.grad_kernel()

        def loss(w_, p_, s_):
            return float((case.construct(backend, weight=w_, positions=p_, sigma=s_) * g).sum())

        grads = case.construct_grad(g, backend, positions=p, sigma=s)
        rng = np.random.default_rng(case.seed + 5)
        params = [("weight", w), ("positions", p)] + ([("sigma", s)] if s is not None else [])
        for i, (name, x) in enumerate(params):
            v = rng.standard_normal(x.shape)
            args_plus = [w, p, s]
            args_minus = [w, p, s]
            args_plus[i] = x + FD_STEP * v
            args_minus[i] = x - FD_STEP * v
            numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * FD_STEP)
            analytic = float((grads[i] * v).sum())
            scale = max(1.0, float(np.abs(grads[i]).sum()) * float(np.abs(v).max(initial=0.0)))
            assert abs(numeric - analytic) <= FD_RTOL * scale, f"d/d{name}: finite difference {numeric}, analytic {analytic}"


# -- SPEC section 5: non-finite and far out-of-range inputs --------------------------------------

_BAD_POSITIONS = {np.float64: [np.nan, np.inf, -np.inf, 1e30, -1e30, 1e300, -1e300], np.float32: [np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38]}
_BAD_SIGMAS = [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e-6, 1e-30, 1e4]  # 1e-30: s * s underflows in float32
_GUARD = 64


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_and_far_inputs_are_safe(backend):
    @for_cases(backend, cases, position_mode="around", noncontiguous=False, broadcast=False)
    def prop(case):
        p, s = poison(case, case.seed + 11, _BAD_POSITIONS[case.dtype.type], _BAD_SIGMAS)
        call = _prepare(case.weight, p, s, None, case.sizes, case.interpolation, case.learned_dims, backend)
        spec = call.spec
        sentinel = np.array(-12345.0, dtype=case.dtype)
        buffer = np.full(spec.n_batch * spec.block + 2 * _GUARD, sentinel, dtype=case.dtype)
        out = buffer[_GUARD : _GUARD + spec.n_batch * spec.block].reshape(spec.n_batch, spec.block)
        impl = call.backend.load()
        result = impl.construct(spec, call.weight, call.positions, call.sigma, out=out)
        np.testing.assert_array_equal(buffer[:_GUARD], sentinel, err_msg="write before K")
        np.testing.assert_array_equal(buffer[-_GUARD:], sentinel, err_msg="write after K")
        assert result is out or np.shares_memory(np.asarray(result), out) or np.array_equal(np.asarray(result), out, equal_nan=True)
        expected = case.construct("numpy", positions=p, sigma=s)
        assert_close(out.reshape(spec.kernel_shape), expected, what="K with poisoned elements")
        g = case.grad_kernel()
        for e, a in zip(case.construct_grad(g, "numpy", positions=p, sigma=s), case.construct_grad(g, backend, positions=p, sigma=s)):
            if e is not None:
                assert not np.isinf(a).any(), "gradients must be finite or NaN"
                assert_close(a, e, what="gradient with poisoned elements")


# -- standing edge cases ---------------------------------------------------------------------------

EDGES = {
    "count-1": dict(sizes=(5, 4), batch=(2,), count=1),
    "size-1": dict(sizes=(1, 3), batch=(2,), count=3),
    "all-size-1": dict(sizes=(1, 1, 1), batch=(3,), count=2),
    "empty-batch": dict(sizes=(4, 4), batch=(0, 3), count=2),
    "no-batch": dict(sizes=(6,), batch=(), count=3),
    "N4-M2": dict(sizes=(3, 2, 4, 3), batch=(2,), count=2, learned_dims=(3, 1)),
    "N5": dict(sizes=(2, 3, 2, 2, 3), batch=(1,), count=2),
}


@pytest.mark.parametrize("edge", EDGES, ids=list(EDGES))
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("backend", FAST)
def test_edge_cases_match_reference(backend, interpolation, edge):
    e = EDGES[edge]
    rng = np.random.default_rng(0)
    sizes = e["sizes"]
    learned = e.get("learned_dims", tuple(range(len(sizes))))
    dense = tuple(sizes[a] for a in range(len(sizes)) if a not in learned)
    w = rng.standard_normal((*e["batch"], *dense, e["count"]))
    p = draw_positions(rng, (len(learned), *w.shape), learned_row_sizes(sizes, learned), "around")
    s = rng.uniform(0.6, 2.0, size=p.shape) if interpolation != "bilinear" else None
    kw = dict(sigma=s, interpolation=interpolation, learned_dims=e.get("learned_dims"))
    k = ndcls.construct(w, p, sizes, backend=backend, **kw)
    assert_close(k, ndcls.construct(w, p, sizes, backend="numpy", **kw), what="K")
    g = rng.standard_normal(k.shape)
    for a, b in zip(ndcls.construct_grad(g, w, p, sizes, backend=backend, **kw), ndcls.construct_grad(g, w, p, sizes, backend="numpy", **kw)):
        if b is not None:
            assert_close(a, b, what="grad")


# -- standing adversarial cases of the normalised kinds (tests/_cases.py) --------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the simulator's scalars: inf, as on a GPU
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ADVERSARIAL)
@pytest.mark.parametrize("backend", FAST)
def test_adversarial_cases_match_reference(backend, name, dtype):
    """Elements mostly outside the kernel, tiny, subnormal and huge widths: no NaN or inf that the
    float64 reference does not have, and float32 within the float32 tolerance."""
    check_against_reference(adversarial_cases(dtype)[name], backend)


# -- launch paths of the Numba CUDA kernels (under the simulator on CPU-only machines) ---------------


def _numba_cuda_path(spec):
    from ndcls.kernels import numba_cuda

    threads, shared_tile, _ = numba_cuda.plan(spec, "forward")
    tile = "shared tile" if shared_tile else "global tile"
    return f"{tile}, {'several element chunks' if spec.n_dense * spec.count > threads else 'one element chunk'}"


def _numba_cuda_paths():
    from ndcls.kernels import numba_cuda

    chunked = numba_cuda.THREADS + 1  # more elements per dense index than threads per block
    big = 1 + int(numba_cuda.SHARED_BYTES**0.5 / 8**0.5)  # an M = 2 tile that leaves no room for the slots
    return {
        "shared tile, several element chunks": dict(max_ndim=2, max_size=4, max_batch=1, min_count=chunked, max_count=chunked + 3),
        "global tile, one element chunk": dict(min_ndim=2, max_ndim=2, min_size=big, max_size=big + 4, max_batch=1, max_count=2),
    }  # fmt: skip


@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("path", ["shared tile, several element chunks", "global tile, one element chunk"])
@pytest.mark.parametrize("backend", [p for p in FAST if p.values[0] == "numba-cuda"])
def test_numba_cuda_launch_paths_match_reference(backend, path, interpolation):
    """Drawn cases on each tiling path of the Numba CUDA kernels (the usual draws all take the
    shared tile with one chunk of elements): element chunks (gauss adds every chunk into the
    tile) and the global-memory tile of kernels too large for shared memory."""
    from hypothesis import assume, given, settings

    @settings(max_examples=2)
    @given(cases(position_mode="around", max_cells=10**6, noncontiguous=False, interpolations=(interpolation,), **_numba_cuda_paths()[path]))
    def prop(case):
        assume(case.weight.size and _numba_cuda_path(case.spec) == path)
        check_against_reference(case, backend, grad_kernels=(case.grad_kernel(),))

    prop()
