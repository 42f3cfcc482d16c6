"""The comparison every test uses, with the per-dtype tolerances of :mod:`ndcls._tolerances`
(stated once, in the package, so that ``ndcls check`` judges by the same table).

``rtol`` and ``atol`` are relative to the largest magnitude of the expected array (at least 1),
so a sum of many terms is judged on its scale. float32/float16 results are compared with a
float64-accurate reference, so they carry the rounding of the lower precision.
"""

import numpy as np

from ndcls._tolerances import TOLERANCES as _BY_NAME

#: dtype -> dict(rtol, atol) for the dtypes NumPy has (bfloat16 is in ndcls._tolerances by name).
TOLERANCES = {np.dtype(name): tol for name, tol in _BY_NAME.items() if name != "bfloat16"}


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
