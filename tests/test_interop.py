"""Arrays in, arrays out: torch CPU tensors through DLPack, import lightness, GPU routing errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import ndcls

rng = np.random.default_rng(1)


def test_import_ndcls_imports_no_torch_cupy_or_cuda():
    code = (
        "import sys, ndcls; "
        "heavy = [m for m in ('torch', 'cupy', 'jax', 'numba.cuda', 'ndcls.kernels.cpu', 'ndcls.torch_bridge') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"import ndcls pulled in {result.stdout.strip()} {result.stderr}"


@pytest.mark.parametrize("interpolation", ndcls.INTERPOLATIONS)
def test_torch_cpu_tensors_round_trip(interpolation):
    torch = pytest.importorskip("torch")
    w = torch.randn(3, 2, 4, dtype=torch.float64)
    p = torch.rand(2, 3, 2, 4, dtype=torch.float64) * 4
    s = torch.rand(2, 3, 2, 4, dtype=torch.float64) + 0.5 if interpolation != "bilinear" else None
    kw = dict(sigma=s, interpolation=interpolation)
    k = ndcls.construct(w, p, (5, 5), **kw)
    assert isinstance(k, torch.Tensor) and k.dtype == torch.float64 and k.shape == (3, 2, 5, 5)
    expected = ndcls.construct(w.numpy(), p.numpy(), (5, 5), sigma=None if s is None else s.numpy(), interpolation=interpolation)
    np.testing.assert_array_equal(k.numpy(), expected)
    grads = ndcls.construct_grad(torch.ones_like(k), w, p, (5, 5), **kw)
    assert all(isinstance(g, torch.Tensor) for g in grads if g is not None)
    assert (grads[2] is None) == (interpolation == "bilinear")


def test_torch_inputs_are_not_copied_and_result_is_shared():
    torch = pytest.importorskip("torch")
    w = torch.randn(4, 3)
    p = (torch.rand(1, 4, 3) * 6).requires_grad_()  # fine under no_grad (test_first_run: a TypeError otherwise)
    with torch.no_grad():
        k = ndcls.construct(w, p, (7,))
    view = np.from_dlpack(k)
    assert np.shares_memory(view, k.numpy())
    # non-contiguous tensors work and agree with their contiguous copies
    wt = torch.randn(3, 4).t()
    assert not wt.is_contiguous()
    np.testing.assert_array_equal(ndcls.construct(wt, p.detach(), (7,)).numpy(), ndcls.construct(wt.contiguous(), p.detach(), (7,)).numpy())


class _FakeCudaArray:
    """An object that claims, through DLPack, to live on a CUDA device."""

    shape = (2, 3)
    dtype = np.dtype("float32")

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **kwargs):
        raise RuntimeError("no device memory behind this fake")


def test_cuda_arrays_are_routed_to_a_gpu_backend_or_fail_clearly():
    fake = _FakeCudaArray()
    with pytest.raises((ValueError, ImportError, RuntimeError)) as info:
        ndcls.construct(fake, fake, (3,))
    message = str(info.value).lower()
    assert "cupy" in message or "cuda" in message


def test_cpu_backend_refuses_cuda_arrays():
    fake = _FakeCudaArray()
    with pytest.raises(ValueError, match=r"backend 'numba' computes on host arrays, but the arrays are on cuda:0"):
        ndcls.construct(fake, fake, (3,), backend="numba")


def test_numpy_results_are_fresh_arrays_of_the_input_dtype():
    for dtype in (np.float32, np.float64):
        w = rng.standard_normal((2, 3)).astype(dtype)
        p = (rng.random((1, 2, 3)) * 4).astype(dtype)
        k = ndcls.construct(w, p, (5,))
        assert k.dtype == dtype and k.flags.c_contiguous and k.flags.writeable


def test_gpu_results_are_handed_back_inside_the_stream_context(monkeypatch):
    """For GPU arrays every step, the DLPack hand-back included, runs inside ``ctx.stream()``
    (the caller's stream and allocator); checked with a stand-in context on the CPU."""
    import contextlib
    from dataclasses import dataclass

    from ndcls import _api
    from ndcls._arrays import ArrayContext
    from ndcls._registry import _BACKENDS

    events = []

    @dataclass(frozen=True)
    class RecordingContext(ArrayContext):
        @property
        def on_gpu(self):
            return True

        @contextlib.contextmanager
        def stream(self):
            events.append("enter")
            yield
            events.append("exit")

        def from_compute(self, x, mode="native", dtype=""):
            events.append("hand-back")
            return x

    ctx = RecordingContext("numpy", ("cpu", 0))
    monkeypatch.setattr(_api, "array_context", lambda **arrays: ctx)
    monkeypatch.setattr(_api, "cupy_on_device", lambda index: None)
    ndcls.register_backend(ndcls.Backend(name="fake-gpu", device="cuda", module="ndcls.kernels.reference", dtypes=("float64",)))
    try:
        w, p = rng.standard_normal((2, 3)), rng.random((1, 2, 3)) * 4
        ndcls.construct(w, p, (5,), backend="fake-gpu")
        assert events == ["enter", "hand-back", "exit"]
        events.clear()
        ndcls.construct_grad(np.ones((2, 5)), w, p, (5,), backend="fake-gpu")
        assert events[0] == "enter" and events[-1] == "exit" and events.count("hand-back") == 3
    finally:
        _BACKENDS.pop("fake-gpu", None)
