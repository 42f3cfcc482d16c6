"""Backend "numpy": the reference every other backend is tested against.

A literal transcription of SPEC sections 3-4 with dense intermediates of shape
``(B, D, C, *learned_sizes)``: slow and memory-hungry, meant to be checked by eye.
It computes in float64 and casts the results to the input dtype.

Elements with a non-finite position, or (triangle, gauss) a non-finite or non-positive
width, contribute nothing to ``K`` and get NaN gradients.
"""

from __future__ import annotations

import numpy as np


def _profiles(interpolation, p, s, size):
    """1-D profile of every element along one axis, and its derivatives.

    p, s: ``(B, D, C)`` float64 (s unused for bilinear). Returns ``a, da_dp, da_ds`` of shape
    ``(B, D, C, size)``: ``a[..., i]`` is the element's weight share at cell ``i``
    (``da_ds`` is None for bilinear).
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
        return a, np.where(nonzero, a * u / s, 0.0), np.where(nonzero, a * u**2 / s, 0.0)


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


def _terms(spec, w, p, s):
    profiles = [_profiles(spec.interpolation, p[j], None if s is None else s[j], n) for j, n in enumerate(spec.learned_sizes)]
    product = _outer([a for a, _, _ in profiles])  # (B, D, C, *learned_sizes)
    cells = tuple(range(3, product.ndim))
    z = product.sum(axis=cells) + 1e-7 if spec.normalised else np.ones(w.shape)
    return profiles, product, cells, z


def construct(spec, weight, positions, sigma, out=None):
    w, p, s, _ = _setup(spec, weight, positions, sigma)
    _, product, _, z = _terms(spec, w, p, s)
    k = ((w / z).reshape(w.shape + (1,) * spec.n_learned) * product).sum(axis=2)  # sum over count
    kernel = _to_kernel_layout(spec, k).astype(spec.dtype)
    if out is None:
        return kernel
    out[...] = kernel
    return out


def construct_grad(spec, grad_kernel, weight, positions, sigma):
    """Product and quotient rule on ``K = sum_elements w * prod_j a_j / Z``."""
    w, p, s, valid = _setup(spec, weight, positions, sigma)
    profiles, product, cells, z = _terms(spec, w, p, s)
    g = _from_kernel_layout(spec, grad_kernel.astype(np.float64))[:, :, None]  # (B, D, 1, *learned)
    t = (g * product).sum(axis=cells)  # dL/d(w/Z) * ... : sum of G * prod a
    grad_w = t / z

    def grad_of(which):  # derivative of w * prod_j a_j / Z along each row j, for which=1 (p) or 2 (s)
        rows = []
        for j in range(spec.n_learned):
            factors = [profiles[k][which] if k == j else profiles[k][0] for k in range(spec.n_learned)]
            d_product = _outer(factors)
            d_t = (g * d_product).sum(axis=cells)
            d_z = d_product.sum(axis=cells) if spec.normalised else 0.0
            rows.append(w * (d_t / z - t * d_z / z**2))
        return np.stack(rows)

    grad_p = grad_of(1)
    grad_s = grad_of(2) if spec.normalised else None
    nan = np.float64(np.nan)
    out = (
        np.where(valid, grad_w, nan),
        np.where(valid, grad_p, nan),
        None if grad_s is None else np.where(valid, grad_s, nan),
    )
    return tuple(None if x is None else x.astype(spec.dtype) for x in out)
