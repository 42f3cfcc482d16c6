"""Backend "numpy": the reference every other backend is tested against.

A literal transcription of SPEC sections 3-4 with dense intermediates of shape
``(B, D, C, *learned_sizes)``: slow and memory-hungry, meant to be checked by eye.
It computes in float64 and casts the results to the input dtype.

Elements with a non-finite position, or (triangle, gauss) a non-finite or non-positive
width, contribute nothing to ``K`` and get NaN gradients. Normalised elements are computed in
scaled form (normalised rows, ``Z`` in logs), exact to float64 rounding for any finite
position and positive width: no intermediate overflows where the result does not.
"""

from __future__ import annotations

import numpy as np

from ndcls._spec import EPS


def _profiles(interpolation, p, s, size):
    """1-D profile of every element along one axis, and its derivatives.

    p, s: ``(B, D, C)`` float64 (s unused for bilinear). Returns ``a, da_dp, da_ds`` of shape
    ``(B, D, C, size)``: ``a[..., i]`` is the element's weight share at cell ``i``
    (``da_ds`` is None for bilinear). Gauss derivatives are returned times ``s`` (``a * u`` and
    ``a * u**2``: finite whatever ``s``); :func:`construct_grad` divides by ``s`` last.
    """
    i = np.arange(size, dtype=np.float64)
    p = p[..., None]
    if interpolation == "bilinear":
        floor = np.floor(p)
        r = p - floor
        at_floor, at_next = i == floor, i == floor + 1
        a = np.where(at_floor, 1 - r, 0.0) + np.where(at_next, r, 0.0)
        return a, at_next.astype(np.float64) - at_floor, None
    s = s[..., None]
    if interpolation == "triangle":
        inside = np.abs(i - p) < s
        a = np.maximum(0.0, s - np.abs(i - p))
        return a, np.where(inside, np.sign(i - p), 0.0), inside.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # far positions: u**2 overflows, a underflows
        u = (i - p) / s
        a = np.exp(-0.5 * u**2)
        nonzero = a > 0  # keep derivatives at 0 where a is 0
        return a, np.where(nonzero, a * u, 0.0), np.where(nonzero, a * u**2, 0.0)


def _outer(factors):
    """``(B, D, C, n_0) x ... x (B, D, C, n_{M-1}) -> (B, D, C, n_0, ..., n_{M-1})``."""
    out = np.ones((), dtype=np.float64)
    for j, f in enumerate(factors):
        shape = f.shape[:3] + tuple(f.shape[3] if k == j else 1 for k in range(len(factors)))
        out = out * f.reshape(shape)
    return out


def _setup(spec, weight, positions, sigma):
    """float64 inputs with invalid elements neutralised, and the mask of valid elements."""
    p = positions.astype(np.float64)
    valid = np.isfinite(p).all(axis=0)
    s = None
    if spec.normalised:
        s = sigma.astype(np.float64)
        valid &= (np.isfinite(s) & (s > 0)).all(axis=0)
        s = np.where(valid, s, 1.0)
    p = np.where(valid, p, 0.0)
    w = np.where(valid, weight.astype(np.float64), 0.0)
    return w, p, s, valid


def _to_kernel_layout(spec, x):
    """``(B, D, *learned_sizes)`` -> ``(B, prod(sizes))`` in the axis order of ``K``."""
    order = spec.dense_dims + spec.learned_dims  # kernel axis held by each axis of x after B
    x = x.reshape(spec.n_batch, *spec.dense_sizes, *spec.learned_sizes)
    x = x.transpose(0, *(1 + order.index(a) for a in range(spec.ndim)))
    return x.reshape(spec.n_batch, spec.block)


def _from_kernel_layout(spec, k):
    """Inverse of :func:`_to_kernel_layout`."""
    k = k.reshape(spec.n_batch, *spec.sizes)
    k = k.transpose(0, *(1 + a for a in spec.dense_dims + spec.learned_dims))
    return k.reshape(spec.n_batch, spec.n_dense, *spec.learned_sizes)


def _terms(spec, p, s):
    """The profiles of every row, and the cell axes of ``(B, D, C, *learned_sizes)`` products."""
    profiles = [_profiles(spec.interpolation, p[j], None if s is None else s[j], n) for j, n in enumerate(spec.learned_sizes)]
    return profiles, tuple(range(3, 3 + spec.n_learned))


def _normalised(profiles):
    """Scaled form of a normalised element (docs/math.md, "Gradients"), overflow-free.

    Returns the rows' sums (in units of their peaks), the normalised rows ``n_j = a_j / S_j``, ``log S_j`` and
    ``log Z`` with ``Z = prod_j S_j + eps`` (logs: the product may overflow or underflow), and
    the mask of elements with some ``S_j = 0`` (no mass in the kernel: they contribute nothing).
    """
    peaks = [a.max(axis=-1) for a, _, _ in profiles]  # rows are scaled by their peak first: sums
    empty = np.zeros(peaks[0].shape, dtype=bool)  # of huge triangles stay finite
    for peak in peaks:
        empty |= peak == 0
    peaks = [np.where(empty, 1.0, peak) for peak in peaks]
    scaled = [a / peak[..., None] for (a, _, _), peak in zip(profiles, peaks)]
    sums = [np.where(empty, 1.0, x.sum(axis=-1)) for x in scaled]
    rows = [x / total[..., None] for x, total in zip(scaled, sums)]
    log_sums = [np.log(total) + np.log(peak) for total, peak in zip(sums, peaks)]
    log_z = np.logaddexp(sum(log_sums), np.log(EPS))
    return sums, rows, log_sums, log_z, empty


