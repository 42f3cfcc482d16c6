"""The differentiable construction: two torch custom ops over ``ndcls.construct``/``construct_grad``.

``ndcls::construct`` builds K; ``ndcls::construct_backward`` returns the three gradients. Both
have fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through them
without graph breaks, and the autograd formula of the first calls the second, so the backward
graph is traceable too. Eager calls skip the custom-op dispatch (tens of microseconds per call)
through an equivalent ``autograd.Function``; ``torch.compile`` sees the custom ops. The kernels
themselves are the array API's: tensors go through DLPack without copies (CPU tensors to the
Numba backend, CUDA tensors to CuPy on torch's current stream, results allocated by torch).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

import ndcls
from ndcls._spec import normalise_learned_dims, normalise_sizes


@torch.library.custom_op("ndcls::construct", mutates_args=())
def _construct_op(
    weight: Tensor,
    positions: Tensor,
    sizes: list[int],
    sigma: Optional[Tensor],
    interpolation: str,
    learned_dims: list[int],
) -> Tensor:
    return ndcls.construct(
        weight, positions, sizes, sigma=sigma, interpolation=interpolation, learned_dims=learned_dims
    )


@_construct_op.register_fake
def _(weight, positions, sizes, sigma, interpolation, learned_dims):
    n_dense = len(sizes) - len(learned_dims)
    batch = weight.shape[: weight.dim() - 1 - n_dense]
    return weight.new_empty((*batch, *sizes))


@torch.library.custom_op("ndcls::construct_backward", mutates_args=())
def _construct_backward_op(
    grad_kernel: Tensor,
    weight: Tensor,
    positions: Tensor,
    sizes: list[int],
    sigma: Optional[Tensor],
    interpolation: str,
    learned_dims: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    gw, gp, gs = ndcls.construct_grad(
        grad_kernel, weight, positions, sizes, sigma=sigma, interpolation=interpolation, learned_dims=learned_dims
    )
    # A custom op returns tensors: an empty one stands for "no sigma gradient" (bilinear).
    return gw, gp, (gs if gs is not None else weight.new_empty((0,)))


@_construct_backward_op.register_fake
def _(grad_kernel, weight, positions, sizes, sigma, interpolation, learned_dims):
    gs = torch.empty_like(sigma, memory_format=torch.contiguous_format) if sigma is not None else weight.new_empty((0,))
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(positions, memory_format=torch.contiguous_format),
        gs,
    )


def _setup_context(ctx, inputs, output):
    weight, positions, sizes, sigma, interpolation, learned_dims = inputs
    ctx.save_for_backward(weight, positions, sigma)
    ctx.sizes, ctx.interpolation, ctx.learned_dims = sizes, interpolation, learned_dims


def _backward(ctx, grad_kernel):
    weight, positions, sigma = ctx.saved_tensors
    need_w, need_p, _, need_s, _, _ = ctx.needs_input_grad
    if not (need_w or need_p or need_s):
        return None, None, None, None, None, None
    gw, gp, gs = _construct_backward_op(
        grad_kernel, weight, positions, ctx.sizes, sigma, ctx.interpolation, ctx.learned_dims
    )
    return (
        gw if need_w else None,
        gp if need_p else None,
        None,
        gs if (need_s and sigma is not None) else None,
        None,
        None,
    )


_construct_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerConstruct(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls: a custom op's dispatch
    costs tens of microseconds of host time per call, which for a small kernel is most of the
    work. ``torch.compile`` traces the custom ops instead (see :func:`construct`)."""

    @staticmethod
    def forward(ctx, weight, positions, sigma, sizes, interpolation, learned_dims):
        ctx.save_for_backward(weight, positions, sigma)
        ctx.sizes, ctx.interpolation, ctx.learned_dims = sizes, interpolation, learned_dims
        return ndcls.construct(weight, positions, sizes, sigma=sigma, interpolation=interpolation, learned_dims=learned_dims)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kernel):
        need_w, need_p, need_s = ctx.needs_input_grad[:3]
        if not (need_w or need_p or need_s):
            return None, None, None, None, None, None
        weight, positions, sigma = ctx.saved_tensors
        gw, gp, gs = ndcls.construct_grad(
            grad_kernel, weight, positions, ctx.sizes, sigma=sigma, interpolation=ctx.interpolation,
            learned_dims=ctx.learned_dims,
        )
        return (gw if need_w else None, gp if need_p else None, gs if need_s else None, None, None, None)


