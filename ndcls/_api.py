"""``ndcls.construct`` and ``ndcls.construct_grad``: normalise, validate, dispatch."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import numpy as np

from ndcls._arrays import ArrayContext, array_context, cupy_on_device
from ndcls._registry import Backend, default_backend, get_backend
from ndcls._spec import KernelSpec, dtype_name


def _namespace(x):
    return np if isinstance(x, np.ndarray) else sys.modules["cupy"]


def _select_backend(name, ctx: ArrayContext) -> Backend:
    backend = default_backend(ctx.device[0]) if name is None else get_backend(name)
    if backend.device == "cpu" and ctx.on_gpu:
        raise ValueError(
            f"backend {backend.name!r} computes on host arrays, but the arrays are on "
            f"cuda:{ctx.device[1]}; use backend=None, 'cupy' or 'numba-cuda', or move them to the host"
        )
    if ctx.on_gpu:  # CUDA arrays on a machine without a usable device: say so before anything else
        cupy_on_device(ctx.device[1])
    return backend


@dataclass
class _Call:
    ctx: ArrayContext
    spec: KernelSpec  # as the backend sees it (float32 for upcast half precision)
    backend: Backend
    mode: str  # how arrays reach the kernels: "native", "float32" or "bits" (Backend.compute_mode)
    dtype: str  # the caller's dtype name, that of the results
    shapes: dict  # caller's shapes of positions and sigma, for reducing broadcast gradients
    weight: object = None
    positions: object = None
    sigma: object = None
    grad_kernel: object = None


# What depends only on shapes, dtypes and the other arguments is validated once and cached:
# key -> (spec for the backend, mode). Keys keep the type of every scalar (3 and 3.0 hash alike).
_SPECS: dict = {}
_SPECS_MAX = 1024


def _typed(value):
    if isinstance(value, (tuple, list)):
        return (type(value), *map(type, value), *value)
    return (type(value), value)


def _validated(chosen: Backend, shapes_and_dtypes, sizes, interpolation, learned_dims):
    """``(spec for the backend, mode)``, from the cache or by :meth:`KernelSpec.from_arguments`."""
    try:
        key = (chosen.name, shapes_and_dtypes, _typed(sizes), type(interpolation), interpolation, _typed(learned_dims))
        found = _SPECS.get(key)
    except TypeError:  # an unhashable argument: validate without caching (it will likely raise)
        key = found = None
    if found is not None:
        return found
    (w_shape, w_dtype), (p_shape, p_dtype), (s_shape, s_dtype), (g_shape, g_dtype) = shapes_and_dtypes
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
    mode = chosen.compute_mode(spec.dtype_name)
    if mode == "float32":
        spec = replace(spec, dtype=np.dtype(np.float32), storage="")
    found = (spec, mode)
    if key is not None:
        if len(_SPECS) >= _SPECS_MAX:
            _SPECS.clear()
        _SPECS[key] = found
    return found


def _validate(weight, positions, sigma, grad_kernel, sizes, interpolation, learned_dims, backend, *, gradient=False) -> _Call:
    """Everything SPEC section 5 checks, before any array is touched; no copies, no GPU work."""
    arrays = dict(weight=weight, positions=positions, sigma=sigma)
    if gradient:  # construct has no grad_kernel; construct_grad requires one
        arrays["grad_kernel"] = grad_kernel
    ctx = array_context(**arrays)
    chosen = _select_backend(backend, ctx)
    dtype_of = ctx.dtype_of
    described = (
        (tuple(weight.shape), dtype_of(weight)),
        (tuple(positions.shape), dtype_of(positions)),
        _NOTHING if sigma is None else (tuple(sigma.shape), dtype_of(sigma)),
        _NOTHING if grad_kernel is None else (tuple(grad_kernel.shape), dtype_of(grad_kernel)),
    )
    spec, mode = _validated(chosen, described, sizes, interpolation, learned_dims)
    dtype = spec.dtype_name if mode != "float32" else dtype_name(described[0][1])
    return _Call(ctx, spec, chosen, mode, dtype, {"positions": described[1][0], "sigma": described[2][0]})


_NOTHING = (None, None)


def _canonicalise(call: _Call, weight, positions, sigma, grad_kernel) -> _Call:
    """The canonical arrays of :mod:`ndcls._registry`; any copy runs on the current stream (see the callers)."""
    spec, ctx, mode = call.spec, call.ctx, call.mode
    B, D, C, M = spec.n_batch, spec.n_dense, spec.count, spec.n_learned

    def canonical(x, full_shape, flat_shape):
        if x is None:
            return None
        x = ctx.to_compute(x, mode)
        if x.shape != full_shape:
            x = _namespace(x).broadcast_to(x, full_shape)
        if not x.flags.c_contiguous:
            x = _namespace(x).ascontiguousarray(x)
        return x.reshape(flat_shape)

    call.weight = canonical(weight, spec.weight_shape, (B, D, C))
    call.positions = canonical(positions, spec.positions_shape, (M, B, D, C))
    call.sigma = canonical(sigma, spec.positions_shape, (M, B, D, C))
    call.grad_kernel = canonical(grad_kernel, spec.kernel_shape, (B, spec.block))
    return call


def _prepare(weight, positions, sigma, grad_kernel, sizes, interpolation, learned_dims, backend) -> _Call:
    """Validate and canonicalise (on the current stream: callers enter ``call.ctx.stream()`` first)."""
    call = _validate(weight, positions, sigma, grad_kernel, sizes, interpolation, learned_dims, backend,
                     gradient=grad_kernel is not None)
    return _canonicalise(call, weight, positions, sigma, grad_kernel)


def _reduce_to(grad, shape, spec: KernelSpec):
    """Sum a full ``(M, B, D, C)`` gradient over the axes the caller's array broadcast along
    (a NumPy or CuPy array, or, for bfloat16, the caller's torch tensor)."""
    grad = grad.reshape(spec.positions_shape)
    axes = spec.broadcast_axes(shape)
    if not axes:
        return grad
    if type(grad).__module__.partition(".")[0] == "torch":
        return grad.sum(dim=axes, keepdim=True)
    return grad.sum(axis=axes, keepdims=True)


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
    call = _validate(weight, positions, sigma, None, sizes, interpolation, learned_dims, backend)
    if not call.ctx.on_gpu:
        return _construct(call, weight, positions, sigma)
    # the caller's stream (and, for torch, its allocator) for the copies, the kernel and the
    # hand-back, so that the DLPack exchange orders nothing on another stream
    with call.ctx.stream():
        return _construct(call, weight, positions, sigma)


def _construct(call: _Call, weight, positions, sigma):
    _canonicalise(call, weight, positions, sigma, None)
    kernel = call.backend.load().construct(call.spec, call.weight, call.positions, call.sigma)
    return call.ctx.from_compute(kernel.reshape(call.spec.kernel_shape), call.mode, call.dtype)


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
    call = _validate(weight, positions, sigma, grad_kernel, sizes, interpolation, learned_dims, backend, gradient=True)
    if not call.ctx.on_gpu:
        return _construct_grad(call, weight, positions, sigma, grad_kernel)
    with call.ctx.stream():  # as in construct
        return _construct_grad(call, weight, positions, sigma, grad_kernel)


def _construct_grad(call: _Call, weight, positions, sigma, grad_kernel):
    ctx, spec = call.ctx, call.spec
    _canonicalise(call, weight, positions, sigma, grad_kernel)
    gw, gp, gs = call.backend.load().construct_grad(spec, call.grad_kernel, call.weight, call.positions, call.sigma)
    gw = gw.reshape(spec.weight_shape)
    if call.mode == "bits":  # bfloat16 bits cannot be summed: reduce in the caller's library
        gw, gp, gs = (ctx.from_compute(g, call.mode, call.dtype) for g in (gw, gp, gs))
        gp = _reduce_to(gp, call.shapes["positions"], spec)
        return gw, gp, None if gs is None else _reduce_to(gs, call.shapes["sigma"], spec)
    gp = _reduce_to(gp, call.shapes["positions"], spec)
    gs = None if gs is None else _reduce_to(gs, call.shapes["sigma"], spec)
    return tuple(ctx.from_compute(g, call.mode, call.dtype) for g in (gw, gp, gs))
