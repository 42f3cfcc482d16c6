"""The one place that knows every shape of a DCLS construction and validates it.

Public functions build a :class:`KernelSpec` from the caller's arguments; backends receive
the spec plus canonical arrays (see :mod:`ndcls._api`) and never validate again.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

INTERPOLATIONS = ("bilinear", "triangle", "gauss")
#: Interpolations whose kernel is divided by ``Z = sum of all cells + EPS`` (SPEC section 3).
NORMALISED = ("triangle", "gauss")
#: The normalisation epsilon of the reference implementation.
EPS = 1e-7
#: Largest kernel dimensionality N the array API accepts.
MAX_DIMS = 8
#: Half-precision dtypes (SPEC section 6): native on the GPU, computed in float32 on the CPU.
HALF_DTYPES = ("float16", "bfloat16")
#: NumPy has no bfloat16: kernels that take it natively see its bits as int16 (KernelSpec.storage).
BFLOAT16_BITS = np.dtype(np.int16)


_DTYPE_NAMES: dict = {}


def dtype_name(dtype) -> str:
    """Name of a dtype: ``"float32"`` for ``np.float32`` or ``"float32"``; ``"bfloat16"`` for
    the string, ``torch.bfloat16`` or an ``ml_dtypes`` bfloat16 NumPy dtype."""
    try:
        return _DTYPE_NAMES[dtype]  # NumPy computes a dtype's name in Python: memoised
    except (KeyError, TypeError):
        pass
    if isinstance(dtype, str) and dtype == "bfloat16":
        name = dtype
    elif type(dtype).__module__ == "torch":
        name = str(dtype).rpartition(".")[2]
    else:
        name = np.dtype(dtype).name
    try:
        if len(_DTYPE_NAMES) < 256:
            _DTYPE_NAMES[dtype] = name
    except TypeError:  # unhashable
        pass
    return name


def _describe(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def normalise_sizes(sizes, positions_shape=None) -> tuple[int, ...]:
    """``sizes`` as a tuple of N >= 1 positive ints.

    A single int means N = 1; it is accepted only where that is unambiguous: when
    ``positions_shape`` is given, only if the positions have one row (M = 1).
    """
    if isinstance(sizes, (int, np.integer)) and not isinstance(sizes, bool):
        rows = None if positions_shape is None else tuple(positions_shape)[:1]
        if rows is not None and rows != (1,):
            example = (int(sizes),) * rows[0] if rows and rows[0] > 1 else (int(sizes), int(sizes))
            raise ValueError(
                f"sizes={sizes!r} is a single int, which is only accepted for a 1-D kernel (positions with 1 row); "
                f"positions has shape {_describe(positions_shape)}, so give every kernel size, e.g. sizes={example}"
            )
        sizes = (sizes,)
    try:
        items = tuple(sizes)
    except TypeError:
        raise TypeError(f"sizes must be a sequence of ints, got {type(sizes).__name__} {sizes!r}") from None
    out = tuple(_as_int(s, f"sizes[{i}]") for i, s in enumerate(items))
    if not 1 <= len(out) <= MAX_DIMS:
        raise ValueError(f"sizes must have between 1 and {MAX_DIMS} entries, got {len(out)}: {out}")
    for i, s in enumerate(out):
        if s < 1:
            raise ValueError(f"sizes[{i}] must be >= 1, got {s} (sizes={out})")
    return out


def normalise_learned_dims(learned_dims, n: int) -> tuple[int, ...]:
    """``learned_dims`` as a tuple of M distinct axes in ``[0, n)``; None means all axes in order."""
    if learned_dims is None:
        return tuple(range(n))
    if isinstance(learned_dims, (int, np.integer)) and not isinstance(learned_dims, bool):
        learned_dims = (learned_dims,)
    out = []
    for j, axis in enumerate(tuple(learned_dims)):
        axis = _as_int(axis, f"learned_dims[{j}]")
        if not -n <= axis < n:
            raise ValueError(f"learned_dims[{j}] = {axis} is out of range for N = {n} kernel axes")
        out.append(axis % n)
    if not out:
        raise ValueError(f"learned_dims must name at least one axis, got {tuple(learned_dims)}")
    if len(set(out)) != len(out):
        raise ValueError(f"learned_dims must not repeat an axis, got {tuple(learned_dims)} (N = {n})")
    return tuple(out)


@dataclass(frozen=True)
class KernelSpec:
    """Shapes of one construction (SPEC sections 1-2).

    ``weight`` is ``(*batch, *dense_sizes, count)``, ``positions`` and ``sigma`` are
    ``(M, *batch, *dense_sizes, count)`` (batch axes may be 1 to broadcast), and the kernel
    ``K`` is ``(*batch, *sizes)``. Backends see the flattened forms: ``weight`` as
    ``(n_batch, n_dense, count)``, ``positions``/``sigma`` as ``(M, n_batch, n_dense, count)``,
    ``K`` as ``(n_batch, block)`` with ``block = prod(sizes)``.
    """

    sizes: tuple[int, ...]
    learned_dims: tuple[int, ...]
    interpolation: str
    batch_shape: tuple[int, ...]
    count: int
    dtype: np.dtype  # of the arrays the backend receives
    storage: str = ""  # "bfloat16" when ``dtype`` holds bfloat16 bits (BFLOAT16_BITS)

    @cached_property
    def dtype_name(self) -> str:
        """The values' dtype: ``storage`` if set, else the name of ``dtype``."""
        return self.storage or dtype_name(self.dtype)

    def __hash__(self) -> int:
        # specs key the caches of launch plans and layouts: hash the fields once per spec
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.sizes, self.learned_dims, self.interpolation, self.batch_shape, self.count, self.dtype, self.storage))
            self.__dict__["_hash"] = h
        return h

    # -- derived shapes -------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def n_learned(self) -> int:
        return len(self.learned_dims)

    @property
    def normalised(self) -> bool:
        return self.interpolation in NORMALISED

    @cached_property
    def dense_dims(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a not in self.learned_dims)

    @cached_property
    def dense_sizes(self) -> tuple[int, ...]:
        return tuple(self.sizes[a] for a in self.dense_dims)

    @cached_property
    def learned_sizes(self) -> tuple[int, ...]:
        """Size of the axis moved by each row of ``positions``."""
        return tuple(self.sizes[a] for a in self.learned_dims)

    @cached_property
    def n_batch(self) -> int:
        return math.prod(self.batch_shape)

    @cached_property
    def n_dense(self) -> int:
        return math.prod(self.dense_sizes)

    @cached_property
    def block(self) -> int:
        """Number of cells of one batch kernel, ``prod(sizes)``."""
        return math.prod(self.sizes)

    @cached_property
    def weight_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, *self.dense_sizes, self.count)

    @cached_property
    def positions_shape(self) -> tuple[int, ...]:
        return (self.n_learned, *self.weight_shape)

    @cached_property
    def kernel_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, *self.sizes)

    # -- layout of K inside one batch block (C order) --------------------------------------
    @cached_property
    def axis_strides(self) -> tuple[int, ...]:
        """Element stride of each kernel axis inside a block of ``prod(sizes)`` cells."""
        strides, step = [], 1
        for s in reversed(self.sizes):
            strides.append(step)
            step *= s
        return tuple(reversed(strides))

    @cached_property
    def learned_strides(self) -> tuple[int, ...]:
        """Element stride in the block of the axis moved by each row of ``positions``."""
        return tuple(self.axis_strides[a] for a in self.learned_dims)

    @cached_property
    def dense_offsets(self) -> np.ndarray:
        """``(n_dense,)`` int64: block offset of the cell at each dense index, learned coords 0."""
        offsets = np.zeros((), dtype=np.int64)
        for a in self.dense_dims:
            offsets = offsets[..., None] + np.arange(self.sizes[a], dtype=np.int64) * self.axis_strides[a]
        offsets = offsets.reshape(-1)
        offsets.setflags(write=False)
        return offsets

    @property
    def needs_int64(self) -> bool:
        """Whether flat indices into K can exceed int32 (GPU backends pick their index type)."""
        return self.n_batch * self.block >= 2**31 - 1

    # -- construction from the caller's arguments ------------------------------------------
    @classmethod
    def from_arguments(
        cls,
        *,
        weight_shape,
        weight_dtype,
        positions_shape,
        positions_dtype,
        sizes,
        interpolation,
        learned_dims,
        sigma_shape=None,
        sigma_dtype=None,
        grad_kernel_shape=None,
        grad_kernel_dtype=None,
    ) -> KernelSpec:
        """Validate everything SPEC section 5 lists; raise ValueError/TypeError naming the argument."""
        if not isinstance(interpolation, str) or interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        sizes = normalise_sizes(sizes, positions_shape=positions_shape)
        learned = normalise_learned_dims(learned_dims, len(sizes))
        n_dense_axes = len(sizes) - len(learned)

        weight_name = dtype_name(weight_dtype)
        if weight_name == "bfloat16":
            weight_dtype, storage = BFLOAT16_BITS, "bfloat16"
        else:
            weight_dtype, storage = np.dtype(weight_dtype), ""
            if weight_dtype.kind != "f" or not weight_dtype.isnative:
                raise TypeError(f"weight must have a floating dtype in native byte order, got {weight_dtype}")
        for name, dt in (("positions", positions_dtype), ("sigma", sigma_dtype), ("grad_kernel", grad_kernel_dtype)):
            if dt is None:
                continue
            if dtype_name(dt) != weight_name or (storage == "" and np.dtype(dt) != weight_dtype):
                shown = dtype_name(dt) if storage or dtype_name(dt) == "bfloat16" else np.dtype(dt)
                raise TypeError(f"{name} must have the dtype of weight ({storage or weight_dtype}), got {shown}")

        weight_shape = tuple(weight_shape)
        n_batch_axes = len(weight_shape) - 1 - n_dense_axes
        dense_sizes = tuple(sizes[a] for a in range(len(sizes)) if a not in learned)
        expected = "(*batch, " + "".join(f"{s}, " for s in dense_sizes) + "count)"
        if n_batch_axes < 0:
            raise ValueError(
                f"weight must have shape {expected} for sizes={sizes} and learned_dims={learned}, "
                f"got {_describe(weight_shape)}"
            )
        if weight_shape[n_batch_axes:-1] != dense_sizes:
            raise ValueError(
                f"weight must have shape {expected} for sizes={sizes} and learned_dims={learned}: "
                f"its dense axes must be {_describe(dense_sizes)}, got {_describe(weight_shape)}"
            )
        spec = cls(
            sizes=sizes,
            learned_dims=learned,
            interpolation=interpolation,
            batch_shape=weight_shape[:n_batch_axes],
            count=weight_shape[-1],
            dtype=weight_dtype,
            storage=storage,
        )
        spec._check_broadcastable("positions", positions_shape)
        if spec.normalised:
            if sigma_shape is None:
                raise ValueError(f"sigma is required for interpolation={interpolation!r}, got None")
            spec._check_broadcastable("sigma", sigma_shape)
        elif sigma_shape is not None:
            raise ValueError(f"sigma must be None for interpolation='bilinear', got an array of shape {_describe(sigma_shape)}")
        if grad_kernel_shape is not None and tuple(grad_kernel_shape) != spec.kernel_shape:
            raise ValueError(
                f"grad_kernel must have the kernel's shape {_describe(spec.kernel_shape)}, "
                f"got {_describe(tuple(grad_kernel_shape))}"
            )
        return spec

    def _check_broadcastable(self, name: str, shape) -> None:
        shape = tuple(shape)
        want = self.positions_shape
        ok = len(shape) == len(want) and shape[0] == want[0]
        nb = len(self.batch_shape)
        if ok:
            ok = all(s in (1, w) for s, w in zip(shape[1 : 1 + nb], self.batch_shape))
            ok = ok and shape[1 + nb :] == want[1 + nb :]
        if not ok:
            raise ValueError(
                f"{name} must have shape (M, *batch, *dense_sizes, count) = {_describe(want)} "
                f"(batch axes may be 1), got {_describe(shape)}"
            )

    def broadcast_axes(self, shape) -> tuple[int, ...]:
        """Axes of a positions-like array of ``shape`` that broadcast (size 1 against batch > 1)."""
        return tuple(1 + i for i, (s, b) in enumerate(zip(shape[1:], self.batch_shape)) if s == 1 and b != 1)


