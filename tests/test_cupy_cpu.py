"""CPU-only checks of the "cupy" backend: its CUDA kernels run by host emulation against the
reference, its launch arithmetic, and its errors on machines without CuPy or a GPU.

The emulation (tests/_cuda_emulator.py) compiles the backend's own CUDA source with g++; it
checks the kernels' logic (indices, guards, tiling and fallback, gather and reductions) and
their float16 loads and stores (the PTX conversions are emulated bit for bit), not CUDA's
memory model, which needs a GPU (tests/test_cupy_gpu.py).
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings

import _cuda_emulator as emu
import ndcls
from _cases import ADVERSARIAL, adversarial_cases, cases, check_against_reference, draw_positions, learned_row_sizes, poison
from _harness import registered
from _tolerances import assert_close
from conftest import HAS_GPU
from ndcls._api import _prepare
from ndcls.kernels import cupy_backend as cb

EMULATED = "cupy-emulated"
needs_gxx = pytest.mark.skipif(emu.compiler() is None, reason="needs g++ for the host emulation")


@pytest.fixture(scope="module")
def emulated():
    with registered(EMULATED):
        yield EMULATED


def _compare(case, backend, **over):
    assert_close(case.construct(backend, **over), case.construct("numpy", **over), what="K")
    g = case.grad_kernel()
    for name, a, e in zip(("weight", "positions", "sigma"), case.construct_grad(g, backend, **over), case.construct_grad(g, "numpy", **over)):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, what=f"grad_{name}")


# -- the kernels, emulated on the CPU ------------------------------------------------------------


@needs_gxx
@pytest.mark.cuda_compile
def test_emulated_kernels_match_reference(emulated):
    @settings(max_examples=40)
    @given(cases(position_mode="around", max_count=3))
    def prop(case):
        _compare(case, emulated)

    prop()


@needs_gxx
@pytest.mark.cuda_compile
def test_emulated_kernels_with_poisoned_elements(emulated):
    bad_p = [np.nan, np.inf, -np.inf, 1e30, -1e30]
    bad_s = [np.nan, np.inf, -np.inf, 0.0, -1.0, 1e-6, 1e4]

    @settings(max_examples=25)
    @given(cases(position_mode="around", max_count=3, broadcast=False, noncontiguous=False))
    def prop(case):
        p, s = poison(case, case.seed, bad_p, bad_s)
        # no write outside K: K is a window of a larger buffer filled with a sentinel
        call = _prepare(case.weight, p, s, None, case.sizes, case.interpolation, case.learned_dims, emulated)
        spec, guard = call.spec, 32
        buffer = np.full(spec.n_batch * spec.block + 2 * guard, -7.0, dtype=case.dtype)
        out = buffer[guard : guard + spec.n_batch * spec.block].reshape(spec.n_batch, spec.block)
        emu.construct(spec, call.weight, call.positions, call.sigma, out=out)
        assert (buffer[:guard] == -7.0).all() and (buffer[-guard:] == -7.0).all()
        _compare(case, emulated, positions=p, sigma=s)

    prop()


@needs_gxx
@pytest.mark.cuda_compile
def test_emulated_kernels_with_64bit_indices(emulated, monkeypatch):
    monkeypatch.setattr(cb, "index_is_64bit", lambda spec: True)

    @settings(max_examples=10)
    @given(cases(position_mode="around", max_count=2))
    def prop(case):
        assert cb.specialisation(case.spec).int64
        _compare(case, emulated)

    prop()


@needs_gxx
@pytest.mark.cuda_compile
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_emulated_kernels_on_adversarial_cases(emulated, name, dtype):
    """The standing adversarial cases of tests/_cases.py; float32 kernels compute in float32 here."""
    check_against_reference(adversarial_cases(dtype)[name], emulated)


# Launch shapes that the emulated device (emu.LIMITS) puts on distinct code paths.
PATHS = {
    "tile of batch kernels": dict(sizes=(5, 4), batch=(6,), count=3, learned=None),
    "one kernel, opt-in shared memory": dict(sizes=(24, 30), batch=(2,), count=2, learned=None),
    "chunked fallback": dict(sizes=(40, 50), batch=(2,), count=3, learned=None),
    "chunked fallback, dense axis pruning": dict(sizes=(30, 45), batch=(2,), count=2, learned=(1,)),
    "fewer groups, long axes": dict(sizes=(60, 70), batch=(1,), count=2, learned=None),
    "N4 M2": dict(sizes=(3, 4, 5, 6), batch=(2,), count=2, learned=(3, 1)),
}


@needs_gxx
@pytest.mark.cuda_compile
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("path", list(PATHS))
def test_emulated_launch_paths(emulated, path, interpolation):
    e = PATHS[path]
    rng = np.random.default_rng(1)
    sizes, learned = e["sizes"], e["learned"] or tuple(range(len(e["sizes"])))
    dense = tuple(sizes[a] for a in range(len(sizes)) if a not in learned)
    w = rng.standard_normal((*e["batch"], *dense, e["count"]))
    p = draw_positions(rng, (len(learned), *w.shape), learned_row_sizes(sizes, learned), "around")
    s = rng.uniform(0.6, 3.0, size=p.shape) if interpolation != "bilinear" else None
    kw = dict(sigma=s, interpolation=interpolation, learned_dims=e["learned"])
    spec = _prepare(w, p, s, None, sizes, interpolation, e["learned"], "numpy").spec
    launch = cb.forward_launch(spec, emu.LIMITS, threads=emu.THREADS)
    if "chunked" in path:
        assert launch.span < spec.block
    elif "tile" in path:
        assert launch.span >= 2 * spec.block
    elif "opt-in" in path:
        assert launch.span == spec.block and launch.shared > emu.LIMITS.shared_default
    if "fewer groups" in path:  # long rows: fewer groups per block; bilinear keeps 2x2 lanes
        back = cb.backward_launch(spec, emu.LIMITS, threads=emu.THREADS)
        assert back.group == 4 if interpolation == "bilinear" else back.threads < emu.THREADS
    k = ndcls.construct(w, p, sizes, backend=emulated, **kw)
    assert_close(k, ndcls.construct(w, p, sizes, backend="numpy", **kw), what="K")
    g = rng.standard_normal(k.shape)
    got = ndcls.construct_grad(g, w, p, sizes, backend=emulated, **kw)
    for a, b in zip(got, ndcls.construct_grad(g, w, p, sizes, backend="numpy", **kw)):
        if b is not None:
            assert_close(a, b, what="grad")
    again = ndcls.construct_grad(g, w, p, sizes, backend=emulated, **kw)
    for a, b in zip(got, again):  # the gather is deterministic
        if b is not None:
            np.testing.assert_array_equal(a, b)


def forward_path(spec):
    """Which code path the emulated device's forward launch takes for ``spec``."""
    launch = cb.forward_launch(spec, emu.LIMITS, threads=emu.THREADS)
    if launch.span < spec.block:
        return "chunked fallback"
    if launch.span >= 2 * spec.block:
        return "tile of batch kernels"
    return "one kernel, opt-in shared memory" if launch.shared > emu.LIMITS.shared_default else "one kernel"