def construct(
    weight: Tensor,
    positions: Tensor,
    sizes: Sequence[int] | int,
    *,
    sigma: Optional[Tensor] = None,
    interpolation: str = "bilinear",
    learned_dims: Sequence[int] | int | None = None,
) -> Tensor:
    """Differentiable :func:`ndcls.construct` on torch tensors (CPU or CUDA).

    Args:
        weight: ``(*batch, *dense_sizes, count)`` floating tensor.
        positions: ``(M, *batch, *dense_sizes, count)`` kernel index coordinates (cell ``i`` sits
            at ``i``), same dtype and device; batch axes may be 1 (shared positions).
        sizes: the N kernel sizes.
        sigma: widths shaped like ``positions`` for "triangle" and "gauss"; None for "bilinear".
        interpolation: "bilinear", "triangle" or "gauss".
        learned_dims: the M kernel axes moved by the rows of ``positions``; default all, in order.

    Returns:
        ``K`` of shape ``(*batch, *sizes)``. Gradients flow to ``weight``, ``positions`` and
        ``sigma`` (only to those that require them; broadcast positions get summed gradients).

    Example::

        >>> import torch
        >>> from ndcls.torch_bridge import construct
        >>> w = torch.ones(4, 3, requires_grad=True)             # batch 4, count 3
        >>> p = torch.full((2, 1, 3), 2.5, requires_grad=True)   # shared by the 4 kernels
        >>> K = construct(w, p, (5, 5))
        >>> K.shape
        torch.Size([4, 5, 5])
        >>> K.sum().backward(); p.grad.shape
        torch.Size([2, 1, 3])
    """
    sizes = list(normalise_sizes(sizes, positions_shape=positions.shape))
    learned = list(normalise_learned_dims(learned_dims, len(sizes)))
    if torch.compiler.is_compiling():  # traced: the custom op, with its fake implementation
        return _construct_op(weight, positions, sizes, sigma, interpolation, learned)
    if torch.is_grad_enabled() and (
        weight.requires_grad or positions.requires_grad or (sigma is not None and sigma.requires_grad)
    ):
        return _EagerConstruct.apply(weight, positions, sigma, sizes, interpolation, learned)
    return ndcls.construct(weight, positions, sizes, sigma=sigma, interpolation=interpolation, learned_dims=learned)


# -- the direct convolution --------------------------------------------------------------------
# The op's schema has no union types: padding travels as N ints plus a string, "" for the ints,
# "same" or "valid" for torch's string forms.


def output_spatial(spatial, sizes, stride, padding, padding_str) -> list[int]:
    """Output sizes of torch's convolution (cross-correlation, no dilation) along each axis."""
    if padding_str == "same":
        return list(spatial)
    pads = [0] * len(sizes) if padding_str == "valid" else padding
    return [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(spatial, sizes, stride, pads)]


def _padding_arg(padding_ints, padding_str):
    return padding_str if padding_str else list(padding_ints)


@torch.library.custom_op("ndcls::conv", mutates_args=())
def _conv_op(
    input: Tensor,
    weight: Tensor,
    positions: Tensor,
    sizes: list[int],
    sigma: Optional[Tensor],
    interpolation: str,
    learned_dims: list[int],
    stride: list[int],
    padding: list[int],
    padding_str: str,
    groups: int,
) -> Tensor:
    return ndcls.conv(
        input, weight, positions, sizes, sigma=sigma, interpolation=interpolation, learned_dims=learned_dims,
        stride=stride, padding=_padding_arg(padding, padding_str), groups=groups,
    )


@_conv_op.register_fake
def _(input, weight, positions, sizes, sigma, interpolation, learned_dims, stride, padding, padding_str, groups):
    out = output_spatial(input.shape[2:], sizes, stride, padding, padding_str)
    return input.new_empty((input.shape[0], weight.shape[0], *out))