# -- direct convolution (SPEC section 9) ------------------------------------------------------------

# Gaussian cut, in widths, per working precision: ``exp(-R**2 / 2)`` is the unit roundoff
# ``2**-(mantissa bits + 1)`` of the dtype, so every cell beyond ``R * sigma`` from the
# position holds less than the rounding of the element's peak (docs/conv.md).
def gauss_cut(dtype) -> float:
    """Radius (in widths) beyond which a Gaussian profile is below the rounding of its peak."""
    bits = np.finfo(np.dtype(dtype)).nmant + 1  # 24 for float32, 53 for float64
    return math.sqrt(2.0 * bits * math.log(2.0))


def taps_per_element(interpolation: str, learned_sizes, sigma=None, dtype=np.float64) -> float:
    """Upper estimate of the kernel cells one element touches (its taps).

    bilinear: ``2**M``; triangle: ``prod(min(2 * ceil(s) + 1, size))``; gauss: the same with
    the cut radius ``gauss_cut(dtype) * s``. ``sigma`` is one width or one per learned axis
    (a typical value; 1 if not given).
    """
    sizes = tuple(learned_sizes)
    if interpolation == "bilinear":
        return float(math.prod(min(2, n) for n in sizes))
    widths = [1.0] * len(sizes) if sigma is None else np.broadcast_to(np.asarray(sigma, dtype=np.float64), (len(sizes),))
    radius = 1.0 if interpolation == "triangle" else gauss_cut(dtype)
    return float(math.prod(min(2 * math.ceil(radius * float(s)) + 1, n) for s, n in zip(widths, sizes)))


