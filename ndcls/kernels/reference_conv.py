"""Backend "numpy", operation conv: the reference every conv backend is tested against.

The obvious route, independent of the fast kernels: the reference construction of the whole
kernel ``K`` in float64 (:mod:`ndcls.kernels.reference`), then a plain correlation that loops
over the ``prod(sizes)`` kernel cells and adds one channel product per cell. The gradient is
the same loop transposed, and ``dL/dK`` goes through the reference ``construct_grad``.
Results are cast to the input dtype.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from ndcls.kernels import reference


def _full(spec, x):
    """Positions/sigma broadcast to the reference's full ``(M, O * I, D, C)`` layout, float64."""
    if x is None:
        return None
    k = spec.kernel
    full = np.broadcast_to(x.astype(np.float64), (k.n_learned, *k.batch_shape, k.n_dense, k.count))
    return full.reshape(k.n_learned, k.n_batch, k.n_dense, k.count)


def _weight(spec, weight):
    k = spec.kernel
    return weight.astype(np.float64).reshape(k.n_batch, k.n_dense, k.count)


def _kernel64(spec):
    return dataclasses.replace(spec.kernel, dtype=np.dtype(np.float64))


def _dense_kernel(spec, weight, positions, sigma):
    """``K`` as ``(groups, O // groups, I, *sizes)`` in float64."""
    k = spec.kernel
    kernel = reference.construct(_kernel64(spec), _weight(spec, weight), _full(spec, positions), _full(spec, sigma))
    return kernel.reshape(spec.groups, spec.group_out, spec.group_in, *k.sizes)


def _padded(spec, x):
    return np.pad(x.astype(np.float64), ((0, 0), (0, 0), *spec.padding))


def _window(spec, cell):
    """Slices of the padded input that kernel cell ``cell`` multiplies, one per output cell."""
    return tuple(slice(c, c + s * (y - 1) + 1, s) for c, s, y in zip(cell, spec.stride, spec.out_spatial))


def _by_group(spec, x):
    """``(batch, channels, *spatial)`` -> ``(batch, groups, channels // groups, *spatial)``."""
    return x.reshape(x.shape[0], spec.groups, x.shape[1] // spec.groups, *x.shape[2:])


def conv(spec, input, weight, positions, sigma, out=None):
    """``out``, if given, is a C-contiguous array of the output's shape and dtype that receives it."""
    kernel = _dense_kernel(spec, weight, positions, sigma)
    x = _by_group(spec, _padded(spec, input))
    y = np.zeros((spec.batch, spec.groups, spec.group_out, *spec.out_spatial))
    for cell in itertools.product(*(range(n) for n in spec.kernel.sizes)):
        window = x[(slice(None), slice(None), slice(None), *_window(spec, cell))]  # (batch, G, I, *out)
        y += np.einsum("goi,ngi...->ngo...", kernel[(..., *cell)], window)  # channel product per cell
    y = y.reshape(spec.output_shape).astype(spec.dtype)
    if out is None:
        return y
    out[...] = y
    return out


def conv_grad(spec, grad_output, input, weight, positions, sigma):
    k = spec.kernel
    kernel = _dense_kernel(spec, weight, positions, sigma)
    xp = _padded(spec, input)
    x = _by_group(spec, xp)
    g = _by_group(spec, grad_output.astype(np.float64))  # (batch, G, O // G, *out)
    grad_x = np.zeros_like(x)
    grad_kernel = np.zeros_like(kernel)
    axes = "pqrstuvw"[: k.ndim]  # the output's spatial axes, summed for dL/dK
    for cell in itertools.product(*(range(n) for n in k.sizes)):
        index = (slice(None), slice(None), slice(None), *_window(spec, cell))
        grad_kernel[(..., *cell)] = np.einsum(f"ngo{axes},ngi{axes}->goi", g, x[index])
        grad_x[index] += np.einsum("goi,ngo...->ngi...", kernel[(..., *cell)], g)
    grad_x = grad_x.reshape(xp.shape)
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(spec.padding, spec.spatial))
    grad_input = grad_x[(slice(None), slice(None), *crop)]
    gw, gp, gs = reference.construct_grad(
        _kernel64(spec),
        grad_kernel.reshape(k.n_batch, k.block),
        _weight(spec, weight),
        _full(spec, positions),
        _full(spec, sigma),
    )

    def reduce(full, like):  # sum over the axes along which positions/sigma broadcast
        if full is None:
            return None
        full = full.reshape(k.n_learned, *k.batch_shape, k.n_dense, k.count)
        axes = tuple(a for a in (1, 2) if like.shape[a] == 1 and full.shape[a] != 1)
        return full.sum(axis=axes, keepdims=True).astype(spec.dtype) if axes else full.astype(spec.dtype)

    return (
        np.ascontiguousarray(grad_input).astype(spec.dtype),
        gw.astype(spec.dtype),
        reduce(gp, positions),
        reduce(gs, sigma),
    )
