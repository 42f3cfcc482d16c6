"""``ndcls.construct``, ``ndcls.construct_grad``, ``ndcls.conv``, ``ndcls.conv_grad``: normalise, validate, dispatch."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import numpy as np

from ndcls._arrays import ArrayContext, array_context, cupy_on_device
from ndcls._registry import Backend, check_operation, default_backend, get_backend, get_operation
from ndcls._spec import ConvSpec, KernelSpec, dtype_name


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


# -- direct convolution (SPEC section 9) ------------------------------------------------------------


#: dtypes the direct convolution computes in float32 (upcast in, rounded back out), on every backend
_CONV_HALF_DTYPES = ("float16", "bfloat16")


@dataclass
class _ConvCall:
    ctx: ArrayContext
    spec: ConvSpec
    impl: object  # the backend's function for the operation
    shapes: dict  # caller's shapes of weight, positions and sigma
    mode: str  # "native", or "float32" for half-precision callers (ArrayContext conversions)
    dtype: str  # the caller's dtype name, that of the results
    input: object
    weight: object
    positions: object
    sigma: object
    grad_output: object = None


def _prepare_conv(operation, input, weight, positions, sigma, grad_output, sizes, options) -> _ConvCall:
    """Validate, then canonicalise: ``input``/``grad_output`` C-contiguous as given, ``weight``
    ``(O, I, D, C)``, ``positions``/``sigma`` ``(M, Po, Pi, D, C)`` with broadcast axes kept at 1.

    float16 and bfloat16 arrays (all of one dtype) are computed in float32: upcast here, the
    results rounded back by the callers (``mode`` "float32")."""
    backend = options.pop("backend")
    arrays = dict(input=input, weight=weight, positions=positions, sigma=sigma)
    if operation == "conv_grad":
        arrays["grad_output"] = grad_output
    ctx = array_context(**arrays)
    chosen = _select_backend(backend, ctx)

    def described(a):  # the caller's shape and dtype, before any conversion
        return (None, None) if a is None else (tuple(a.shape), ctx.dtype_of(a))

    shapes = {name: described(a) for name, a in zip("xwpsg", (input, weight, positions, sigma, grad_output))}
    spec = ConvSpec.from_arguments(
        input_shape=shapes["x"][0],
        input_dtype=shapes["x"][1],
        weight_shape=shapes["w"][0],
        weight_dtype=shapes["w"][1],
        positions_shape=shapes["p"][0],
        positions_dtype=shapes["p"][1],
        sigma_shape=shapes["s"][0],
        sigma_dtype=shapes["s"][1],
        grad_output_shape=shapes["g"][0],
        grad_output_dtype=shapes["g"][1],
        sizes=sizes,
        **options,
    )
    dtype = spec.kernel.dtype_name
    mode = "float32" if dtype in _CONV_HALF_DTYPES else "native"
    if mode == "float32":
        spec = replace(spec, kernel=replace(spec.kernel, dtype=np.dtype(np.float32), storage=""))
    check_operation(operation, chosen)
    if not chosen.supports(spec.dtype):
        raise TypeError(f"backend {chosen.name!r} supports dtypes {chosen.dtypes}, got {spec.dtype}")
    x, w, p, s, g = (ctx.to_compute(a, mode) for a in (input, weight, positions, sigma, grad_output))
    xp = _namespace(w)
    k = spec.kernel

    def rows(a):  # (M, Po, Pi, *dense, C) -> (M, Po, Pi, D, C), no broadcasting
        return None if a is None else xp.ascontiguousarray(a).reshape(a.shape[:3] + (k.n_dense, k.count))

    return _ConvCall(
        ctx=ctx,
        spec=spec,
        impl=get_operation(operation, chosen),
        shapes={"weight": shapes["w"][0], "positions": shapes["p"][0], "sigma": shapes["s"][0]},
        mode=mode,
        dtype=dtype,
        input=xp.ascontiguousarray(x),
        weight=xp.ascontiguousarray(w).reshape(k.batch_shape + (k.n_dense, k.count)),
        positions=rows(p),
        sigma=rows(s),
        grad_output=None if g is None else xp.ascontiguousarray(g),
    )


def conv(
    input,
    weight,
    positions,
    sizes,
    *,
    sigma=None,
    interpolation="bilinear",
    learned_dims=None,
    stride=1,
    padding=0,
    groups=1,
    backend=None,
):
    """Convolution by the DCLS kernel ``K = construct(weight, positions, sizes, ...)``, without building ``K``.

    The result is what ``torch.nn.functional.conv{N}d(input, K, stride=stride, padding=padding,
    groups=groups)`` computes (cross-correlation, zero padding); the work is proportional to the
    cells the elements touch (their taps) times the output size (SPEC section 9, docs/conv.md).

    Args:
        input: ``(batch, in_channels, *spatial)``, N = len(sizes) spatial axes.
        weight: ``(out_channels, in_channels // groups, *dense_sizes, count)``.
        positions: ``(M, out_channels, in_channels // groups, *dense_sizes, count)``; the two
            channel axes may be 1 (positions shared by those channels).
        sizes, sigma, interpolation, learned_dims: as for :func:`construct`.
        stride: an int or N ints. padding: an int, N ints, "valid" or "same" (stride 1).
        groups: channel groups; in_channels and out_channels must be divisible by it.
        backend: None (the default for the arrays' device), "numpy" or "numba".

    Returns:
        ``(batch, out_channels, *out_spatial)``, the caller's array library, device and dtype.

    Example::

        >>> import numpy as np, ndcls
        >>> x = np.ones((1, 1, 8))                     # batch 1, 1 channel, length 8
        >>> w = np.array([[[1.0, 2.0]]])               # 1 -> 1 channel, count 2
        >>> p = np.array([[[[0.0, 3.5]]]])             # positions in a kernel of size 5
        >>> ndcls.conv(x, w, p, (5,)).tolist()
        [[[3.0, 3.0, 3.0, 3.0]]]
    """
    options = dict(interpolation=interpolation, learned_dims=learned_dims, stride=stride, padding=padding, groups=groups)
    ctx = array_context(input=input, weight=weight, positions=positions, sigma=sigma)
    with ctx.stream():  # the caller's stream for the copies, the kernels and the hand-back
        call = _prepare_conv("conv", input, weight, positions, sigma, None, sizes, dict(options, backend=backend))
        out = call.impl(call.spec, call.input, call.weight, call.positions, call.sigma)
        return ctx.from_compute(out.reshape(call.spec.output_shape), call.mode, call.dtype)


def conv_grad(
    grad_output,
    input,
    weight,
    positions,
    sizes,
    *,
    sigma=None,
    interpolation="bilinear",
    learned_dims=None,
    stride=1,
    padding=0,
    groups=1,
    backend=None,
):
    """Gradients of a loss through :func:`conv`, given ``dL/doutput``.

    Args:
        grad_output: ``(batch, out_channels, *out_spatial)``, the output's shape.
        input, weight, positions, sizes and the keywords: as for :func:`conv`.

    Returns:
        ``(grad_input, grad_weight, grad_positions, grad_sigma)`` shaped like ``input``,
        ``weight``, ``positions`` and ``sigma`` (summed over the axes along which positions
        and sigma broadcast); ``grad_sigma`` is None for "bilinear".
    """
    options = dict(interpolation=interpolation, learned_dims=learned_dims, stride=stride, padding=padding, groups=groups)
    ctx = array_context(grad_output=grad_output, input=input, weight=weight, positions=positions, sigma=sigma)
    with ctx.stream():
        call = _prepare_conv("conv_grad", input, weight, positions, sigma, grad_output, sizes, dict(options, backend=backend))
        gx, gw, gp, gs = call.impl(call.spec, call.grad_output, call.input, call.weight, call.positions, call.sigma)
        gx = gx.reshape(call.spec.input_shape)
        gw = gw.reshape(call.shapes["weight"])
        gp = gp.reshape(call.shapes["positions"])
        gs = None if gs is None else gs.reshape(call.shapes["sigma"])
        return tuple(ctx.from_compute(a, call.mode, call.dtype) for a in (gx, gw, gp, gs))