def _tuple_of(value, n: int, name: str, minimum: int) -> tuple[int, ...]:
    items = (value,) * n if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{name} must be an int or {n} ints, got {type(value).__name__} {value!r}") from None
    if len(items) != n:
        raise ValueError(f"{name} must be an int or {n} ints (one per spatial axis), got {value!r}")
    out = tuple(_as_int(v, f"{name}[{i}]") for i, v in enumerate(items))
    for i, v in enumerate(out):
        if v < minimum:
            raise ValueError(f"{name}[{i}] must be >= {minimum}, got {v} ({name}={out})")
    return out


@dataclass(frozen=True)
class ConvSpec:
    """Shapes of one direct convolution (SPEC section 9): a :class:`KernelSpec` and the input.

    ``input`` is ``(batch, in_channels, *spatial)``, ``weight`` ``(out_channels, in_channels //
    groups, *dense_sizes, count)``, the output ``(batch, out_channels, *out_spatial)``.
    ``padding`` holds ``(before, after)`` per spatial axis ("same" pads like torch: the extra
    cell of an even kernel goes after).
    """

    kernel: KernelSpec
    batch: int
    in_channels: int
    out_channels: int
    groups: int
    spatial: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]

    @property
    def ndim(self) -> int:
        return self.kernel.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.kernel.dtype

    @property
    def group_in(self) -> int:
        """Input channels per group (the weight's second axis)."""
        return self.in_channels // self.groups

    @property
    def group_out(self) -> int:
        return self.out_channels // self.groups

    @cached_property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            (x + lo + hi - k) // s + 1 for x, (lo, hi), k, s in zip(self.spatial, self.padding, self.kernel.sizes, self.stride)
        )

    @cached_property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.in_channels, *self.spatial)

    @cached_property
    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, self.out_channels, *self.out_spatial)

    def sum_to(self, full, like_shape):
        """Sum a full ``(M, O * I, D, C)`` element gradient (NumPy or CuPy) over the channel axes
        along which an array of ``like_shape`` ``(M, Po, Pi, D, C)`` broadcasts."""
        k = self.kernel
        full = full.reshape(k.n_learned, *k.batch_shape, k.n_dense, k.count)
        axes = tuple(a for a in (1, 2) if like_shape[a] == 1 and full.shape[a] != 1)
        return full.sum(axis=axes, keepdims=True) if axes else full

    def cost(self, sigma=None) -> dict:
        """Estimated multiply-adds of one forward pass by each route (pure function of shapes).

        ``direct``: every element's taps times the output size (what ``ndcls.conv`` does);
        ``construct``: building ``K`` (every element's taps) plus the dense convolution over
        ``prod(sizes)`` cells. ``taps`` is the estimate per element (:func:`taps_per_element`,
        ``sigma`` a typical width). The estimate counts taps per channel pair even where they
        are common to every pair (positions and sigma broadcast over both batch axes), which
        the CPU may run as matrix products over channels (docs/conv.md, section 2). The
        backward pass costs about twice the forward on either route.
        """
        k = self.kernel
        taps = taps_per_element(k.interpolation, k.learned_sizes, sigma, k.dtype)
        elements = k.n_batch * k.n_dense * k.count
        outputs = self.batch * math.prod(self.out_spatial)
        direct = outputs * elements * taps
        construct = elements * taps + outputs * k.n_batch * k.block
        return dict(direct=float(direct), construct=float(construct), taps=taps, elements=elements)

    @classmethod
    def from_arguments(
        cls,
        *,
        input_shape,
        input_dtype,
        weight_shape,
        weight_dtype,
        positions_shape,
        positions_dtype,
        sizes,
        interpolation,
        learned_dims,
        stride=1,
        padding=0,
        groups=1,
        sigma_shape=None,
        sigma_dtype=None,
        grad_output_shape=None,
        grad_output_dtype=None,
    ) -> ConvSpec:
        """Validate a convolution's arguments (SPEC sections 5 and 9) before any kernel runs."""
        kernel = KernelSpec.from_arguments(
            weight_shape=weight_shape,
            weight_dtype=weight_dtype,
            positions_shape=positions_shape,
            positions_dtype=positions_dtype,
            sigma_shape=sigma_shape,
            sigma_dtype=sigma_dtype,
            sizes=sizes,
            interpolation=interpolation,
            learned_dims=learned_dims,
        )
        n = kernel.ndim
        for name, dt in (("input", input_dtype), ("grad_output", grad_output_dtype)):
            if dt is not None and dtype_name(dt) != kernel.dtype_name:
                raise TypeError(f"{name} must have the dtype of weight ({kernel.dtype_name}), got {dtype_name(dt)}")
        if len(kernel.batch_shape) != 2:
            raise ValueError(
                f"weight must have shape (out_channels, in_channels // groups, *dense_sizes, count) for conv, "
                f"i.e. {2 + len(kernel.dense_sizes) + 1} axes for sizes={kernel.sizes} and learned_dims="
                f"{kernel.learned_dims}, got {_describe(tuple(weight_shape))}"
            )
        input_shape = tuple(input_shape)
        if len(input_shape) != n + 2:
            raise ValueError(
                f"input must have shape (batch, in_channels, *spatial) with {n} spatial axes for sizes="
                f"{kernel.sizes}, got {_describe(input_shape)}"
            )
        groups = _as_int(groups, "groups")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        out_channels, group_in = kernel.batch_shape
        in_channels = input_shape[1]
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}, input axis 1) and out_channels ({out_channels}, weight axis 0) "
                f"must be divisible by groups ({groups})"
            )
        if group_in != in_channels // groups:
            raise ValueError(
                f"weight axis 1 must be in_channels // groups = {in_channels} // {groups} = "
                f"{in_channels // groups}, got {group_in} (weight shape {_describe(tuple(weight_shape))})"
            )
        stride = _tuple_of(stride, n, "stride", 1)
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0),) * n
            elif padding == "same":
                if any(s != 1 for s in stride):
                    raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
                pads = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel.sizes)
            else:
                raise ValueError(f"padding must be an int, {n} ints, 'valid' or 'same', got {padding!r}")
        else:
            pads = tuple((p, p) for p in _tuple_of(padding, n, "padding", 0))
        spatial = input_shape[2:]
        for a, (x, (lo, hi), k) in enumerate(zip(spatial, pads, kernel.sizes)):
            if x + lo + hi < k:
                raise ValueError(
                    f"input spatial axis {a} has size {x}{f' (+ padding {lo + hi})' if lo + hi else ''}, "
                    f"smaller than the kernel size {k} along it (input shape {_describe(input_shape)}, sizes={kernel.sizes})"
                )
        spec = cls(
            kernel=kernel,
            batch=input_shape[0],
            in_channels=in_channels,
            out_channels=out_channels,
            groups=groups,
            spatial=spatial,
            stride=stride,
            padding=pads,
        )
        if grad_output_shape is not None and tuple(grad_output_shape) != spec.output_shape:
            raise ValueError(
                f"grad_output must have the output's shape {_describe(spec.output_shape)}, "
                f"got {_describe(tuple(grad_output_shape))}"
            )
        return spec