def _centred_gauss(a, n, p, s):
    """Gauss rows: ``da - n * sum(da)`` for ``da = s * (da/dp, da/ds) = (a * u, a * u**2)``,
    written pairwise as ``a_k * sum_i n_i (l_k - l_i)`` with ``u_k - u_i = (k - i) / s`` and
    ``u_k**2 - u_i**2 = (k - i) / s * (u_k + u_i)``: no cancellation when one cell holds nearly
    all the mass (an element far outside the kernel)."""
    i = np.arange(a.shape[-1], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # tiny widths: u and steps overflow where a = 0
        u = (i - p[..., None]) / s[..., None]
        step = (i[:, None] - i[None, :]) / s[..., None, None]  # (..., k, i): (k - i) / s
        both = (a[..., :, None] > 0) & (n[..., None, :] > 0)
        dp = np.where(both, n[..., None, :] * step, 0.0).sum(axis=-1)
        ds = np.where(both, n[..., None, :] * step * (u[..., :, None] + u[..., None, :]), 0.0).sum(axis=-1)
    return a * dp, a * ds


def construct(spec, weight, positions, sigma, out=None):
    """``K = sum over elements of w * prod_j a_j / Z``, as ``w * (S / Z) * prod_j n_j``."""
    w, p, s, _ = _setup(spec, weight, positions, sigma)
    profiles, _ = _terms(spec, p, s)
    scale = w
    if not spec.normalised:
        product = _outer([a for a, _, _ in profiles])  # (B, D, C, *learned_sizes)
    else:
        sums, rows, log_sums, log_z, empty = _normalised(profiles)
        product = _outer(rows)
        scale = np.where(empty, 0.0, w * np.exp(sum(log_sums) - log_z))
    k = (scale.reshape(w.shape + (1,) * spec.n_learned) * product).sum(axis=2)  # sum over count
    kernel = _to_kernel_layout(spec, k).astype(spec.dtype)
    if out is None:
        return kernel
    out[...] = kernel
    return out


def construct_grad(spec, grad_kernel, weight, positions, sigma):
    """Product and quotient rule on ``K = sum_elements w * prod_j a_j / Z``.

    Bilinear (``Z = 1``): ``dL/dw = T``, ``dL/dp_j = w * U_j``. Normalised kinds, in the form that
    neither cancels nor overflows (docs/math.md): with ``n_j = a_j / S_j``, the centred derivative
    row ``e_j = da_j - n_j * sum(da_j)``, ``t = sum_c G n``, ``u_j = sum_c G e_j prod_{k != j} n_k``:
    ``dL/dw = t * S / Z`` and ``dL/dtheta_j = w * (O_j / Z) * (u_j + t * (eps / Z) * sum(da_j))``
    with ``O_j = prod_{k != j} S_k``.
    """
    w, p, s, valid = _setup(spec, weight, positions, sigma)
    profiles, cells = _terms(spec, p, s)
    g = _from_kernel_layout(spec, grad_kernel.astype(np.float64))[:, :, None]  # (B, D, 1, *learned)
    nan = np.float64(np.nan)

    def finish(x):
        return None if x is None else np.where(valid, x, nan).astype(spec.dtype)

    if not spec.normalised:
        grad_w = (g * _outer([a for a, _, _ in profiles])).sum(axis=cells)
        grad_p = np.stack([w * (g * _outer([d if k == j else a for k, (a, d, _) in enumerate(profiles)])).sum(axis=cells)
                           for j in range(spec.n_learned)])  # fmt: skip
        return finish(grad_w), finish(grad_p), None

    sums, rows, log_sums, log_z, empty = _normalised(profiles)
    t = (g * _outer(rows)).sum(axis=cells)
    grad_w = t * np.exp(sum(log_sums) - log_z)
    q = np.exp(np.log(EPS) - log_z)  # eps / Z

    def grad_of(which):  # which = 1 (positions) or 2 (widths)
        out = []
        for j in range(spec.n_learned):
            d = profiles[j][which]
            d_sum = d.sum(axis=-1)
            if spec.interpolation == "gauss":
                centred = _centred_gauss(profiles[j][0], rows[j], p[j], s[j])[which - 1]
            else:
                centred = d - rows[j] * d_sum[..., None]
            u = (g * _outer([centred if k == j else n for k, n in enumerate(rows)])).sum(axis=cells)
            c = w * np.exp(sum(log_sums) - log_sums[j] - log_z)  # w * O_j / Z
            with np.errstate(over="ignore"):  # a subnormal gauss width: the true value overflows
                x = c * (u + t * q * d_sum)
                if spec.interpolation == "gauss":  # the profile gave s * da
                    x = x / s[j]
            out.append(np.where(empty, 0.0, x))
        return np.stack(out)

    return finish(grad_w), finish(grad_of(1)), finish(grad_of(2))
