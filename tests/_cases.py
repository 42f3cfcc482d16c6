"""Hypothesis strategies for construction cases, shared by every backend test.

Hypothesis draws the structure (N, M, axis order, sizes, batch shape, broadcasting, count,
dtype, layout); array values come from a NumPy generator seeded by a drawn integer, which
keeps examples fast while still shrinking on structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

import ndcls


@dataclass
class Case:
    sizes: tuple
    learned_dims: tuple
    interpolation: str
    weight: np.ndarray
    positions: np.ndarray
    sigma: np.ndarray | None
    seed: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def spec(self):
        return ndcls.KernelSpec.from_arguments(
            weight_shape=self.weight.shape,
            weight_dtype=self.weight.dtype,
            positions_shape=self.positions.shape,
            positions_dtype=self.positions.dtype,
            sigma_shape=None if self.sigma is None else self.sigma.shape,
            sigma_dtype=None if self.sigma is None else self.sigma.dtype,
            sizes=self.sizes,
            interpolation=self.interpolation,
            learned_dims=self.learned_dims,
        )

    def kwargs(self, **over):
        kw = dict(sigma=self.sigma, interpolation=self.interpolation, learned_dims=self.learned_dims)
        kw.update(over)
        return kw

    def construct(self, backend, **over):
        kw = self.kwargs(**over)
        weight = kw.pop("weight", self.weight)
        positions = kw.pop("positions", self.positions)
        return ndcls.construct(weight, positions, self.sizes, backend=backend, **kw)

    def construct_grad(self, grad_kernel, backend, **over):
        kw = self.kwargs(**over)
        weight = kw.pop("weight", self.weight)
        positions = kw.pop("positions", self.positions)
        return ndcls.construct_grad(grad_kernel, weight, positions, self.sizes, backend=backend, **kw)

    def grad_kernel(self):
        rng = np.random.default_rng(self.seed + 1)
        return rng.standard_normal(self.spec.kernel_shape).astype(self.dtype)


def _noncontiguous(x):
    """A strided view with the same values (every other element of a larger array)."""
    big = np.empty(x.shape[:-1] + (2 * x.shape[-1] + 1,), dtype=x.dtype)
    big[..., 1::2] = x
    return big[..., 1::2]


def learned_row_sizes(sizes, learned_dims):
    return np.array([sizes[a] for a in learned_dims], dtype=np.float64)


def draw_positions(rng, shape, row_sizes, mode):
    """Positions of ``shape = (M, ...)``; ``mode`` 'inside' keeps them in [0, size-1],
    'around' lets them fall up to 2 cells outside, 'smooth' keeps bilinear off integers."""
    m = shape[0]
    sizes = row_sizes.reshape((m,) + (1,) * (len(shape) - 1))
    u = rng.random(shape)
    if mode == "inside":
        return u * (sizes - 1)
    if mode == "around":
        return -2 + u * (sizes + 3)
    if mode == "smooth":  # fractional part in [0.15, 0.85], from -1 to size - 1
        cell = np.floor(rng.random(shape) * (sizes + 1)) - 1
        return cell + 0.15 + 0.7 * u
    raise ValueError(mode)


@st.composite
def cases(
    draw,
    *,
    max_ndim=4,
    max_size=6,
    max_batch=3,
    max_count=4,
    interpolations=ndcls.INTERPOLATIONS,
    dtypes=("float32", "float64"),
    position_mode="inside",
    broadcast=True,
    noncontiguous=True,
    allow_empty=True,
    max_cells=4096,
):
    """A random valid :class:`Case`."""
    n = draw(st.integers(1, max_ndim))
    sizes = tuple(draw(st.lists(st.integers(1, max_size), min_size=n, max_size=n)))
    m = draw(st.integers(1, n))
    learned = tuple(draw(st.permutations(range(n)))[:m])
    batch = tuple(draw(st.lists(st.integers(0 if allow_empty else 1, max_batch), min_size=0, max_size=2)))
    count = draw(st.integers(1, max_count))
    interpolation = draw(st.sampled_from(interpolations))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    seed = draw(st.integers(0, 2**31 - 1))
    bcast = tuple(draw(st.booleans()) if broadcast else False for _ in batch)
    strided = draw(st.booleans()) if noncontiguous else False
    if math.prod(batch) * math.prod(sizes) * count > max_cells:
        sizes = tuple(min(s, 3) for s in sizes)
        batch = tuple(min(b, 2) for b in batch)

    rng = np.random.default_rng(seed)
    dense = tuple(sizes[a] for a in range(n) if a not in learned)
    w_shape = (*batch, *dense, count)
    p_shape = (m, *(1 if bc else b for b, bc in zip(batch, bcast)), *dense, count)
    rows = learned_row_sizes(sizes, learned)
    weight = rng.standard_normal(w_shape)
    positions = draw_positions(rng, p_shape, rows, position_mode)
    sigma = None
    if interpolation != "bilinear":
        sigma = rng.uniform(0.6, 2.5, size=p_shape)
    arrays = [weight, positions, sigma]
    arrays = [None if x is None else x.astype(dtype) for x in arrays]
    if strided:
        arrays = [None if x is None else _noncontiguous(x) for x in arrays]
    return Case(sizes, learned, interpolation, *arrays, seed=seed, notes=dict(strided=strided, broadcast=bcast))


def poison(case, seed, bad_positions, bad_sigmas, fraction=0.3):
    """``case``'s positions and widths with a random ``fraction`` replaced by values drawn from
    ``bad_positions`` / ``bad_sigmas`` (NaN, inf, far, zero, negative, tiny...)."""
    rng = np.random.default_rng(seed)
    p = np.array(case.positions)
    hit = rng.random(p.shape) < fraction
    p[hit] = rng.choice(bad_positions, size=int(hit.sum()))
    s = None
    if case.sigma is not None:
        s = np.array(case.sigma)
        hit = rng.random(s.shape) < fraction
        s[hit] = rng.choice(bad_sigmas, size=int(hit.sum()))
    with np.errstate(all="ignore"):
        return p.astype(case.dtype), None if s is None else s.astype(case.dtype)
