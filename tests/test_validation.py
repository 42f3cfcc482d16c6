"""SPEC section 5: every bad input raises a clear error naming the argument, before any kernel runs."""

from __future__ import annotations

import re

import numpy as np
import pytest

import ndcls

rng = np.random.default_rng(0)
W = rng.standard_normal((3, 4, 5))  # batch (3, 4), count 5
P = rng.uniform(0, 4, size=(2, 3, 4, 5))
S = rng.uniform(0.5, 1.5, size=(2, 3, 4, 5))
SIZES = (5, 6)


def _call(**over):
    kw = dict(weight=W, positions=P, sizes=SIZES, sigma=None, interpolation="bilinear", learned_dims=None, backend=None)
    kw.update(over)
    return ndcls.construct(kw.pop("weight"), kw.pop("positions"), kw.pop("sizes"), **kw)


def _call_grad(**over):
    kw = dict(grad_kernel=np.zeros((3, 4, 5, 6)), weight=W, positions=P, sizes=SIZES, sigma=None, interpolation="bilinear")
    kw.update(over)
    return ndcls.construct_grad(kw.pop("grad_kernel"), kw.pop("weight"), kw.pop("positions"), kw.pop("sizes"), **kw)


BAD = {
    # name: (overrides, exception, pattern the message must contain)
    "integer weight": (dict(weight=W.astype(np.int64)), TypeError, r"weight must have a floating dtype.*int64"),
    "complex weight": (dict(weight=W.astype(np.complex128)), TypeError, r"weight must have a floating dtype"),
    "big-endian weight": (dict(weight=W.astype(">f8"), positions=P.astype(">f8")), TypeError, r"native byte order"),
    "dtype mismatch": (dict(positions=P.astype(np.float32)), TypeError, r"positions must have the dtype of weight \(float64\), got float32"),
    "sigma dtype mismatch": (dict(interpolation="gauss", sigma=S.astype(np.float32)), TypeError, r"sigma must have the dtype"),
    "positions rows": (dict(positions=P[:1]), ValueError, r"positions must have shape \(M, \*batch, \*dense_sizes, count\) = \(2, 3, 4, 5\).*got \(1, 3, 4, 5\)"),
    "positions count": (dict(positions=P[..., :4]), ValueError, r"positions must have shape .*got \(2, 3, 4, 4\)"),
    "positions batch": (dict(positions=P[:, :2]), ValueError, r"positions .*batch axes may be 1.*got \(2, 2, 4, 5\)"),
    "positions ndim": (dict(positions=P[:, 0]), ValueError, r"positions must have shape"),
    "size zero": (dict(sizes=(0, 6)), ValueError, r"sizes\[0\] must be >= 1, got 0"),
    "size negative": (dict(sizes=(5, -2)), ValueError, r"sizes\[1\] must be >= 1, got -2"),
    "size float": (dict(sizes=(5.0, 6)), TypeError, r"sizes\[0\] must be an integer, got float"),
    "size bool": (dict(sizes=(True, 6)), TypeError, r"sizes\[0\] must be an integer, got bool"),
    "sizes not a sequence": (dict(sizes="ab"), TypeError, r"sizes\[0\] must be an integer, got str"),
    "too many dims": (dict(sizes=(2,) * 9), ValueError, r"between 1 and 8 entries"),
    "no dims": (dict(sizes=()), ValueError, r"between 1 and 8 entries"),
    "learned out of range": (dict(learned_dims=(0, 2)), ValueError, r"learned_dims\[1\] = 2 is out of range for N = 2"),
    "learned repeated": (dict(learned_dims=(1, -1)), ValueError, r"learned_dims must not repeat an axis, got \(1, -1\)"),
    "learned empty": (dict(learned_dims=()), ValueError, r"learned_dims must name at least one axis"),
    "learned float": (dict(learned_dims=(0.0, 1)), TypeError, r"learned_dims\[0\] must be an integer"),
    "weight missing dense axis": (dict(learned_dims=(1,), positions=P[:1]), ValueError, r"weight must have shape \(\*batch, 5, count\).*got \(3, 4, 5\)"),
    "gauss without sigma": (dict(interpolation="gauss"), ValueError, r"sigma is required for interpolation='gauss', got None"),
    "triangle without sigma": (dict(interpolation="triangle"), ValueError, r"sigma is required for interpolation='triangle'"),
    "bilinear with sigma": (dict(sigma=S), ValueError, r"sigma must be None for interpolation='bilinear'"),
    "sigma shape": (dict(interpolation="gauss", sigma=S[..., :2]), ValueError, r"sigma must have shape .*got \(2, 3, 4, 2\)"),
    "unknown interpolation": (dict(interpolation="bicubic"), ValueError, r"interpolation must be one of \('bilinear', 'triangle', 'gauss'\), got 'bicubic'"),
    "unknown backend": (dict(backend="opencl"), ValueError, r"backend must be None or one of \(.*'numpy'.*\), got 'opencl'"),
    "list instead of array": (dict(weight=W.tolist()), TypeError, r"weight: expected an array"),
    "longdouble on cpu backend": (dict(weight=W.astype(np.longdouble), positions=P.astype(np.longdouble)), TypeError, r"backend 'numba' takes dtypes \('float32', 'float64'\) \(and \('float16', 'bfloat16'\), computed in float32\), got float128"),
}


