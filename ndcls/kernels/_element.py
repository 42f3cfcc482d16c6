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

    Assumes :func:`element_valid`. Compiled, ``math.floor``/``math.ceil`` return integers, so
    their arguments are clamped to ``[-2, size + 1]`` first: any finite ``p`` and ``s`` are safe.
    """
    if kind == BILINEAR:
        first = float(math.floor(min(max(p, -2.0), size + 1.0)))
        last = first + 1.0
    elif kind == TRIANGLE:
        first = float(math.ceil(min(max(p - s, -2.0), size + 1.0)))
        last = float(math.floor(min(max(p + s, -2.0), size + 1.0)))
    else:
        return 0, size
    first = min(max(first, 0.0), float(size))
    last = min(max(last + 1.0, 0.0), float(size))
    return int(first), int(last)


def cut_support(kind, p, s, size, radius):
    """:func:`support`, with a Gaussian cut where the profile falls below the rounding of the
    element's peak inside the kernel: about ``radius * s`` from ``p`` when ``p`` is inside.

    ``radius`` is :func:`ndcls._spec.gauss_cut` of the working precision (inf: the whole
    axis). An element more than 40 widths outside the kernel is empty (docs/conv.md).
    Bilinear and triangle supports are exact and ignore it. Self-contained (no calls), so it
    compiles alike with ``numba.njit`` and as a CUDA device function.
    """
    if kind == BILINEAR:
        first = float(math.floor(min(max(p, -2.0), size + 1.0)))
        last = first + 1.0
    else:
        reach = s  # triangle
        if kind == GAUSS:
            # The element's peak inside the kernel is at the cell nearest p, `gap` cells from p;
            # a cell is cut once its value is below unit roundoff times that peak:
            # (i - p)**2 > (radius * s)**2 + gap**2. Past 40 widths every value is 0 in float64.
            gap = max(0.0, -p, p - (size - 1.0))
            if gap > 40.0 * s:
                return 0, 0
            reach = math.sqrt((radius * s) * (radius * s) + gap * gap) if radius * s < 1e150 else radius * s
        first = float(math.ceil(min(max(p - reach, -2.0), size + 1.0)))
        last = float(math.floor(min(max(p + reach, -2.0), size + 1.0)))
    first = min(max(first, 0.0), float(size))
    last = min(max(last + 1.0, 0.0), float(size))
    return int(first), int(last)


def bilinear_cell(p, size):
    """Lower corner ``floor(p)`` (an int) and fraction ``r = p - floor(p)`` of a finite position.

    The floor is taken of ``p`` clamped to ``[-2, size + 1]``: when the clamp acts, both corners
    lie outside the kernel and ``r`` is never used.
    """
    f = math.floor(min(max(p, -2.0), size + 1.0))
    return int(f), p - f


def fill_profile(kind, p, s, lo, hi, a, da_dp, da_ds, with_grad):
    """Write the profile ``a[i]`` (and derivatives, if ``with_grad``) for ``i`` in ``[lo, hi)``.

    Returns ``(sum a, sum da_dp, sum da_ds)`` over the range. Self-contained (no calls), so it
    compiles alike with ``numba.njit`` and as a CUDA device function.
    """
    if kind == GAUSS:
        # a[i] = exp(-((i - p) / s)**2 / 2) with 4 calls of exp: consecutive cells differ by a
        # factor that itself changes by q = exp(-1 / s**2) per cell, so the profile is built
        # outward from the cell nearest p by multiplication. Every factor is <= 1: nothing
        # overflows, and values that underflow stay 0 (the true ones further out are smaller).
        q = math.exp(-(1.0 / s) / s)  # divided twice: s * s may underflow to 0
        c = int(math.floor(min(max(p + 0.5, float(lo)), hi - 1.0)))
        d = float(c) - p
        u = d / s
        a[c] = math.exp(-0.5 * u * u)
        if c + 1 < hi:  # c = floor(max(p + 0.5, lo)) > p - 0.5, so d + 0.5 > 0: exponent <= 0
            ratio = math.exp(-((d + 0.5) / s) / s)  # a[c + 1] / a[c]
            for i in range(c + 1, hi):
                a[i] = a[i - 1] * ratio
                ratio *= q
        if c > lo:  # c = floor(min(p + 0.5, hi - 1)) <= p + 0.5, so d - 0.5 <= 0
            ratio = math.exp(((d - 0.5) / s) / s)  # a[c - 1] / a[c]
            for i in range(c - 1, lo - 1, -1):
                a[i] = a[i + 1] * ratio
                ratio *= q
    total = 0.0
    total_dp = 0.0
    total_ds = 0.0
    floor_p = float(math.floor(min(max(p, -2.0), hi + 1.0)))  # bilinear: p lies in [lo - 1, hi) here
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
            value = a[i]
            if with_grad and value > 0.0:
                u = (x - p) / s
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


def advance(idx, lo, hi, n_axes):
    """Odometer step of ``idx`` over the box ``[lo, hi)`` on axes ``[0, n_axes)``, the last axis
    fastest; False once every combination was visited (``idx`` is back at ``lo``)."""
    j = n_axes - 1
    while j >= 0:
        idx[j] += 1
        if idx[j] < hi[j]:
            return True
        idx[j] = lo[j]
        j -= 1
    return False


def quotient_rule(w, t, z, u, d_sum, others):
    """Derivative of ``w * T / Z`` along one parameter of a normalised element.

    ``t`` = T = sum of G times the profile product, ``u`` = dT/dparameter, ``z`` = Z, and
    ``d_sum * others`` = dZ/dparameter (the derivative's sum along its own axis times the
    profile sums along the other axes).
    """
    return w * (u / z - t * d_sum * others / (z * z))
