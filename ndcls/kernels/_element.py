"""Per-element 1-D profile math, as plain Python on scalars and 1-D scratch arrays.

Compiled by the CPU backend with ``numba.njit``; the same source can be compiled as CUDA
device functions. Every float-to-int cast is preceded by a range check, so NaN, inf or far
out-of-range positions never produce an index.

Interpolation codes: 0 bilinear, 1 triangle, 2 gauss.

Normalised kinds (triangle, gauss) are computed in scaled form (docs/math.md, "Gradients"):
each row's profile is divided by its sum, the derivative rows are centred, and the normaliser
enters only through ratios bounded by 1, so no intermediate overflows or cancels where the
result does not.
"""

import math

from ndcls._spec import EPS

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
            # The element's peak inside the kernel is at the cell nearest p, `gap` from p (at most
            # 1/2 when p is inside); a cell is cut once its value is below unit roundoff times
            # that peak: (i - p)**2 > (radius * s)**2 + gap**2. Past 40 widths every value is 0
            # in float64. (sqrt, not hypot, which costs as much as 5 exp. A sum of squares that
            # overflows gives reach inf, the whole axis, as the clamps below would anyway; where
            # it underflows, r + gap, at most sqrt(2) times the true reach, keeps the cells an
            # element near 0 reaches.)
            nearest = math.floor(min(max(p, 0.0), size - 1.0) + 0.5)
            gap = abs(p - nearest)
            if gap > 40.0 * s:
                return 0, 0
            r = radius * s
            squares = r * r + gap * gap
            reach = math.sqrt(squares) if squares > 1e-300 else r + gap
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
    compiles alike with ``numba.njit`` and as a CUDA device function. Gauss derivatives are
    written times ``s`` (``a * u`` and ``a * u**2``, bounded by 1 whatever ``s``): see
    :func:`derivative_scale`.
    """
    # Gauss: the reciprocal width, so that multiplications replace a dozen divisions per row;
    # 0 (divide instead) for a width so small that 1 / s is not finite
    inv_s = 1.0 / s if kind == GAUSS and s > 1e-300 else 0.0
    if kind == GAUSS:
        # a[i] = exp(-((i - p) / s)**2 / 2) with 3 calls of exp: consecutive cells differ by a
        # factor that itself changes by q = exp(-1 / s**2) per cell, so the profile is built
        # outward from the cell nearest p by multiplication. Every factor is <= 1: nothing
        # overflows, and values that underflow stay 0 (the true ones further out are smaller).
        # 1 / s**2 may overflow to inf: q = 0, as it should. (1 / s) / s: s * s may underflow
        q = math.exp(-inv_s * inv_s) if inv_s > 0.0 else math.exp(-(1.0 / s) / s)
        c = int(math.floor(min(max(p + 0.5, float(lo)), hi - 1.0)))
        d = float(c) - p
        u = d * inv_s if inv_s > 0.0 else d / s
        a[c] = math.exp(-0.5 * u * u)
        # a[c + 1] / a[c]. Where c + 1 < hi, c = floor(max(p + 0.5, lo)) > p - 0.5, so d + 0.5 > 0
        # and the exponent is <= 0; else (c = hi - 1 < p - 0.5) it is unused and may be > 1
        right = math.exp(-((d + 0.5) * inv_s) * inv_s) if inv_s > 0.0 else math.exp(-((d + 0.5) / s) / s)
        ratio = right
        for i in range(c + 1, hi):
            a[i] = a[i - 1] * ratio
            ratio *= q
        if c > lo:  # c = floor(min(p + 0.5, hi - 1)) <= p + 0.5, so d - 0.5 <= 0
            # a[c - 1] / a[c] = exp((d - 0.5) / s**2) = q / right, unless either is near underflow
            # or right is not the ratio above (> 1)
            if q > 1e-290 and 1e-290 < right <= 1.0:
                ratio = q / right
            elif inv_s > 0.0:
                ratio = math.exp(((d - 0.5) * inv_s) * inv_s)
            else:
                ratio = math.exp(((d - 0.5) / s) / s)
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
                u = (x - p) * inv_s if inv_s > 0.0 else (x - p) / s
                d_p = value * u  # s * da/dp
                d_s = d_p * u  # s * da/ds
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


def derivative_scale(kind, s):
    """What :func:`fill_profile` multiplied the derivatives of a row by: ``s`` for gauss, else 1."""
    if kind == GAUSS:
        return s
    return 1.0


def normalise_profile(kind, p, s, lo, hi, a, da_dp, da_ds, total, total_dp, total_ds, with_grad):
    """In place on ``[lo, hi)``: ``a`` becomes ``n = a / total`` (``total = sum a > 0``) and, if
    ``with_grad``, each derivative row ``da`` becomes ``da - n * sum(da)`` (``total`` times the
    derivative of ``n``; exactly 0 on a one-cell support).

    Gauss rows are centred in the form that does not cancel when one cell ``m`` (the nearest to
    ``p``) holds nearly all the mass: with ``da = a * l`` (``l = u`` or ``u**2``, times ``s``),
    ``da - n * sum(da) = a * ((l - l_m) - sum_k n_k (l_k - l_m))`` and ``l_k - l_m`` is
    ``(k - m) / s`` or ``(k - m) / s * (u_k + u_m)``, both computed without cancellation.
    """
    # multiplications by reciprocals rather than divisions (a dozen per element and row), each
    # only where it is finite (else the division), as in fill_profile
    inv_total = 1.0 / total if total > 1e-300 else 0.0
    if kind == GAUSS and with_grad:
        inv_s = 1.0 / s if s > 1e-300 else 0.0
        m = float(math.floor(min(max(p + 0.5, float(lo)), hi - 1.0)))
        u_m = (m - p) * inv_s if inv_s > 0.0 else (m - p) / s
        corr_p = 0.0
        corr_s = 0.0
        for i in range(lo, hi):
            if a[i] > 0.0:  # a = 0 (underflow) also guards against (i - m) / s = inf
                dl = (float(i) - m) * inv_s if inv_s > 0.0 else (float(i) - m) / s
                ul = (float(i) - p) * inv_s if inv_s > 0.0 else (float(i) - p) / s
                corr_p += a[i] * dl
                corr_s += a[i] * (dl * (ul + u_m))
        corr_p /= total
        corr_s /= total
        for i in range(lo, hi):
            value = a[i]
            if value > 0.0:
                dl = (float(i) - m) * inv_s if inv_s > 0.0 else (float(i) - m) / s
                ul = (float(i) - p) * inv_s if inv_s > 0.0 else (float(i) - p) / s
                da_dp[i] = value * (dl - corr_p)
                da_ds[i] = value * (dl * (ul + u_m) - corr_s)
            a[i] = value * inv_total if inv_total > 0.0 else value / total
        return
    for i in range(lo, hi):
        n = a[i] * inv_total if inv_total > 0.0 else a[i] / total
        a[i] = n
        if with_grad:
            da_dp[i] -= n * total_dp
            da_ds[i] -= n * total_ds


def normaliser_ratios(s):
    """``(S / Z, eps / Z)`` for ``Z = S + eps``, ``S >= 0`` the product of the row sums (may be inf).

    Never divides by 0 nor forms inf / inf; both ratios carry one rounding error each."""
    if s > 1.0:
        e = EPS / s
        r = 1.0 / (1.0 + e)
        return r, e * r
    z = s + EPS
    return s / z, EPS / z


def normalised_gradient(w, t, u, d_sum, s_row, others, q, scale):
    """Derivative of ``sum_c G[c] w P(c) / Z`` along one parameter of row j of a normalised element.

    With the row's profile normalised and its derivative centred (:func:`normalise_profile`):
    ``t`` = sum of G n, ``u`` = sum of G times the centred derivative times the other rows' n,
    ``d_sum`` = sum of the row's derivative, ``s_row`` = S_j > 0, ``others`` = prod of the other
    rows' sums O_j, ``q`` = eps / Z, ``scale`` = :func:`derivative_scale`. The result is
    ``w O_j / Z * (u + q t d_sum) / scale``, with ``w O_j / Z = w / (S_j + eps / O_j)``.
    """
    if others > 1.0:
        c = w / (s_row + EPS / others)
    else:
        c = w * others / (s_row * others + EPS)
    return c * (u + q * t * d_sum) / scale
