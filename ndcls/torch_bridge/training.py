"""Training helpers used with DCLS layers: optimizer groups, shared positions, sigma schedule,
repulsion loss, export to a plain convolution, and reference checkpoint conversion."""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ndcls.torch_bridge._ops import construct
from ndcls.torch_bridge.layers import _DclsNMd

_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def dcls_layers(model: nn.Module) -> Iterator[tuple[str, _DclsNMd]]:
    """``(name, layer)`` for every DCLS layer in ``model`` (``model`` itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, _DclsNMd):
            yield name, module


def clamp_parameters(model: nn.Module) -> None:
    """Call ``clamp_parameters`` on every DCLS layer (after each optimizer step)."""
    for _, layer in dcls_layers(model):
        layer.clamp_parameters()


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    *,
    positions_lr_factor: float = 5.0,
    sigma_lr_factor: float = 1.0,
    no_decay_1d: bool = True,
) -> list[dict]:
    """Optimizer parameter groups for a model with DCLS layers.

    Positions (``P``) get ``lr * positions_lr_factor`` and sigmas (``SIG``) ``lr * sigma_lr_factor``,
    both without weight decay (decaying them would pull elements to the kernel centre). The
    other parameters get ``lr`` and ``weight_decay``, except (``no_decay_1d``) biases and other
    1-D parameters such as normalisation scales. Parameters shared between layers appear once;
    frozen ones (``requires_grad=False``) are left out. Empty groups are dropped.

    Example::

        >>> opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05))
    """
    positions, sigmas = set(), set()
    for _, layer in dcls_layers(model):
        positions.add(id(layer.P))
        if layer.SIG is not None:
            sigmas.add(id(layer.SIG))
    groups = {
        "decay": dict(params=[], lr=lr, weight_decay=weight_decay),
        "no_decay": dict(params=[], lr=lr, weight_decay=0.0),
        "positions": dict(params=[], lr=lr * positions_lr_factor, weight_decay=0.0),
        "sigma": dict(params=[], lr=lr * sigma_lr_factor, weight_decay=0.0),
    }
    for p in model.parameters():  # yields each shared parameter once
        if not p.requires_grad:
            continue
        if id(p) in positions:
            key = "positions"
        elif id(p) in sigmas:
            key = "sigma"
        elif no_decay_1d and p.ndim <= 1:
            key = "no_decay"
        else:
            key = "decay"
        groups[key]["params"].append(p)
    return [dict(name=k, **g) for k, g in groups.items() if g["params"]]


def share_positions(layers: Sequence[_DclsNMd], *, sigma: bool = True) -> None:
    """Make every layer use the first layer's ``P`` (and ``SIG`` if ``sigma``) parameter.

    Used to share the learned element positions across the blocks of a stage. The layers must
    have the same ``P`` shape (and version); their weights stay independent.
    """
    layers = list(layers)
    if not layers:
        return
    first = layers[0]
    for i, layer in enumerate(layers[1:], 1):
        if not isinstance(layer, _DclsNMd):
            raise TypeError(f"layers[{i}] is a {type(layer).__name__}, not a DCLS layer")
        if layer.P.shape != first.P.shape or layer.row_axes != first.row_axes or layer.kernel_sizes != first.kernel_sizes:
            raise ValueError(
                f"layers[{i}] cannot share positions with layers[0]: P shapes {tuple(layer.P.shape)} vs "
                f"{tuple(first.P.shape)}, kernel sizes {layer.kernel_sizes} vs {first.kernel_sizes}, "
                f"versions {layer.version!r} vs {first.version!r}"
            )
        layer.P = first.P
        if sigma and first.SIG is not None:
            if layer.SIG is None:
                raise ValueError(f"layers[{i}] (version {layer.version!r}) has no SIG to share")
            layer.SIG = first.SIG


class SigmaSchedule:
    """Decay of the Gaussian width from ``start`` to a floor ``end`` over a fraction of training.

    As done for learned delays (Hammouamri et al., 2023): ``SIG`` is frozen and, at step ``t`` of
    ``total_steps``, set to ``start * (end / start) ** (t / T)`` (``mode="exponential"``) or the
    linear interpolation (``mode="linear"``), with ``T = fraction * total_steps``; after ``T`` it
    stays at ``end``. Values are those of the ``SIG`` parameter; a "gauss" layer's effective
    width is ``abs(SIG) + 0.27``, a "max" layer's ``abs(SIG) + 1``.

    Example::

        >>> schedule = SigmaSchedule(start=max_delay // 2, end=0.23, total_steps=epochs, fraction=0.25)
        >>> for epoch in range(epochs):
        ...     schedule.apply(model, epoch)   # before the epoch's training steps
    """

    def __init__(self, start: float, end: float = 0.23, *, total_steps: int, fraction: float = 0.25,
                 mode: str = "exponential") -> None:
        if mode not in ("exponential", "linear"):
            raise ValueError(f"mode must be 'exponential' or 'linear', got {mode!r}")
        if not (start > 0 and end > 0):
            raise ValueError(f"start and end must be > 0, got start={start}, end={end}")
        if total_steps < 1 or not 0 < fraction <= 1:
            raise ValueError(f"need total_steps >= 1 and 0 < fraction <= 1, got {total_steps}, {fraction}")
        self.start, self.end, self.mode = float(start), float(end), mode
        self.decay_steps = max(1, math.ceil(fraction * total_steps))

    def value(self, step: int) -> float:
        """The ``SIG`` value at ``step``."""
        t = min(max(step, 0), self.decay_steps) / self.decay_steps
        if self.mode == "linear":
            return self.start + (self.end - self.start) * t
        return self.start * (self.end / self.start) ** t

    @torch.no_grad()
    def apply(self, model: nn.Module, step: int) -> float:
        """Fill ``SIG`` of every DCLS layer of ``model`` with :meth:`value` and return it."""
        value = self.value(step)
        for _, layer in dcls_layers(model):
            if layer.SIG is not None:
                layer.SIG.fill_(value)
        return value


def repulsion_loss(layer: _DclsNMd, radius: float = 1.0) -> Tensor:
    """Penalty on kernel elements closer than ``radius`` (in kernel cells) to one another.

    For every kernel (each output channel, input channel and dense index), every pair of its
    ``count`` elements at distance ``d < radius`` adds ``(radius - d) ** 2``; the result is the
    mean over all pairs (0 when every pair is at least ``radius`` apart). Add it, weighted, to
    the training loss to keep elements from collapsing onto the same cells.
    """
    p = layer.kernel_positions()  # (M, *batch, count)
    p = p.flatten(1, -2)  # (M, B, C)
    diff = p.unsqueeze(-1) - p.unsqueeze(-2)  # (M, B, C, C)
    # sqrt is not differentiable at 0: keep a tiny floor so coincident elements still get pushed
    dist = (diff.square().sum(0) + 1e-12).sqrt()
    count = p.shape[-1]
    pairs = torch.triu(torch.ones(count, count, dtype=torch.bool, device=p.device), diagonal=1)
    if not pairs.any():
        return p.new_zeros(())
    return (radius - dist[:, pairs]).clamp_min(0).square().mean()


@torch.no_grad()
def to_conv(layer: _DclsNMd, *, round_positions: bool = False) -> nn.Module:
    """A plain ``nn.Conv1d/2d/3d`` computing what ``layer`` computes, with the constructed kernel.

    With ``round_positions`` every element is placed on its nearest cell (inside the kernel) with
    its full weight, the integer-position kernel a trained DCLS layer is often deployed with.
    """
    if round_positions:
        positions = layer.kernel_positions().round()
        for j, a in enumerate(layer.row_axes):
            positions[j].clamp_(0, layer.kernel_sizes[a] - 1)
        kernel = construct(layer.weight, positions, layer.kernel_sizes, learned_dims=layer.row_axes)
        kernel = kernel.reshape(layer.out_channels, layer.in_channels // layer.groups, *layer.conv_kernel_size)
    else:
        kernel = layer.construct_kernel()
    conv = _CONV_CLASSES[layer.conv_dims](
        layer.in_channels, layer.out_channels, layer.conv_kernel_size, stride=layer.stride,
        padding=layer.padding, groups=layer.groups, bias=layer.bias is not None,
        padding_mode=layer.padding_mode, device=layer.weight.device, dtype=layer.weight.dtype,
    )
    conv.weight.copy_(kernel)
    if layer.bias is not None:
        conv.bias.copy_(layer.bias)
    return conv


def reference_position_shift(layer: _DclsNMd) -> list[float]:
    """Per row of ``P``: what to add to a reference checkpoint's ``P`` for ``layer``.

    The reference centres row ``j`` with ``size[j] // 2`` (size of kernel axis ``j``) although
    the row moves axis ``row_axes[j]``; the layers centre it with that axis's size. The shift is
    zero for square and cubic kernels and for the N-M-D layers.
    """
    if layer.dense_kernel_size:  # the reference's N-M-D layers learn one axis: centred correctly
        return [0.0] * len(layer.row_axes)
    sizes = layer.kernel_sizes
    return [float(sizes[j] // 2 - sizes[a] // 2) for j, a in enumerate(layer.row_axes)]


def convert_reference_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A reference (``dcls`` package) state dict, converted for ``model`` built from these layers.

    Parameter names and shapes are the same; only ``P`` of layers with non-square (non-cubic)
    kernels changes, shifted so that the converted model computes exactly what the reference
    model computed. The result is a new dict (the input is not modified); pass it to
    ``model.load_state_dict``. Shifted positions may lie outside the kernel, where the
    reference let them drift: :meth:`clamp_parameters` pulls them back in when training resumes.
    """
    out = dict(state_dict)
    for name, layer in dcls_layers(model):
        key = f"{name}.P" if name else "P"
        if key not in out:
            continue
        shift = reference_position_shift(layer)
        if any(shift):
            P = out[key]
            out[key] = P + torch.tensor(shift, dtype=P.dtype, device=P.device).view(-1, *([1] * (P.dim() - 1)))
    return out
