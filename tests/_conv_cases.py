"""Hypothesis strategies for direct-convolution cases, shared by every backend's conv tests.

Like :mod:`_cases`: hypothesis draws the structure (N, M, axis order, sizes, channels and
groups, stride, padding, broadcasting, layout), a NumPy generator seeded by a drawn integer
draws the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

import ndcls
from _cases import _noncontiguous, draw_positions, learned_row_sizes


@dataclass
class ConvCase:
    input: np.ndarray
    weight: np.ndarray
    positions: np.ndarray
    sigma: np.ndarray | None
    sizes: tuple
    learned_dims: tuple
    interpolation: str
    stride: tuple
    padding: object
    groups: int
    seed: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.weight.dtype

    def kwargs(self, **over):
        kw = dict(
            sigma=self.sigma,
            interpolation=self.interpolation,
            learned_dims=self.learned_dims,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
        )
        kw.update(over)
        return kw

    def _arrays(self, kw):
        return kw.pop("input", self.input), kw.pop("weight", self.weight), kw.pop("positions", self.positions)

    def conv(self, backend, **over):
        kw = self.kwargs(**over)
        x, w, p = self._arrays(kw)
        return ndcls.conv(x, w, p, self.sizes, backend=backend, **kw)

    def conv_grad(self, grad_output, backend, **over):
        kw = self.kwargs(**over)
        x, w, p = self._arrays(kw)
        return ndcls.conv_grad(grad_output, x, w, p, self.sizes, backend=backend, **kw)

    def kernel(self, **over):
        """The dense kernel ``K`` by the reference construction."""
        kw = self.kwargs(**over)
        _, w, p = self._arrays(kw)
        return ndcls.construct(w, p, self.sizes, backend="numpy", sigma=kw["sigma"], interpolation=self.interpolation, learned_dims=self.learned_dims)

    @property
    def spec(self):
        return ndcls.ConvSpec.from_arguments(
            input_shape=self.input.shape,
            input_dtype=self.input.dtype,
            weight_shape=self.weight.shape,
            weight_dtype=self.weight.dtype,
            positions_shape=self.positions.shape,
            positions_dtype=self.positions.dtype,
            sigma_shape=None if self.sigma is None else self.sigma.shape,
            sigma_dtype=None if self.sigma is None else self.sigma.dtype,
            sizes=self.sizes,
            interpolation=self.interpolation,
            learned_dims=self.learned_dims,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
        )

    def grad_output(self):
        rng = np.random.default_rng(self.seed + 1)
        return rng.standard_normal(self.spec.output_shape).astype(self.dtype)


@st.composite
def conv_cases(
    draw,
    *,
    max_ndim=3,
    max_size=5,
    max_batch=2,
    max_count=3,
    interpolations=ndcls.INTERPOLATIONS,
    dtypes=("float32", "float64"),
    position_mode="around",
    broadcast=True,
    noncontiguous=True,
    allow_empty=True,
    max_cells=None,
):
    """A random valid :class:`ConvCase` (``max_cells``: most kernel cells, ``prod(sizes)``)."""
    n = draw(st.integers(1, max_ndim))
    sizes = tuple(draw(st.lists(st.integers(1, max_size), min_size=n, max_size=n)))
    if max_cells is not None and math.prod(sizes) > max_cells:
        sizes = tuple(min(s, 3) for s in sizes)
    m = draw(st.integers(1, n))
    learned = tuple(draw(st.permutations(range(n)))[:m])
    groups = draw(st.integers(1, 3))
    group_in = draw(st.integers(1, 2))  # 1: depthwise when the group has one output too
    group_out = draw(st.integers(1, 2))
    batch = draw(st.integers(0 if allow_empty else 1, max_batch))
    count = draw(st.integers(1, max_count))
    interpolation = draw(st.sampled_from(interpolations))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(("int", "tuple", "same", "valid")))
    stride = tuple(draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)))
    if kind == "same":
        padding, stride, pads = "same", (1,) * n, [k - 1 for k in sizes]
    elif kind == "valid":
        padding, pads = "valid", [0] * n
    elif kind == "int":
        padding = draw(st.integers(0, 2))
        pads = [2 * padding] * n
    else:
        padding = tuple(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
        pads = [2 * p for p in padding]
    spatial = tuple(max(1, k - p) + draw(st.integers(0, 4)) for k, p in zip(sizes, pads))

    rng = np.random.default_rng(seed)
    dense = tuple(sizes[a] for a in range(n) if a not in learned)
    out_channels, in_channels = groups * group_out, groups * group_in
    w_shape = (out_channels, group_in, *dense, count)

    def shared_shape():
        po = 1 if broadcast and draw(st.booleans()) else out_channels
        pi = 1 if broadcast and draw(st.booleans()) else group_in
        return (m, po, pi, *dense, count)

    p_shape = shared_shape()
    rows = learned_row_sizes(sizes, learned)
    x = rng.standard_normal((batch, in_channels, *spatial))
    weight = rng.standard_normal(w_shape)
    positions = draw_positions(rng, p_shape, rows, position_mode)
    sigma = None
    if interpolation != "bilinear":
        sigma = rng.uniform(0.6, 2.5, size=shared_shape())
    strided = draw(st.booleans()) if noncontiguous else False
    arrays = [None if a is None else a.astype(dtype) for a in (x, weight, positions, sigma)]
    if strided:
        arrays = [None if a is None else _noncontiguous(a) for a in arrays]
    return ConvCase(
        *arrays,
        sizes=sizes,
        learned_dims=learned,
        interpolation=interpolation,
        stride=stride,
        padding=padding,
        groups=groups,
        seed=seed,
        notes=dict(strided=strided),
    )
