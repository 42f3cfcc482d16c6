"""Tolerances per dtype, stated once, and the comparison every test uses.

``rtol`` and ``atol`` are relative to the largest magnitude of the expected array (at least 1),
so a sum of many terms is judged on its scale. float32/float16 results are compared with a
float64-accurate reference, so they carry the rounding of the lower precision.
"""

import numpy as np

TOLERANCES = {
    np.dtype("float64"): dict(rtol=1e-9, atol=1e-11),
    np.dtype("float32"): dict(rtol=2e-5, atol=2e-6),
    np.dtype("float16"): dict(rtol=5e-3, atol=5e-3),
}


def assert_close(actual, expected, dtype=None, *, scale=None, what=""):
    """Same shape, dtype and values (NaN where expected is NaN) within the dtype's tolerance."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = np.dtype(dtype if dtype is not None else expected.dtype)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    tol = TOLERANCES[dtype]
    finite = np.isfinite(expected)
    if scale is None:
        scale = max(1.0, float(np.abs(expected[finite]).max())) if finite.any() else 1.0
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern differs")
    np.testing.assert_allclose(
        actual[finite].astype(np.float64),
        expected[finite].astype(np.float64),
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        err_msg=what,
    )
