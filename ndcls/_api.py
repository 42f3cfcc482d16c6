"""``ndcls.construct`` and ``ndcls.construct_grad``: normalise, validate, dispatch."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ndcls._arrays import ArrayContext, array_context, shape_and_dtype
from ndcls._registry import Backend, default_backend, get_backend
from ndcls._spec import KernelSpec


def _namespace(x):
    return np if isinstance(x, np.ndarray) else sys.modules["cupy"]


def _select_backend(name, ctx: ArrayContext) -> Backend:
    backend = default_backend(ctx.device[0]) if name is None else get_backend(name)
    if backend.device == "cpu" and ctx.on_gpu:
        raise ValueError(
            f"backend {backend.name!r} computes on host arrays, but the arrays are on "
            f"cuda:{ctx.device[1]}; use backend=None, 'cupy' or 'numba-cuda', or move them to the host"
        )
    return backend


@dataclass
class _Call:
    ctx: ArrayContext
    spec: KernelSpec
    backend: Backend
    shapes: dict  # caller's shapes of positions and sigma, for reducing broadcast gradients
    weight: object
    positions: object
    sigma: object
    grad_kernel: object = None


def _locate(backend, **arrays) -> tuple[ArrayContext, Backend]:
    """The arrays' library and device, and the backend that will compute on them."""
    ctx = array_context(**arrays)
    return ctx, _select_backend(backend, ctx)


def _prepare(weight, positions, sigma, grad_kernel, sizes, interpolation, learned_dims, backend) -> _Call:
    """Validate and canonicalise; any copy it makes runs on the current stream (see the callers)."""
    arrays = dict(weight=weight, positions=positions, sigma=sigma)
    if grad_kernel is not None:  # construct has none; construct_grad checked it is an array
        arrays["grad_kernel"] = grad_kernel
    ctx, chosen = _locate(backend, **arrays)
    w, p, s, g = (ctx.to_compute(x) for x in (weight, positions, sigma, grad_kernel))
    w_shape, w_dtype = shape_and_dtype(w)
    p_shape, p_dtype = shape_and_dtype(p)
    s_shape, s_dtype = shape_and_dtype(s) if s is not None else (None, None)
    g_shape, g_dtype = shape_and_dtype(g) if g is not None else (None, None)
    spec = KernelSpec.from_arguments(
        weight_shape=w_shape,
        weight_dtype=w_dtype,
        positions_shape=p_shape,
        positions_dtype=p_dtype,
        sigma_shape=s_shape,
        sigma_dtype=s_dtype,
        grad_kernel_shape=g_shape,
        grad_kernel_dtype=g_dtype,
        sizes=sizes,
        interpolation=interpolation,
        learned_dims=learned_dims,
    )
    if not chosen.supports(spec.dtype):
        raise TypeError(f"backend {chosen.name!r} supports dtypes {chosen.dtypes}, got {spec.dtype}")
    xp = _namespace(w)
    B, D, C, M = spec.n_batch, spec.n_dense, spec.count, spec.n_learned

    def canonical(x, full_shape, flat_shape):
        if x is None:
            return None
        if x.shape != full_shape:
            x = xp.broadcast_to(x, full_shape)
        return xp.ascontiguousarray(x).reshape(flat_shape)

    return _Call(
        ctx=ctx,
        spec=spec,
        backend=chosen,
        shapes={"positions": p_shape, "sigma": s_shape},
        weight=canonical(w, spec.weight_shape, (B, D, C)),
        positions=canonical(p, spec.positions_shape, (M, B, D, C)),
        sigma=canonical(s, spec.positions_shape, (M, B, D, C)),
        grad_kernel=canonical(g, spec.kernel_shape, (B, spec.block)),
    )


def _reduce_to(grad, shape, spec: KernelSpec):
    """Sum a full ``(M, B, D, C)`` gradient over the axes the caller's array broadcast along."""
    grad = grad.reshape(spec.positions_shape)
    axes = spec.broadcast_axes(shape)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def construct(weight, positions, sizes, *, sigma=None, interpolation="bilinear", learned_dims=None, backend=None):
    """Build the dense DCLS kernel ``K`` from element weights and positions.

    Args:
        weight: ``(*batch, *dense_sizes, count)`` floating array.
        positions: ``(M, *batch, *dense_sizes, count)``, kernel index coordinates (cell ``i`` sits
            at ``i``); row ``j`` moves kernel axis ``learned_dims[j]``. Batch axes may be 1.
        sizes: the N kernel sizes (dilated along learned axes, dense along the others).
        sigma: widths, shaped like ``positions``; required for "triangle" and "gauss", None for "bilinear".
        interpolation: "bilinear", "triangle" or "gauss" (SPEC section 3).
        learned_dims: the M kernel axes moved by ``positions``; default all N axes in order.
        backend: None (default for the arrays' device), "numpy", "numba", or a GPU backend.

    Returns:
        ``K`` of shape ``(*batch, *sizes)``, same array library, device and dtype as ``weight``.

    Example::

        >>> import numpy as np, ndcls
        >>> w = np.array([[1.0, 2.0]])                  # batch 1, count 2
        >>> p = np.array([[[0.5, 3.0]], [[1.0, 2.25]]])  # rows: axis 0, axis 1
        >>> K = ndcls.construct(w, p, (5, 5))
        >>> K.shape, float(K.sum())
        ((1, 5, 5), 3.0)
    """
    ctx, _ = _locate(backend, weight=weight, positions=positions, sigma=sigma)
    with ctx.stream():  # the caller's stream, also for the copies _prepare may make
        call = _prepare(weight, positions, sigma, None, sizes, interpolation, learned_dims, backend)
        impl = call.backend.load()
        kernel = impl.construct(call.spec, call.weight, call.positions, call.sigma)
    return ctx.from_compute(kernel.reshape(call.spec.kernel_shape))


def construct_grad(
    grad_kernel, weight, positions, sizes, *, sigma=None, interpolation="bilinear", learned_dims=None, backend=None
):
    """Gradients of a loss through :func:`construct`, given ``dL/dK``.

    Args:
        grad_kernel: ``(*batch, *sizes)``, the gradient of the loss with respect to ``K``.
        weight, positions, sizes, sigma, interpolation, learned_dims, backend: as for :func:`construct`.

    Returns:
        ``(grad_weight, grad_positions, grad_sigma)`` shaped like ``weight``, ``positions`` and
        ``sigma`` (summed over the axes along which ``positions``/``sigma`` broadcast);
        ``grad_sigma`` is None for "bilinear".
    """
    ctx, _ = _locate(backend, weight=weight, positions=positions, sigma=sigma, grad_kernel=grad_kernel)
    with ctx.stream():
        call = _prepare(weight, positions, sigma, grad_kernel, sizes, interpolation, learned_dims, backend)
        impl = call.backend.load()
        spec = call.spec
        gw, gp, gs = impl.construct_grad(spec, call.grad_kernel, call.weight, call.positions, call.sigma)
        gw = gw.reshape(spec.weight_shape)
        gp = _reduce_to(gp, call.shapes["positions"], spec)
        gs = None if gs is None else _reduce_to(gs, call.shapes["sigma"], spec)
    return tuple(ctx.from_compute(g) for g in (gw, gp, gs))