# Drawn shapes per forward path on the emulated device (4 KiB of shared memory, 8 KiB opting
# in); the long axes of the last two also put the backward on whole-warp groups, whose
# emulation is slow (a barrier of 32 OS threads per shuffle): few examples there.
_BIG = dict(min_ndim=2, max_ndim=2, max_batch=1, max_count=2, dtypes=("float64",), max_examples=2)
DRAWN_PATHS = {
    "tile of batch kernels": dict(max_ndim=2, max_size=4, max_batch=5, allow_empty=False),
    "one kernel": dict(max_ndim=3, max_size=6),
    "one kernel, opt-in shared memory": dict(min_size=23, max_size=31, **_BIG),
    "chunked fallback": dict(min_size=33, max_size=40, **_BIG),
}


@needs_gxx
@pytest.mark.cuda_compile
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("path", list(DRAWN_PATHS))
def test_emulated_kernels_on_every_launch_path(emulated, path, interpolation):
    """The harness's random cases, drawn in shapes that reach each launch path of the kernels."""
    shapes = dict(DRAWN_PATHS[path], interpolations=(interpolation,))
    examples = shapes.pop("max_examples", 4)

    @settings(max_examples=examples)
    @given(cases(**{"position_mode": "around", "max_count": 3, "max_cells": 10**6, "noncontiguous": False, **shapes}))
    def prop(case):
        assume(case.weight.size and forward_path(case.spec) == path)
        _compare(case, emulated)

    prop()


