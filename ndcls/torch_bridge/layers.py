"""Drop-in DCLS convolution layers, compatible with the reference implementation (PyPI ``dcls``).

One generic layer, :class:`_DclsNMd`, covers every kind: an ``N``-dimensional convolution whose
kernel has ``M`` learned axes (the last ``M`` kernel axes) and ``N - M`` dense ones. The public
classes only fix ``N``, ``M`` and the reference's constructor signature:

============  ===  ===  =====================================================
layer          N    M    kernel axes (after ``out_channels, in_channels // groups``)
============  ===  ===  =====================================================
Dcls1d         1    1    dilated
Dcls2d         2    2    dilated, dilated
Dcls3d         3    3    dilated, dilated, dilated
Dcls2_1d       2    1    dense, dilated
Dcls3_1d       3    1    dense, dense, dilated
Dcls3_2d       3    2    dense, dilated, dilated
Dcls2dK1d      2    1    a 1-D dilated kernel laid along one axis of a 2-D conv
============  ===  ===  =====================================================

Parameters have the reference's names, shapes and initialisation: ``weight``
``(out, in // groups, *dense, count)``, ``P`` and ``SIG`` ``(M, out, in // groups, *dense, count)``
(``SIG`` only for ``version`` "gauss" and "max"), ``bias`` ``(out,)``. ``P`` is centred: row ``j``
of ``P`` puts an element at kernel index ``P[j] + size // 2`` along the axis it moves.

As in the reference, each layer holds its construction as a submodule ``DCK`` (a
``ConstructKernel*`` object, ``K = DCK(weight, P, SIG)``) which owns ``version``:
``layer.version`` and ``layer.DCK.version`` are one value, and setting either switches the
construction. The N-D layers derive from ``_DclsNd`` and the N-M-D ones from ``_DclsN_Md``, the
reference's base classes (:mod:`ndcls.torch_bridge.modules` has all of its names).

.. note:: Differences from the reference implementation (docs/torch.md): row ``j`` of ``P`` is
   centred and clamped with the size of the axis it actually moves (the reference uses the
   size of axis ``j``, which is only the same for square and cubic kernels), and
   :meth:`clamp_parameters` keeps positions inside the kernel for even sizes too.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.utils import _ntuple

from ndcls.torch_bridge import cost
from ndcls.torch_bridge._ops import construct, conv, output_spatial

VERSIONS = ("v0", "v1", "max", "gauss")
#: version -> (interpolation, constant added to abs(SIG) for the width, or None without SIG)
_VERSION_KERNEL = {
    "v0": ("bilinear", None),
    "v1": ("triangle", None),  # width 1, no SIG parameter
    "max": ("triangle", 1.0),
    "gauss": ("gauss", 0.27),
}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
METHODS = ("auto", "construct", "direct")


def row_axes(learned_axes: Sequence[int], version: str) -> tuple[int, ...]:
    """Kernel axis moved by each row of ``P``, in the reference implementation's order.

    For "v1", "max" and "gauss" the rows run over the learned axes in reverse (``P[0]`` moves
    the last one); for "v0" they run in order, except that in 3-D rows 1 and 2 are swapped.
    """
    axes = tuple(learned_axes)
    if version != "v0":
        return axes[::-1]
    return (axes[0], axes[2], axes[1]) if len(axes) == 3 else axes


class _ConstructKernelNMd(nn.Module):
    """Kernel construction of a layer: ``K = DCK(weight, P, SIG)``, as the reference's ``DCK``.

    Every layer holds one as ``layer.DCK``. Its :attr:`version` selects the construction;
    ``layer.version`` and ``layer.DCK.version`` are one value, so client code that switches a
    trained layer with ``layer.DCK.version = "max"`` (with or without ``layer.version = "max"``)
    changes what ``forward`` computes, as with the reference. A version that needs ``SIG``
    ("max", "gauss") cannot be used by a layer built without one ("v0", "v1").

    Called on its own, it builds ``(out, in // groups, *dense, *dilated)`` from ``W``
    ``(out, in // groups, *dense, count)`` and centred positions ``P`` (and widths ``SIG``)
    ``(M, out, in // groups, *dense, count)``. It holds no parameters and nothing in the
    ``state_dict`` (like the reference's).
    """

    def __init__(self, out_channels: int, in_channels: int, groups: int, kernel_count: int,
                 dense_kernel_size: Sequence[int], dilated_kernel_size: Sequence[int], version: str) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.in_channels = in_channels
        self.groups = groups
        self.kernel_count = kernel_count
        self.dense_kernel_size = tuple(dense_kernel_size)
        self.dilated_kernel_size = tuple(dilated_kernel_size)
        #: sizes of the constructed kernel: dense axes first, learned axes last
        self.kernel_sizes = self.dense_kernel_size + self.dilated_kernel_size
        self.version = version

    @property
    def version(self) -> str:
        return self._version

    @version.setter
    def version(self, version: str) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        n_dense, m = len(self.dense_kernel_size), len(self.dilated_kernel_size)
        axes = row_axes(range(n_dense, n_dense + m), version)
        row_sizes = [self.kernel_sizes[a] for a in axes]
        centre = torch.tensor([float(s // 2) for s in row_sizes]).view(m, *([1] * (2 + n_dense + 1)))
        self._version = version
        #: kernel axis (of ``kernel_sizes``) moved by each row of P
        self.row_axes = axes
        #: per row of P: the centre offset and the clamp range that keeps positions in the kernel
        self.position_limits = tuple((-(s // 2), s - 1 - s // 2) for s in row_sizes)
        if "_centre" in self._buffers:  # a version switch: same shape, values of the new row order
            with torch.no_grad():
                self._centre.copy_(centre)
        else:
            self.register_buffer("_centre", centre, persistent=False)

    def kernel_positions(self, P: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``P`` in kernel index coordinates (``P + size // 2``); integer ``P`` is cast to ``dtype``."""
        if not P.is_floating_point():
            P = P.to(dtype if dtype is not None else torch.get_default_dtype())
        return P + self._centre.to(P.dtype)

    def kernel_sigma(self, P: Tensor, SIG: Optional[Tensor]) -> Optional[Tensor]:
        """Effective widths of the elements for the current version (None for "v0")."""
        interpolation, offset = _VERSION_KERNEL[self.version]
        if interpolation == "bilinear":
            return None
        if offset is None:  # v1: width 1
            return torch.ones((), dtype=P.dtype, device=P.device).expand_as(P)
        if SIG is None:
            raise ValueError(
                f"version {self.version!r} uses the SIG parameter, but this layer has none (it was built with a "
                f"version without widths, 'v0' or 'v1'); assign layer.SIG = torch.nn.Parameter(...) shaped like P first"
            )
        return SIG.abs() + offset

    def forward(self, W: Tensor, P: Tensor, SIG: Optional[Tensor] = None) -> Tensor:
        positions = self.kernel_positions(P, W.dtype)
        return construct(
            W,
            positions,
            self.kernel_sizes,
            sigma=self.kernel_sigma(positions, SIG),
            interpolation=_VERSION_KERNEL[self.version][0],
            learned_dims=self.row_axes,
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_count={self.kernel_count}, version={self.version}"
        if self.dense_kernel_size:
            s += f", dense_kernel_size={self.dense_kernel_size}"
        s += f", dilated_kernel_size={self.dilated_kernel_size}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s

    @classmethod
    def _for_layer(cls, *args) -> "_ConstructKernelNMd":
        """An instance of ``cls`` from the generic arguments, whatever ``cls``'s own signature."""
        dck = cls.__new__(cls)
        _ConstructKernelNMd.__init__(dck, *args)
        return dck


class ConstructKernel1d(_ConstructKernelNMd):
    """The construction of :class:`Dcls1d` and :class:`Dcls2dK1d` (reference: ``ConstructKernel1d``)."""

    def __init__(self, out_channels, in_channels, groups, kernel_count, dilated_kernel_size, version):
        super().__init__(out_channels, in_channels, groups, kernel_count, (), _ntuple(1)(dilated_kernel_size), version)


class ConstructKernel2d(_ConstructKernelNMd):
    """The construction of :class:`Dcls2d` (reference: ``ConstructKernel2d``)."""

    def __init__(self, out_channels, in_channels, groups, kernel_count, dilated_kernel_size, version):
        super().__init__(out_channels, in_channels, groups, kernel_count, (), _ntuple(2)(dilated_kernel_size), version)


class ConstructKernel3d(_ConstructKernelNMd):
    """The construction of :class:`Dcls3d` (reference: ``ConstructKernel3d``)."""

    def __init__(self, out_channels, in_channels, groups, kernel_count, dilated_kernel_size, version):
        super().__init__(out_channels, in_channels, groups, kernel_count, (), _ntuple(3)(dilated_kernel_size), version)


class ConstructKernel3_1d(_ConstructKernelNMd):
    """The construction of :class:`Dcls3_1d` (reference: ``ConstructKernel3_1d``)."""

    def __init__(self, out_channels, in_channels, groups, kernel_count, dense_kernel_size, dilated_kernel_size,
                 version):
        super().__init__(out_channels, in_channels, groups, kernel_count, _ntuple(2)(dense_kernel_size),
                         _ntuple(1)(dilated_kernel_size), version)


class ConstructKernel2_1d(_ConstructKernelNMd):
    """The construction of :class:`Dcls2_1d` (not in the reference package)."""

    def __init__(self, out_channels, in_channels, groups, kernel_count, dense_kernel_size, dilated_kernel_size,
                 version):
        super().__init__(out_channels, in_channels, groups, kernel_count, _ntuple(1)(dense_kernel_size),
                         _ntuple(1)(dilated_kernel_size), version)


class ConstructKernel3_2d(_ConstructKernelNMd):
    """The construction of :class:`Dcls3_2d` (not in the reference package)."""

    def __init__(self, out_channels, in_channels, groups, kernel_count, dense_kernel_size, dilated_kernel_size,
                 version):
        super().__init__(out_channels, in_channels, groups, kernel_count, _ntuple(1)(dense_kernel_size),
                         _ntuple(2)(dilated_kernel_size), version)


class _DclsNMd(nn.Module):
    """Generic DCLS convolution: ``N``-D conv, kernel learned along its last ``M`` axes.

    Args (besides the reference's constructor arguments, see the public classes):
        conv_dims: N, the convolution's dimensionality.
        dense_kernel_size: sizes of the N - M dense kernel axes (they come first).
        dilated_kernel_size: sizes of the M learned kernel axes (they come last).
        position_init: "normal" (N(0, 0.5) clamped, the reference's N-D layers) or "uniform"
            (uniform over the kernel, the reference's N-M-D layers).
        conv_kernel_size: shape the constructed kernel is viewed as before the convolution
            (only Dcls2dK1d sets it: a 1-D kernel with a size-1 axis inserted).
        method: how forward computes the convolution: "construct" (build the dense kernel, then
            torch's convolution), "direct" (:func:`ndcls.torch_bridge.conv`, never builds the
            kernel; other padding modes pad the input explicitly first) or "auto" (the cheaper of
            the two per call, by the cost model of :mod:`ndcls.torch_bridge.cost`). Outputs,
            gradients and checkpoints do not depend on it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_count: int,
        stride,
        padding,
        dense_kernel_size: Sequence[int],
        dilated_kernel_size: Sequence[int],
        groups: int,
        bias: bool,
        padding_mode: str,
        version: str,
        *,
        conv_dims: int,
        position_init: str,
        conv_kernel_size: Optional[Sequence[int]] = None,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        if kernel_count < 1:
            raise ValueError(f"kernel_count must be >= 1, got {kernel_count}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_count = kernel_count
        self.groups = groups
        self.padding_mode = padding_mode
        self.conv_dims = conv_dims
        self.position_init = position_init
        self.dense_kernel_size = tuple(dense_kernel_size)
        self.dilated_kernel_size = tuple(dilated_kernel_size)
        #: sizes of the constructed kernel: dense axes first, learned axes last
        self.kernel_sizes = self.dense_kernel_size + self.dilated_kernel_size
        if any(s < 1 for s in self.kernel_sizes):
            raise ValueError(f"kernel sizes must be >= 1, got {self.kernel_sizes}")
        self.conv_kernel_size = tuple(conv_kernel_size) if conv_kernel_size is not None else self.kernel_sizes
        m = len(self.dilated_kernel_size)
        #: the construction (``K = DCK(weight, P, SIG)``); owns ``version`` and the row order of P
        self.DCK = self._construct_kernel_class._for_layer(
            out_channels, in_channels, groups, kernel_count, self.dense_kernel_size, self.dilated_kernel_size, version
        )
        # the reference's attributes of a (non-transposed) convolution
        self.transposed = False
        self.output_padding = (0,) * conv_dims
        self.stride = _ntuple(conv_dims)(stride)
        self.padding, self._reversed_padding_repeated_twice = self._parse_padding(padding)

        shape = (out_channels, in_channels // groups, *self.dense_kernel_size, kernel_count)
        self.weight = nn.Parameter(torch.empty(shape))
        self.P = nn.Parameter(torch.empty((m, *shape)))
        if _VERSION_KERNEL[version][1] is not None:
            self.SIG = nn.Parameter(torch.empty((m, *shape)))
        else:
            self.register_parameter("SIG", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    _construct_kernel_class = _ConstructKernelNMd

    @property
    def version(self) -> str:
        """The construction: "v0", "v1", "max" or "gauss"; the same value as ``self.DCK.version``."""
        return self.DCK.version

    @version.setter
    def version(self, version: str) -> None:
        self.DCK.version = version

    @property
    def row_axes(self) -> tuple[int, ...]:
        """Kernel axis (of ``kernel_sizes``) moved by each row of P (depends on :attr:`version`)."""
        return self.DCK.row_axes

    @property
    def position_limits(self) -> tuple[tuple[int, int], ...]:
        """Per row of P: the clamp range that keeps positions inside the kernel."""
        return self.DCK.position_limits

    @property
    def _centre(self) -> Tensor:
        return self.DCK._centre

    def _parse_padding(self, padding):
        """``padding`` as nn.ConvNd keeps it, and the F.pad amounts for non-zero padding modes."""
        n = self.conv_dims
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a tuple of {n} ints, 'same' or 'valid', got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            amounts = []
            for k in reversed(self.conv_kernel_size):
                total = 0 if padding == "valid" else k - 1
                amounts += [total // 2, total - total // 2]
            return padding, tuple(amounts)
        padding = _ntuple(n)(padding)
        if len(padding) != n:
            raise ValueError(f"padding must have {n} entries, got {padding}")
        return padding, tuple(p for p in reversed(padding) for _ in range(2))

    # -- parameters ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """The reference's initialisation (same random draws, in the same order)."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            for j, (lo, hi) in enumerate(self.position_limits):
                if self.position_init == "normal":
                    init.normal_(self.P[j], 0, 0.5).clamp_(lo, hi)
                else:
                    init.uniform_(self.P[j], lo, hi)
            if self.SIG is not None:
                init.constant_(self.SIG, 0.23 if self.version == "gauss" else 0.0)

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Keep every position inside the kernel: ``0 <= P[j] + size // 2 <= size - 1``."""
        for j, (lo, hi) in enumerate(self.position_limits):
            self.P[j].clamp_(lo, hi)

    # -- the kernel ------------------------------------------------------------------------
    def kernel_positions(self) -> Tensor:
        """Element positions in kernel index coordinates, ``(M, out, in // groups, *dense, count)``;
        row ``j`` along kernel axis ``row_axes[j]``."""
        return self.DCK.kernel_positions(self.P, self.weight.dtype)

    def kernel_sigma(self) -> Optional[Tensor]:
        """Effective widths of the elements (None for "v0")."""
        return self.DCK.kernel_sigma(self.P, self.SIG)

    def construct_kernel(self) -> Tensor:
        """The dense convolution weight, ``(out, in // groups, *conv_kernel_size)``."""
        K = self.DCK(self.weight, self.P, self.SIG)
        return K.reshape(self.out_channels, self.in_channels // self.groups, *self.conv_kernel_size)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor], P: Tensor,
                      SIG: Optional[Tensor]) -> Tensor:
        """The reference's ``_conv_forward``: convolve ``input`` with ``DCK(weight, P, SIG)`` and ``bias``."""
        kernel = self.DCK(weight, P, SIG).reshape(self.out_channels, self.in_channels // self.groups,
                                                  *self.conv_kernel_size)
        return self._convolve(input, kernel, bias)

    def _conv(self, input: Tensor, kernel: Tensor) -> Tensor:
        return self._convolve(input, kernel, self.bias)

    def _convolve(self, input: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Tensor:
        conv = _CONV[self.conv_dims]
        # padding="same" with an even kernel size pads unevenly: pad here, as torch would
        # internally (with a warning about the copy it makes)
        uneven_same = self.padding == "same" and any(k % 2 == 0 for k in self.conv_kernel_size)
        if self.padding_mode != "zeros" or uneven_same:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            return conv(input, kernel, bias, self.stride, 0, 1, self.groups)
        return conv(input, kernel, bias, self.stride, self.padding, 1, self.groups)

    def forward(self, input: Tensor) -> Tensor:
        if self.route(input) == "direct":
            return self._direct(input)
        return self._conv_forward(input, self.weight, self.bias, self.P, self.SIG)  # as the reference's forward

    # -- the direct route ------------------------------------------------------------------
    def _direct(self, input: Tensor) -> Tensor:
        """The convolution without the dense kernel (:func:`ndcls.torch_bridge.conv`)."""
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        weight, positions = self.weight, self.kernel_positions()
        sigma = self.DCK.kernel_sigma(positions, self.SIG)  # of the positions' (floating) dtype
        sizes, learned = self.kernel_sizes, self.row_axes
        if self.conv_kernel_size != self.kernel_sizes:
            # Dcls2dK1d: the 1-D kernel lies along axis flat_dim of a 2-D kernel whose other axis
            # has size 1: that axis is a dense one, one more (unit) axis before count.
            weight, positions = weight.unsqueeze(-2), positions.unsqueeze(-2)
            sigma = sigma.unsqueeze(-2) if sigma is not None else None
            sizes, learned = self.conv_kernel_size, (self.flat_dim,)
        out = conv(input, weight, positions, sizes, sigma=sigma, interpolation=_VERSION_KERNEL[self.version][0],
                   learned_dims=learned, stride=self.stride, padding=padding, groups=self.groups)
        if self.bias is not None:
            out = out + self.bias.view(-1, *([1] * self.conv_dims))
        return out

    def route(self, input: Tensor) -> str:
        """The route forward takes for ``input``: ``method`` unless "auto", else the cost model's pick."""
        if self.method != "auto":
            return self.method
        device = input.device.type
        if device not in ("cpu", "cuda") or self.padding_mode != "zeros" or self.conv_kernel_size != self.kernel_sizes:
            return "construct"  # where the cost model has no measured rates, or the layer would copy
        if self.weight.dtype not in (torch.float32, torch.float64) or input.dtype not in (torch.float32, torch.float64):
            return "construct"  # the cost model has float32/float64 rates only (half precision: construct)
        if not cost.direct_available(device):
            return "construct"
        spatial = input.shape[2:]
        if isinstance(self.padding, str):
            out = output_spatial(spatial, self.kernel_sizes, self.stride, None, self.padding)
        else:
            out = output_spatial(spatial, self.kernel_sizes, self.stride, self.padding, "")
        n_dense = len(self.dense_kernel_size)
        return cost.choose(
            batch=input.shape[0], out_channels=self.out_channels, in_per_group=self.in_channels // self.groups,
            out_spatial=out, sizes=self.kernel_sizes, learned_dims=list(range(n_dense, len(self.kernel_sizes))),
            count=self.kernel_count, interpolation=_VERSION_KERNEL[self.version][0], width=self._mean_width(),
            dtype=str(self.weight.dtype).removeprefix("torch."), device=device,
        )

    def _mean_width(self) -> Optional[float]:
        """Mean effective element width for the cost model (None for bilinear).

        Read from ``SIG`` only when ``SIG`` has changed (torch counts its in-place updates); under
        ``torch.compile`` taken from the last eager call (or the initial width), and for CUDA
        parameters never read (the initial width, or the last width read on the CPU), so that
        choosing the route neither synchronises the device nor breaks a graph.
        """
        interpolation, offset = _VERSION_KERNEL[self.version]
        if interpolation == "bilinear":
            return None
        if offset is None:  # v1: width 1
            return 1.0
        if self.SIG is None:  # switched to a version with widths: forward raises its clear error
            return offset
        cached = getattr(self, "_width_cache", None)
        if torch.compiler.is_compiling() or self.SIG.is_cuda:  # no graph break, no device sync (CUDA graphs)
            return cached[1] if cached is not None else offset + (0.23 if self.version == "gauss" else 0.0)
        key = (self.version, self.SIG.data_ptr(), self.SIG._version)
        if cached is None or cached[0] != key:
            cached = (key, float(self.SIG.detach().abs().mean()) + offset)
            self._width_cache = cached
        return cached[1]

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_count={self.kernel_count}, stride={self.stride}"
        s += f", version={self.version}"
        if self.padding != (0,) * self.conv_dims:
            s += f", padding={self.padding}"
        if self.dense_kernel_size:
            s += f", dense_kernel_size={self.dense_kernel_size}"
        s += f", dilated_kernel_size={self.dilated_kernel_size}"
        if self.conv_kernel_size != self.kernel_sizes:
            s += f", conv_kernel_size={self.conv_kernel_size}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.method != "auto":
            s += f", method={self.method}"
        return s


class _DclsNd(_DclsNMd):
    """Base class of the layers whose kernel is learned along every axis (reference: ``_DclsNd``):
    :class:`Dcls1d`, :class:`Dcls2d`, :class:`Dcls3d`, :class:`Dcls2dK1d`. For ``isinstance`` checks."""


class _DclsN_Md(_DclsNMd):
    """Base class of the layers with dense kernel axes (reference: ``_DclsN_Md``): :class:`Dcls2_1d`,
    :class:`Dcls3_1d`, :class:`Dcls3_2d`. For ``isinstance`` checks."""


class Dcls1d(_DclsNd):
    """1-D DCLS convolution (reference: ``DCLS.construct.modules.Dcls1d``).

    Input ``(batch, in_channels, L)``; ``weight`` ``(out, in // groups, count)``, ``P`` and ``SIG``
    ``(1, out, in // groups, count)``.
    """

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0, dilated_kernel_size=1,
                 groups=1, bias=True, padding_mode="zeros", version="gauss", method="auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, (),
                         _ntuple(1)(dilated_kernel_size), groups, bias, padding_mode, version,
                         conv_dims=1, position_init="normal", method=method)


class Dcls2d(_DclsNd):
    """2-D DCLS convolution (reference: ``Dcls2d``); ``P`` is ``(2, out, in // groups, count)``.

    Example::

        >>> import torch
        >>> from ndcls.torch_bridge import Dcls2d
        >>> m = Dcls2d(96, 96, kernel_count=34, dilated_kernel_size=17, padding=8, groups=96)
        >>> m(torch.randn(1, 96, 20, 20)).shape
        torch.Size([1, 96, 20, 20])

    ``use_implicit_gemm`` is accepted for signature compatibility and ignored (the reference
    uses it for an optional CUDA depthwise kernel).
    """

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0, dilated_kernel_size=1,
                 groups=1, bias=True, padding_mode="zeros", version="gauss", use_implicit_gemm=True, method="auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, (),
                         _ntuple(2)(dilated_kernel_size), groups, bias, padding_mode, version,
                         conv_dims=2, position_init="normal", method=method)
        self.use_implicit_gemm = False  # the reference's flag: its optional CUDA depthwise kernel is never used


class Dcls3d(_DclsNd):
    """3-D DCLS convolution (reference: ``Dcls3d``); ``P`` is ``(3, out, in // groups, count)``."""

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0, dilated_kernel_size=1,
                 groups=1, bias=True, padding_mode="zeros", version="gauss", method="auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, (),
                         _ntuple(3)(dilated_kernel_size), groups, bias, padding_mode, version,
                         conv_dims=3, position_init="normal", method=method)


class Dcls2_1d(_DclsN_Md):
    """2-D convolution, kernel dense along axis 0 and learned along axis 1.

    ``weight`` ``(out, in // groups, dense, count)``, ``P``/``SIG`` ``(1, out, in // groups, dense,
    count)``. Not in the reference package; follows its Dcls3_1d conventions.
    """

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0, dense_kernel_size=1,
                 dilated_kernel_size=1, groups=1, bias=True, padding_mode="zeros", version="gauss", method="auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, _ntuple(1)(dense_kernel_size),
                         _ntuple(1)(dilated_kernel_size), groups, bias, padding_mode, version,
                         conv_dims=2, position_init="uniform", method=method)


class Dcls3_1d(_DclsN_Md):
    """3-D convolution, kernel dense along axes 0, 1 and learned along axis 2 (reference: ``Dcls3_1d``).

    ``weight`` ``(out, in // groups, d0, d1, count)``, ``P``/``SIG`` ``(1, out, in // groups, d0, d1, count)``.
    """

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0, dense_kernel_size=1,
                 dilated_kernel_size=1, groups=1, bias=True, padding_mode="zeros", version="gauss", method="auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, _ntuple(2)(dense_kernel_size),
                         _ntuple(1)(dilated_kernel_size), groups, bias, padding_mode, version,
                         conv_dims=3, position_init="uniform", method=method)


class Dcls3_2d(_DclsN_Md):
    """3-D convolution, kernel dense along axis 0 and learned along axes 1, 2.

    ``weight`` ``(out, in // groups, dense, count)``, ``P``/``SIG`` ``(2, out, in // groups, dense,
    count)``; rows of ``P`` follow Dcls2d's order (for "v1"/"max"/"gauss" ``P[0]`` moves axis 2).
    Not in the reference package.
    """

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0, dense_kernel_size=1,
                 dilated_kernel_size=1, groups=1, bias=True, padding_mode="zeros", version="gauss", method="auto"):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, _ntuple(1)(dense_kernel_size),
                         _ntuple(2)(dilated_kernel_size), groups, bias, padding_mode, version,
                         conv_dims=3, position_init="uniform", method=method)