@torch.library.custom_op("ndcls::conv_backward", mutates_args=())
def _conv_backward_op(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    positions: Tensor,
    sizes: list[int],
    sigma: Optional[Tensor],
    interpolation: str,
    learned_dims: list[int],
    stride: list[int],
    padding: list[int],
    padding_str: str,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gi, gw, gp, gs = ndcls.conv_grad(
        grad_output, input, weight, positions, sizes, sigma=sigma, interpolation=interpolation,
        learned_dims=learned_dims, stride=stride, padding=_padding_arg(padding, padding_str), groups=groups,
    )
    return gi, gw, gp, (gs if gs is not None else weight.new_empty((0,)))


@_conv_backward_op.register_fake
def _(grad_output, input, weight, positions, sizes, sigma, interpolation, learned_dims, stride, padding,
      padding_str, groups):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(input), like(weight), like(positions), (like(sigma) if sigma is not None else weight.new_empty((0,)))


def _conv_setup_context(ctx, inputs, output):
    input, weight, positions, sizes, sigma, interpolation, learned_dims, stride, padding, padding_str, groups = inputs
    ctx.save_for_backward(input, weight, positions, sigma)
    ctx.args = (sizes, interpolation, learned_dims, stride, padding, padding_str, groups)


def _conv_backward(ctx, grad_output):
    input, weight, positions, sigma = ctx.saved_tensors
    need_i, need_w, need_p, _, need_s = ctx.needs_input_grad[:5]
    if not (need_i or need_w or need_p or need_s):
        return (None,) * 11
    sizes, interpolation, learned_dims, stride, padding, padding_str, groups = ctx.args
    gi, gw, gp, gs = _conv_backward_op(
        grad_output, input, weight, positions, sizes, sigma, interpolation, learned_dims, stride, padding,
        padding_str, groups,
    )
    return (
        gi if need_i else None,
        gw if need_w else None,
        gp if need_p else None,
        None,
        gs if (need_s and sigma is not None) else None,
    ) + (None,) * 6


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def conv(
    input: Tensor,
    weight: Tensor,
    positions: Tensor,
    sizes: Sequence[int] | int,
    *,
    sigma: Optional[Tensor] = None,
    interpolation: str = "bilinear",
    learned_dims: Sequence[int] | int | None = None,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    groups: int = 1,
) -> Tensor:
    """Differentiable :func:`ndcls.conv` on torch tensors: the DCLS convolution without building K.

    Equal (within the dtype's tolerance) to ``torch.nn.functional.conv{N}d(input, K, stride=stride,
    padding=padding, groups=groups)`` with ``K = construct(weight, positions, sizes, ...)``
    reshaped to ``(out_channels, in_channels // groups, *sizes)``, at a cost proportional to the
    cells the elements touch rather than to ``prod(sizes)``.

    Args:
        input: ``(batch, in_channels, *spatial)``, ``N = len(sizes)`` spatial axes.
        weight: ``(out_channels, in_channels // groups, *dense_sizes, count)``.
        positions: ``(M, out_channels, in_channels // groups, *dense_sizes, count)`` kernel index
            coordinates; batch axes may be 1 (positions shared by channels).
        sizes: the N kernel sizes.
        sigma, interpolation, learned_dims: as for :func:`construct`.
        stride: an int or N ints. padding: an int, N ints, ``"same"`` (stride 1) or ``"valid"``.
        groups: as for torch's convolution.

    Returns:
        ``(batch, out_channels, *out_spatial)``. Gradients flow to ``input``, ``weight``,
        ``positions`` and ``sigma``, only to those that require them.

    Example::

        >>> import torch
        >>> from ndcls.torch_bridge import conv
        >>> x = torch.randn(2, 4, 50)
        >>> w = torch.randn(8, 4, 3, requires_grad=True)          # count 3
        >>> p = torch.rand(1, 8, 4, 3) * 20                       # in a dilated size 21
        >>> y = conv(x, w, p.requires_grad_(), 21, padding="same")
        >>> y.shape
        torch.Size([2, 8, 50])
        >>> y.sum().backward(); p.grad.shape
        torch.Size([1, 8, 4, 3])
    """
    sizes = list(normalise_sizes(sizes, positions_shape=positions.shape))
    n = len(sizes)
    learned = list(normalise_learned_dims(learned_dims, n))
    stride = [int(stride)] * n if isinstance(stride, int) else [int(s) for s in stride]
    if isinstance(padding, str):
        padding_ints, padding_str = [0] * n, padding
    else:
        padding_ints, padding_str = ([int(padding)] * n if isinstance(padding, int) else [int(p) for p in padding]), ""
    return _conv_op(input, weight, positions, sizes, sigma, interpolation, learned, stride, padding_ints,
                    padding_str, int(groups))