# -- launch arithmetic for real devices ------------------------------------------------------------

H100 = cb.DeviceLimits(n_sm=132, shared_default=48 * 1024, shared_optin=227 * 1024, capability=(9, 0))


def _spec(sizes, batch, count, dtype="float32", interpolation="gauss", learned=None):
    rows = tuple(range(len(sizes))) if learned is None else learned
    w_shape = (*batch, *(sizes[a] for a in range(len(sizes)) if a not in rows), count)
    p_shape = (len(rows), *w_shape)
    normalised = interpolation != "bilinear"
    return ndcls.KernelSpec.from_arguments(
        weight_shape=w_shape,
        weight_dtype=dtype,
        positions_shape=p_shape,
        positions_dtype=dtype,
        sigma_shape=p_shape if normalised else None,
        sigma_dtype=dtype if normalised else None,
        sizes=sizes,
        interpolation=interpolation,
        learned_dims=learned,
    )


def test_forward_launch_tiles_whole_batch_kernels():
    spec = _spec((23, 23), (256, 64), 26)
    launch = cb.forward_launch(spec, H100)
    assert launch.span % spec.block == 0 and launch.span > spec.block
    assert launch.shared <= H100.shared_default
    assert launch.grid * launch.span >= spec.n_batch * spec.block
    assert launch.grid >= H100.n_sm