@pytest.mark.parametrize("name", BAD, ids=list(BAD))
def test_bad_input_raises_clear_error(name):
    over, exc, pattern = BAD[name]
    with pytest.raises(exc, match=pattern):
        _call(**over)


BAD_GRAD = {
    "grad shape": (dict(grad_kernel=np.zeros((3, 4, 6, 5))), ValueError, r"grad_kernel must have the kernel's shape \(3, 4, 5, 6\), got \(3, 4, 6, 5\)"),
    "grad dtype": (dict(grad_kernel=np.zeros((3, 4, 5, 6), np.float32)), TypeError, r"grad_kernel must have the dtype of weight"),
}


@pytest.mark.parametrize("name", BAD_GRAD, ids=list(BAD_GRAD))
def test_bad_gradient_input_raises_clear_error(name):
    over, exc, pattern = BAD_GRAD[name]
    with pytest.raises(exc, match=pattern):
        _call_grad(**over)


def test_mixed_array_libraries_raise_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"positions is a torch array but weight is a numpy array: mixed array libraries"):
        ndcls.construct(W, torch.from_numpy(P), SIZES)


def test_validation_happens_before_any_kernel(monkeypatch):
    """A bad call never reaches the backend module."""
    import ndcls._registry as registry

    def boom(self):
        raise AssertionError("backend loaded before validation finished")

    monkeypatch.setattr(registry.Backend, "load", boom)
    with pytest.raises(ValueError, match=re.escape("sizes[0] must be >= 1")):
        _call(sizes=(0, 6))


def test_backend_list_and_defaults():
    assert {"numpy", "numba"} <= set(ndcls.backends())
    assert ndcls.default_backend("cpu").name == "numba"
    assert ndcls.get_backend("numpy").device == "cpu"


def test_int_sizes_and_negative_learned_dims_are_normalised():
    w = rng.standard_normal((2, 3))
    p = rng.uniform(0, 6, size=(1, 2, 3))
    np.testing.assert_array_equal(ndcls.construct(w, p, 7), ndcls.construct(w, p, (7,)))
    w2 = rng.standard_normal((2, 5, 3))  # dense axis 0 of size 5, learned axis 1
    p2 = rng.uniform(0, 6, size=(1, 2, 5, 3))
    np.testing.assert_array_equal(ndcls.construct(w2, p2, (5, 7), learned_dims=-1), ndcls.construct(w2, p2, (5, 7), learned_dims=(1,)))