class Dcls2dK1d(_DclsNd):
    """2-D convolution with a 1-D learned kernel (reference: ``Dcls2dK1d``).

    The kernel is ``(dilated, 1)`` for ``flat_dim=0`` and ``(1, dilated)`` for ``flat_dim=1``, as
    in the reference; ``weight`` ``(out, in // groups, count)``, ``P``/``SIG`` ``(1, out, in // groups, count)``.
    """

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0, dilated_kernel_size=1,
                 groups=1, bias=True, padding_mode="zeros", version="v1", flat_dim=0, method="auto"):
        if flat_dim not in (0, 1):
            raise ValueError(f"flat_dim must be 0 or 1, got {flat_dim!r}")
        (size,) = _ntuple(1)(dilated_kernel_size)
        super().__init__(in_channels, out_channels, kernel_count, stride, padding, (), (size,), groups, bias,
                         padding_mode, version, conv_dims=2, position_init="normal",
                         conv_kernel_size=(size, 1) if flat_dim == 0 else (1, size), method=method)
        self.flat_dim = flat_dim


for _layer, _dck in ((Dcls1d, ConstructKernel1d), (Dcls2d, ConstructKernel2d), (Dcls3d, ConstructKernel3d),
                    (Dcls2_1d, ConstructKernel2_1d), (Dcls3_1d, ConstructKernel3_1d), (Dcls3_2d, ConstructKernel3_2d),
                    (Dcls2dK1d, ConstructKernel1d)):
    _layer._construct_kernel_class = _dck

LAYERS = (Dcls1d, Dcls2d, Dcls3d, Dcls2_1d, Dcls3_1d, Dcls3_2d, Dcls2dK1d)