def test_forward_launch_falls_back_to_chunks_for_huge_kernels():
    spec = _spec((64, 64, 32), (2,), 4, dtype="float64")
    launch = cb.forward_launch(spec, H100)
    assert launch.span < spec.block and launch.shared <= H100.shared_optin
    assert launch.grid == -(-spec.n_batch * spec.block // launch.span)


def test_group_width_follows_the_support():
    assert cb.forward_launch(_spec((7,), (4,), 3, interpolation="bilinear"), H100).group == 2
    assert cb.forward_launch(_spec((7, 7), (4,), 3, interpolation="bilinear"), H100).group == 4
    assert cb.forward_launch(_spec((7, 7), (4,), 3), H100).group == 32
    assert cb.forward_launch(_spec((1, 1), (4,), 3), H100).group == 1


def test_too_long_learned_axes_raise_a_clear_error():
    spec = _spec((20000,), (1,), 1, dtype="float64")
    with pytest.raises(ValueError, match=r"learned sizes \(20000,\).*numba-cuda"):
        cb.backward_launch(spec, H100)


def test_index_width():
    assert not cb.index_is_64bit(_spec((23, 23), (256, 64), 26))
    assert cb.index_is_64bit(_spec((64, 64, 64), (64, 64), 2))  # K over 2**30 cells
    assert cb.index_is_64bit(_spec((3,), (1024, 1024), 1100))  # positions over 2**30 values, K small


def test_layout_matches_spec():
    spec = _spec((3, 4, 5, 6), (2,), 2, learned=(3, 1))
    layout = cb.layout_value(spec.sizes, spec.learned_dims, False)
    assert layout.dtype.itemsize == 4 * (4 * ndcls.MAX_DIMS + 1)
    assert layout["sizes"].dtype == np.int32
    m = spec.n_learned
    assert tuple(layout["sizes"][:m]) == spec.learned_sizes == (6, 4)
    assert tuple(layout["strides"][:m]) == spec.learned_strides == (1, 30)
    assert tuple(layout["dense_sizes"][:2]) == (3, 5) and tuple(layout["dense_strides"][:2]) == (120, 6)
    assert layout["n_dense_axes"] == 2 and not layout["sizes"][m:].any()
    assert cb.layout_value(spec.sizes, spec.learned_dims, True)["sizes"].dtype == np.int64
    assert f"#define NDCLS_MAX_DIMS {ndcls.MAX_DIMS}" in cb.kernel_source()


def test_launch_arguments_need_no_device_table():
    """Graph-safe launches: every kernel argument is an array of the call or a value."""
    import inspect

    source = inspect.getsource(cb)
    assert "synchronize" not in source and "cupy.asarray(host" not in source
    assert "const Layout<I> layout" in cb.kernel_source()


def test_narrow_groups_stay_narrow_when_scratch_is_short():
    """ConvNeXt bilinear backward: 4 lanes per element (2x2 cells), not 32-lane groups."""
    spec = _spec((17, 17), (768, 1), 34, interpolation="bilinear")
    launch = cb.backward_launch(spec, H100)
    assert launch.group == 4 and launch.threads % 32 == 0 and launch.threads >= 128
    assert cb._profile_length(spec) == 4  # 2 cells per learned axis
    long_rows = _spec((400, 400), (8,), 3, interpolation="bilinear", dtype="float64")
    assert cb.backward_launch(long_rows, H100).group == 4
    wide = _spec((60, 70), (1,), 2, dtype="float64")  # triangle/gauss scratch spans the axes
    launch = cb.backward_launch(wide, H100)
    assert launch.shared <= H100.shared_default // 2 + 3 * 130 * 8 and launch.threads % launch.group == 0


# -- registration and errors without CuPy or a GPU -------------------------------------------------


def test_registered_with_half_precision():
    backend = ndcls.get_backend("cupy")
    assert backend.device == "cuda" and backend.module == "ndcls.kernels.cupy_backend"
    assert backend.supports("float16") and backend.supports("float32") and backend.supports("float64")
    assert ndcls.default_backend("cuda") is backend


def test_missing_cupy_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    w, p = np.ones((2, 3)), np.ones((2, 2, 3))
    with pytest.raises(ImportError, match=r"pip install 'ndcls\[cuda\]'"):
        ndcls.construct(w, p, (5, 5), backend="cupy")


class _FakeCudaArray:
    """Speaks DLPack and says it lives on cuda:0; cannot actually be exported."""

    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.dtype(np.float32)

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA

    def __dlpack__(self, *args, **kwargs):
        raise BufferError("this fake array has no memory")


def test_fake_cuda_dlpack_array_gives_a_clear_error():
    if HAS_GPU:
        pytest.skip("a CUDA device is present: the fake array would reach its __dlpack__")
    w, p = _FakeCudaArray((2, 3)), _FakeCudaArray((2, 2, 3))
    with pytest.raises((RuntimeError, ImportError), match=r"cuda:0|ndcls\[cuda\]"):
        ndcls.construct(w, p, (5, 5))


def test_host_arrays_without_gpu_give_a_clear_error():
    if HAS_GPU:
        pytest.skip("a CUDA device is present")
    pytest.importorskip("cupy")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        ndcls.construct(np.ones((2, 3)), np.ones((2, 2, 3)), (5, 5), backend="cupy")


def test_importing_ndcls_does_not_import_cupy():
    import os
    import subprocess

    code = "import sys, ndcls, ndcls.kernels.cupy_backend; print('cupy' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


# -- bfloat16 kernels, emulated ------------------------------------------------------------------


def _to_bf16_bits(x):
    """float -> bfloat16 bits (int16), round to nearest even (NumPy has no bfloat16)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.view(np.int16)


def _from_bf16_bits(bits):
    return (np.asarray(bits).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def test_bf16_bit_helpers_round_to_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-9, 1 + 3 * 2**-8, -3.0, np.inf, np.nan], dtype=np.float32)
    back = _from_bf16_bits(_to_bf16_bits(x))
    # bfloat16 steps by 2**-7 above 1: 1 + 2**-8 ties to even (1), 1 + 3 * 2**-8 ties to even (1 + 2**-6)
    np.testing.assert_array_equal(back[:6], [1.0, 1.0, 1 + 2**-7, 1 + 2**-6, -3.0, np.inf])
    assert np.isnan(back[6])


# -- float16 (native in the kernels: float32 arithmetic, float16 loads and stores) ----------------


@needs_gxx
@pytest.mark.cuda_compile
@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
@pytest.mark.parametrize("path", ["tile of batch kernels", "chunked fallback", "N4 M2"])
def test_emulated_bfloat16_kernels_match_reference(path, interpolation):
    """bfloat16 loads, float32 arithmetic and round-to-nearest-even stores, against float64 on
    the same rounded inputs."""
    from dataclasses import replace

    from ndcls._tolerances import worst_error

    e = PATHS[path]
    rng = np.random.default_rng(3)
    sizes, learned = e["sizes"], e["learned"] or tuple(range(len(e["sizes"])))
    dense = tuple(sizes[a] for a in range(len(sizes)) if a not in learned)
    w = rng.standard_normal((*e["batch"], *dense, e["count"]))
    p = draw_positions(rng, (len(learned), *w.shape), learned_row_sizes(sizes, learned), "around")
    s = rng.uniform(0.6, 3.0, size=p.shape) if interpolation != "bilinear" else None
    p[0, ..., 0] = np.nan  # an invalid element: NaN gradients, nothing in K
    bits = [None if x is None else _to_bf16_bits(x) for x in (w, p, s)]
    w64, p64, s64 = (None if b is None else _from_bf16_bits(b).astype(np.float64) for b in bits)
    call = _prepare(w64, p64, s64, None, sizes, interpolation, e["learned"], "numpy")
    spec = replace(call.spec, dtype=np.dtype(np.int16), storage="bfloat16")
    assert cb.specialisation(spec).dtype == "bfloat16"
    flat = [None if b is None else b.reshape(x.shape) for b, x in zip(bits, (call.weight, call.positions, call.positions))]
    k_bits = emu.construct(spec, flat[0], flat[1], flat[2])
    k_ref = ndcls.construct(w64, p64, sizes, sigma=s64, interpolation=interpolation, learned_dims=e["learned"], backend="numpy")
    k = _from_bf16_bits(k_bits).reshape(k_ref.shape)
    worst, same_nan = worst_error(k, k_ref, "bfloat16")
    assert same_nan and worst <= 1, f"K: worst error {worst:.2f} of the bfloat16 tolerance"
    g = _from_bf16_bits(_to_bf16_bits(rng.standard_normal(k_ref.shape))).astype(np.float64)
    grads = emu.construct_grad(spec, _to_bf16_bits(g).reshape(spec.n_batch, spec.block), *flat)
    expected = ndcls.construct_grad(g, w64, p64, sizes, sigma=s64, interpolation=interpolation, learned_dims=e["learned"], backend="numpy")
    for name, got, want in zip(("weight", "positions", "sigma"), grads, expected):
        if want is None:
            assert got is None
            continue
        got = _from_bf16_bits(got).reshape(want.shape)
        worst, same_nan = worst_error(got, want, "bfloat16")
        assert same_nan, f"grad_{name}: NaN pattern differs"
        assert worst <= 1, f"grad_{name}: worst error {worst:.2f} of the bfloat16 tolerance"


@needs_gxx
@pytest.mark.cuda_compile
def test_emulated_float16_stores_round_to_nearest_even(emulated):
    """Bilinear weights at integer positions: K sums float16 weights exactly in float32, and the
    float16 store rounds that sum once. It must round to nearest, ties to even (PTX cvt.rn), as
    NumPy does; truncation (cvt.rz) differs on most of these sums."""
    k = np.arange(-7, 8)
    w1 = np.where(k < 0, -1.0, 1.0)
    w2 = k * 2.0**-12  # 1 + k/4096: 0, 1/4, 1/2 (a tie) and 3/4 of a float16 spacing past 1
    w1 = np.concatenate([w1, [60000.0, -60000.0, 1000.0]])  # 68000 rounds to inf; 1000.4 to 1000.5
    w2 = np.concatenate([w2, [8000.0, -8000.0, 0.4375]])
    weight = np.stack([w1, w2], axis=-1).astype(np.float16)  # (batch, count 2), both on cell 1
    positions = np.ones((1, *weight.shape), dtype=np.float16)
    got = ndcls.construct(weight, positions, (3,), backend=emulated)
    exact = weight.astype(np.float64).sum(axis=-1)
    with np.errstate(over="ignore"):
        expected = exact.astype(np.float16)  # correctly rounded, ties to even (68000: inf)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got[:, 1], expected)
    np.testing.assert_array_equal(got[:, [0, 2]], 0)
    truncated = np.where(np.abs(expected.astype(np.float64)) > np.abs(exact),
                         np.nextafter(expected, np.float16(0)), expected)  # fmt: skip
    truncated = np.where(np.isinf(expected), np.copysign(np.float16(65504), exact), truncated)
    assert (truncated != expected).sum() >= 5  # the test tells the two modes apart


def test_emulated_float16_conversions_match_numpy():
    """emu::narrow<5, 10, rn> and emu::widen<5, 10> are IEEE binary16, bit for bit (NumPy's)."""
    if emu.compiler() is None:
        pytest.skip("needs g++ for the host emulation")
    lib = emu.conversion_library()
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(4000).astype(np.float32) * np.float32(2.0) ** rng.integers(-30, 20, 4000),
        np.float32([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 1e-8, 6e-8, 5.96e-8, 2.0**-25, 3 * 2.0**-26]),
    ]).astype(np.float32)  # fmt: skip
    bits = np.empty(x.shape, dtype=np.uint16)
    lib.narrow_f16_rn(x.ctypes.data_as(ctypes.c_void_p), bits.ctypes.data_as(ctypes.c_void_p), ctypes.c_long(x.size))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(bits, x.astype(np.float16).view(np.uint16))
    back = np.empty(x.shape, dtype=np.float32)
    lib.widen_f16(bits.ctypes.data_as(ctypes.c_void_p), back.ctypes.data_as(ctypes.c_void_p), ctypes.c_long(x.size))
    np.testing.assert_array_equal(back, bits.view(np.float16).astype(np.float32))


