"""Per-element 1-D profile math, as plain Python on scalars and 1-D scratch arrays.

Compiled by the CPU backend with ``numba.njit``; the same source can be compiled as CUDA
device functions. Every float-to-int cast is preceded by a range check, so NaN, inf or far
out-of-range positions never produce an index.

Interpolation codes: 0 bilinear, 1 triangle, 2 gauss.
"""

import math

BILINEAR, TRIANGLE, GAUSS = 0, 1, 2
INTERPOLATION_CODES = {"bilinear": BILINEAR, "triangle": TRIANGLE, "gauss": GAUSS}


def element_valid(kind, p, s):
    """Whether an element's position (and width, for normalised kinds) along one axis is usable."""
    if not math.isfinite(p):
        return False
    if kind != BILINEAR and not (math.isfinite(s) and s > 0.0):
        return False
    return True


def support(kind, p, s, size):
    """Half-open cell range ``[lo, hi)`` outside which the profile and its derivatives are 0.

    Assumes :func:`element_valid`. The bounds are clamped to ``[0, size]`` as floats before
    the cast, so any finite ``p`` and ``s`` are safe.
    """
    if kind == BILINEAR:
        first = math.floor(p)
        last = first + 1.0
    elif kind == TRIANGLE:
        first = math.ceil(p - s)
        last = math.floor(p + s)
    else:
        return 0, size
    first = min(max(first, 0.0), float(size))
    last = min(max(last + 1.0, 0.0), float(size))
    return int(first), int(last)


def fill_profile(kind, p, s, lo, hi, a, da_dp, da_ds, with_grad):
    """Write the profile ``a[i]`` (and derivatives, if ``with_grad``) for ``i`` in ``[lo, hi)``.

    Returns ``(sum a, sum da_dp, sum da_ds)`` over the range.
    """
    total = 0.0
    total_dp = 0.0
    total_ds = 0.0
    floor_p = math.floor(p)
    for i in range(lo, hi):
        x = float(i)
        value = 0.0
        d_p = 0.0
        d_s = 0.0
        if kind == BILINEAR:
            r = p - floor_p
            if x == floor_p:
                value = 1.0 - r
                d_p = -1.0
            else:
                value = r
                d_p = 1.0
        elif kind == TRIANGLE:
            dist = abs(x - p)
            if dist < s:
                value = s - dist
                d_s = 1.0
                if x > p:
                    d_p = 1.0
                elif x < p:
                    d_p = -1.0
        else:
            u = (x - p) / s
            value = math.exp(-0.5 * u * u)
            if value > 0.0:
                d_p = value * u / s
                d_s = d_p * u
        a[i] = value
        total += value
        if with_grad:
            da_dp[i] = d_p
            da_ds[i] = d_s
            total_dp += d_p
            total_ds += d_s
    return total, total_dp, total_ds
