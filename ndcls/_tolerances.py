"""Tolerances per dtype, stated once: the tests and ``ndcls check`` judge every backend by them.

``rtol`` and ``atol`` are relative to the largest magnitude of the expected array (at least 1),
so a sum of many terms is judged on its scale. Results in float32 and the half-precision dtypes
are compared with a float64 reference computed from the same (rounded) inputs, so they carry
the rounding of the lower precision: float16 stores 11 significant bits, bfloat16 8.
"""

from __future__ import annotations

import numpy as np

from ndcls._spec import dtype_name

TOLERANCES = {
    "float64": dict(rtol=1e-9, atol=1e-11),
    "float32": dict(rtol=2e-5, atol=2e-6),
    "float16": dict(rtol=5e-3, atol=5e-3),
    "bfloat16": dict(rtol=4e-2, atol=4e-2),
}


def tolerance(dtype) -> dict:
    return TOLERANCES[dtype_name(dtype)]


def worst_error(actual, expected, dtype, *, scale=None) -> tuple[float, bool]:
    """``(worst |actual - expected| / allowed, NaN patterns agree)``: the first is <= 1 within tolerance.

    ``allowed`` per value is ``atol * scale + rtol * |expected|``; both arrays are read as float64.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} != {expected.shape}")
    tol = tolerance(dtype)
    same_nan = bool(np.array_equal(np.isnan(actual), np.isnan(expected)))
    finite = np.isfinite(expected)
    if scale is None:
        scale = max(1.0, float(np.abs(expected[finite]).max())) if finite.any() else 1.0
    if not finite.any():
        return 0.0, same_nan
    allowed = tol["atol"] * scale + tol["rtol"] * np.abs(expected[finite])
    err = np.abs(actual[finite] - expected[finite]) / allowed
    worst = float(np.nanmax(err)) if err.size else 0.0
    if np.isnan(err).any():
        worst = float("inf")
    return worst, same_nan