@needs_gxx
@pytest.mark.cuda_compile
def test_emulated_bfloat16_stores_round_to_nearest_even():
    """Two bfloat16 weights on one cell: their float32 sum is exact, so the stored K is exactly
    that sum rounded to nearest even (truncation or ties away would differ for some pairs)."""
    rng = np.random.default_rng(5)
    w = _to_bf16_bits(rng.standard_normal((256, 2)) * np.array([1.0, 2**-5]))
    p = np.zeros((1, 256, 1, 2), dtype=np.float64)
    call = _prepare(_from_bf16_bits(w).astype(np.float64), p.reshape(1, 256, 2), None, None, (3,), "bilinear", None, "numpy")
    from dataclasses import replace

    spec = replace(call.spec, dtype=np.dtype(np.int16), storage="bfloat16")
    k = emu.construct(spec, w.reshape(256, 1, 2), _to_bf16_bits(p), None)
    exact = _from_bf16_bits(w).sum(axis=1, dtype=np.float32)
    np.testing.assert_array_equal(k[:, 0].view(np.uint16), _to_bf16_bits(exact).view(np.uint16))
    assert (_to_bf16_bits(exact) != (exact.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)).any()
    assert (k[:, 1:] == 0).all()


@needs_gxx
@pytest.mark.cuda_compile
def test_emulated_float16_kernels_match_reference(emulated):
    """float16 inputs, float32 arithmetic: the reference on the same values (exactly upcast)."""

    @settings(max_examples=15)
    @given(cases(position_mode="around", max_count=3, dtypes=("float16",)))
    def prop(case):
        up = dict(weight=case.weight.astype(np.float32), positions=case.positions.astype(np.float32),
                  sigma=None if case.sigma is None else case.sigma.astype(np.float32))  # fmt: skip
        assert_close(case.construct(emulated), case.construct("numpy", **up).astype(np.float16), what="K")
        g = case.grad_kernel()
        got = case.construct_grad(g, emulated)
        expected = case.construct_grad(g.astype(np.float32), "numpy", **up)
        for name, a, e in zip(("weight", "positions", "sigma"), got, expected):
            if e is not None:
                assert_close(a, e.astype(np.float16), what=f"grad_{name}")

    prop()
