"""The cost model behind ``method="auto"``: construct + dense convolution, or the direct convolution?

Both routes compute the same output (SPEC section 9); they differ in how much arithmetic they do.
Per output point (one batch index, one output position) and output channel:

* **construct**: torch's dense convolution multiplies every cell of the kernel,
  ``Cg * prod(sizes)`` multiply-adds (``Cg = in_channels // groups``); building ``K`` costs
  little next to it (it does not scale with the batch or the image);
* **direct**: only the cells the elements touch, ``Cg * prod(dense) * count * taps``
  multiply-adds, where ``taps`` is the number of cells one element touches:
  ``2**M`` for bilinear, ``prod(min(size, 2 * ceil(w) + 1))`` for triangle of width ``w``, and
  ``prod(min(size, 2 * ceil(cut * w) + 1))`` for gauss, ``cut`` being where the profile falls
  below the working precision's rounding (:data:`GAUSS_CUT`).

The two kinds of multiply-add do not run at the same speed: torch's dense convolution is a
tuned GEMM (or, for depthwise layers, a tuned direct loop), the direct route gathers shifted
input windows. The model therefore compares *times*, ``work / rate``, with one measured rate
per route and per regime (depthwise, ``Cg == 1``, or channel-mixing, ``Cg > 1``), and adds a
fixed cost per call to each route. The forward and the backward scale alike (each does about
three times the forward's multiply-adds), so rates are rates of forward + backward together.

The constants in :data:`RATES` are calibrated, not guessed: :func:`ndcls.bench.conv.calibrate`
times both routes side by side on the benchmark shapes and reports the rate each one achieved;
docs/torch.md ("Choosing the route") records the run and the rule used to set them. Any route
choice can be checked against measurement with ``ndcls bench --sections conv``, which prints the
route "auto" picks next to the measured times.

The direct route's taps are counted merged per channel pair, so at most the kernel's cells:
both the CPU kernels (where a pair's elements share cells) and the GPU kernels gather each
touched cell of a channel pair once. CUDA tensors use :data:`GPU_RATES` (construct + cuDNN
against the cupy backend's direct convolution, measured on an H100). "auto" never picks the direct route where
the layer cannot use it as is: where the default backend has no ``conv``
(:func:`direct_available`), with a non-zero ``padding_mode`` (the input would be padded by copy
first) and for ``Dcls2dK1d``'s reshaped kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ndcls._spec import gauss_cut

#: gauss profile cut, in widths, per working precision (the one :func:`ndcls.gauss_cut` the kernels use)
GAUSS_CUT = {"float32": gauss_cut("float32"), "float64": gauss_cut("float64")}


@dataclass(frozen=True)
class Rates:
    """Multiply-adds per second of forward + backward, and seconds per call, of each route (CPU)."""

    dense_depthwise: float  # torch's depthwise convolution (Cg == 1), per kernel cell
    dense_mixing: float  # torch's convolution with Cg > 1 (GEMM), per kernel cell
    direct_depthwise: float  # ndcls.conv, per touched cell, Cg == 1
    direct_mixing: float  # ndcls.conv, per touched cell, Cg > 1
    construct_per_element: float  # seconds per element tap to build K and back-propagate to it
    call_construct: float  # fixed seconds per forward + backward call
    call_direct: float


#: Calibrated on this project's 2-core CPU machine by ``ndcls bench --sections conv,threads,overhead``
#: (2026-11-23, after the vectorized direct kernels; docs/benchmarks.md); docs/torch.md, "Choosing
#: the route", says how. The route rates are the medians per regime over the benchmark shapes, the
#: call costs the times of a tiny layer, ``construct_per_element`` the construction benchmark's
#: cost per element tap (about 1e-8 s, ConvNeXt-768 bilinear and gauss).
RATES = Rates(
    dense_depthwise=1.66e9,
    dense_mixing=2.42e10,
    direct_depthwise=9.96e9,
    direct_mixing=9.24e9,
    construct_per_element=1.0e-8,
    call_construct=2.8e-4,
    call_direct=6.2e-4,
)


#: The same rates for CUDA tensors (construct + cuDNN against the cupy backend's direct
#: convolution), calibrated by ``python benchmarks/bench_gpu.py`` on an H100 (docs/benchmarks.md,
#: "Direct convolution on the GPU"), with the cupy conv kernels of commit 64e77fb (not yet
#: re-measured with the current ones: docs/conv.md, section 7).
GPU_RATES = Rates(
    dense_depthwise=4.64e11,
    dense_mixing=1.69e13,
    direct_depthwise=6.34e11,
    direct_mixing=2.71e11,
    construct_per_element=1.0e-8,
    call_construct=1.92e-3,
    call_direct=2.89e-3,
)


def direct_available(device: str) -> bool:
    """Whether the default backend for ``device`` arrays implements the direct convolution."""
    from ndcls._registry import default_backend, operation_backends

    return default_backend(device).name in operation_backends("conv")


def taps_per_element(interpolation: str, learned_sizes: Sequence[int], width: Optional[float] = None,
                     dtype: str = "float32") -> int:
    """Cells one element touches: ``2**M`` (bilinear) or its (cut) support, capped by the kernel.

    The same count as ``ndcls._spec.taps_per_element`` (a test holds them equal), written with
    plain loops on Python numbers: layers call it in ``forward``, where ``torch.compile`` traces
    it, and dynamo cannot trace generator expressions or NumPy calls on Python floats.
    """
    if interpolation == "bilinear":
        per_axis = 2
    elif width is None or not math.isfinite(width):
        per_axis = None  # unknown width: the whole kernel
    else:
        reach = width * (1.0 if interpolation == "triangle" else GAUSS_CUT.get(dtype, GAUSS_CUT["float64"]))
        per_axis = 2 * math.ceil(reach) + 1
    taps = 1
    for s in learned_sizes:
        taps *= s if per_axis is None else min(s, per_axis)
    return taps


def estimate(
    *,
    batch: int,
    out_channels: int,
    in_per_group: int,
    out_spatial: Sequence[int],
    sizes: Sequence[int],
    learned_dims: Sequence[int],
    count: int,
    interpolation: str,
    width: Optional[float] = None,
    dtype: str = "float32",
    rates: Optional[Rates] = None,
    device: str = "cpu",
) -> dict:
    """Estimated seconds of forward + backward by each route, with the work behind them.

    ``width`` is the mean effective width of the elements (triangle, gauss); ``sizes`` are the N
    kernel sizes and ``learned_dims`` the M learned axes (the others are dense). ``device``
    ("cpu" or "cuda") picks the default rates. The direct route's taps per channel pair are
    counted merged: at most the kernel's cells.
    """
    if rates is None:
        rates = GPU_RATES if device == "cuda" else RATES
    learned_dims = list(learned_dims)
    learned, dense, cells, points = [], 1, 1, batch * out_channels * in_per_group
    for a in range(len(sizes)):
        cells *= sizes[a]
        if a in learned_dims:
            learned.append(sizes[a])
        else:
            dense *= sizes[a]
    for n in out_spatial:
        points *= n
    taps = taps_per_element(interpolation, learned, width, dtype)
    elements = out_channels * in_per_group * dense * count
    work_dense = points * cells
    work_direct = min(points * dense * count * taps, work_dense)
    mixing = in_per_group > 1
    t_construct = (rates.call_construct + elements * taps * rates.construct_per_element
                   + work_dense / (rates.dense_mixing if mixing else rates.dense_depthwise))
    t_direct = rates.call_direct + work_direct / (rates.direct_mixing if mixing else rates.direct_depthwise)
    return dict(construct_s=t_construct, direct_s=t_direct, taps=taps, work_dense=work_dense,
                work_direct=work_direct)


def choose(**shape) -> str:
    """"direct" or "construct": the route :func:`estimate` finds cheaper (ties go to construct)."""
    e = estimate(**shape)
    return "direct" if e["direct_s"] < e["construct_s"] else "construct"
