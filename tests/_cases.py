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
    min_size=1,
    min_count=1,
    min_ndim=1,
):
    """A random valid :class:`Case` (``min_*``: for shapes that reach a given launch path)."""
    n = draw(st.integers(min_ndim, max_ndim))
    sizes = tuple(draw(st.lists(st.integers(min_size, max_size), min_size=n, max_size=n)))
    m = draw(st.integers(1, n))
    learned = tuple(draw(st.permutations(range(n)))[:m])
    batch = tuple(draw(st.lists(st.integers(0 if allow_empty else 1, max_batch), min_size=0, max_size=2)))
    count = draw(st.integers(min_count, max_count))
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


# -- standing adversarial cases for the normalised kinds (fixed, explicit) -------------------------


def _tiny_normal(dtype):
    """A width far below a cell but normal in ``dtype``."""
    return 1e-30


def _subnormal(dtype):
    return {np.float32: 1e-42, np.float64: 1e-310}[np.dtype(dtype).type]


def _huge(dtype):
    """Widths whose Z * Z overflows in ``dtype`` (``Z ~ size * s``)."""
    return {np.float32: (1e20, 1e30, 1e36), np.float64: (1e150, 1e155, 1e160)}[np.dtype(dtype).type]


def _adversarial_specs(dtype):
    """name -> (sizes, interpolation, positions rows, sigma rows): one element per column."""
    near = (0.3, 1e-2, 1e-4, 1e-6)  # how far an element reaches into the kernel
    s, tiny, sub = 0.75, _tiny_normal(dtype), _subnormal(dtype)
    fractions = (0.0, 0.2, 0.49, 0.5, 0.51, 0.7, 0.99)  # both sides of 0.5 (gauss recurrence start)
    off = [3 - 2e-6, 3 - 5e-7, 2 + 1e-6]
    h = _huge(dtype)
    return {
        # elements almost entirely outside the kernel: S tiny, near or below eps
        "triangle-outside-1d": ((5,), "triangle", [[-(s - a) for a in near] + [4 + s - a for a in near]], [[s] * 8]),
        "triangle-outside-3d": (
            (3, 4, 2), "triangle",
            [[-0.7, -0.7499, 1.2, 2.7499, 0.5], [1.5, 2.2, -0.7499, 3.0, -1.2999], [0.5, -0.749, 1.74999, 0.3, 1.0]],
            [[0.75, 0.75, 1.3, 0.75, 0.75], [0.75, 1.3, 0.75, 2.2, 1.3], [0.75, 0.75, 0.75, 2.2, 0.6]],
        ),
        "gauss-outside-2d": (
            (4, 5), "gauss",
            [[-3.0, -4.5, 6.5, 1.5, -2.2], [2.0, -2.2, 1.0, 8.0, 2.0]],
            [[0.6, 0.6, 0.6, 2.5, 0.6], [0.6, 0.6, 1.0, 0.6, 0.6]],
        ),
        # widths far below a cell, positions with fractions on both sides of 0.5
        # (and just below or above an integer: a few widths away, the profile is not all 0)
        "triangle-tiny-widths": ((6,), "triangle", [[2 + f for f in fractions] * 2 + off], [[1e-6] * 7 + [tiny] * 7 + [1e-6] * 3]),
        "gauss-tiny-widths": ((6,), "gauss", [[2 + f for f in fractions] * 2 + off], [[1e-6] * 7 + [tiny] * 7 + [1e-6] * 3]),
        "gauss-tiny-widths-2d": (
            (4, 3), "gauss",
            [[1.7, 2.0, 0.3, 3.0, 2.51], [1.0, 0.6, 2.0, 1.49, 2.0]],
            [[1e-6, tiny, 1e-6, tiny, 0.3], [1e-6, tiny, tiny, 1e-6, 1e-6]],
        ),
        # narrow elements halfway between cells: a Gaussian cut measured from p instead of from
        # the nearest cell would drop both cells, which still hold a visible share of K
        "gauss-narrow-between-cells": ((4,), "gauss", [[1.5, 0.5, 2.5, 1.45]], [[0.08, 0.07, 0.085, 0.075]]),
        # subnormal widths: gradients too large for the dtype must be +-inf, never NaN
        "triangle-subnormal-widths": ((4,), "triangle", [[0.0, sub / 2, 2.0, 1.5]], [[sub] * 4]),
        "gauss-subnormal-widths": ((4,), "gauss", [[0.0, sub, sub / 2, 2.0, 1.5]], [[sub] * 5]),
        # huge widths: Z and Z * Z overflow, the normalised kernel does not
        "triangle-huge-widths-1d": ((4,), "triangle", [[0.5, 1.3, 2.9]], [list(h)]),
        "triangle-huge-widths-2d": ((3, 5), "triangle", [[0.5, 1.3, 2.0], [4.2, 0.0, 2.5]], [list(h), list(h[::-1])]),
        "triangle-huge-widths-3d": ((2, 3, 4), "triangle", [[0.5, 1.0], [1.3, 0.2], [2.9, 3.5]], [[h[0], h[2]], [h[1], 0.7], [h[2], h[0]]]),
        "gauss-huge-widths-2d": ((3, 4), "gauss", [[0.5, 1.3, 2.0], [2.2, 0.0, 3.5]], [list(h), [h[1], 0.7, h[0]]]),
    }  # fmt: skip


def adversarial_cases(dtype):
    """name -> :class:`Case`: the fixed adversarial cases in ``dtype`` (weights from a fixed seed)."""
    out = {}
    for i, (name, (sizes, interpolation, positions, sigma)) in enumerate(_adversarial_specs(dtype).items()):
        p = np.array(positions, dtype=np.float64)
        rng = np.random.default_rng(100 + i)
        w = rng.uniform(0.5, 2.0, p.shape[1:]) * rng.choice([-1.0, 1.0], p.shape[1:])
        with np.errstate(under="ignore"):
            arrays = [x.astype(dtype) for x in (w, p, np.array(sigma, dtype=np.float64))]
        out[name] = Case(sizes, tuple(range(len(sizes))), interpolation, *arrays, seed=i)
    return out


ADVERSARIAL = tuple(_adversarial_specs(np.float64))


def check_against_reference(case, backend, grad_kernels=None):
    """``backend`` equals the NumPy reference on ``case``: K and the gradients (for a random
    ``dL/dK`` and a constant one, whose gradients are pure eps terms), with the same NaN and
    +-inf patterns, within the dtype's tolerance taken relative to each element's own gradients
    (not only to the largest of the array, which one far-reaching element can make huge)."""
    from _tolerances import TOLERANCES, assert_close

    def same(actual, expected, what):
        assert_close(actual, expected, what=what)
        np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg=f"{what}: +inf pattern")
        np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=f"{what}: -inf pattern")

    same(case.construct(backend), case.construct("numpy"), "K")
    if grad_kernels is None:
        grad_kernels = (case.grad_kernel(), np.ones(case.spec.kernel_shape, dtype=case.dtype))
    tol = TOLERANCES[np.dtype(case.dtype)]
    for g in grad_kernels:
        got, expected = case.construct_grad(g, backend), case.construct_grad(g, "numpy")
        scale = np.ones(case.weight.shape)  # per element: max(1, |its largest finite gradient|)
        for e in expected:
            if e is not None:
                e = np.abs(np.where(np.isfinite(e), e, 0.0)).astype(np.float64)
                scale = np.maximum(scale, e if e.shape == scale.shape else e.max(axis=0))
        for name, a, e in zip(("weight", "positions", "sigma"), got, expected):
            if e is None:
                assert a is None, f"grad_{name} must be None for bilinear"
                continue
            same(a, e, f"grad_{name}")
            finite = np.isfinite(e)
            err = np.abs(np.where(finite, a.astype(np.float64) - e.astype(np.float64), 0.0))
            bound = tol["rtol"] * np.abs(np.where(finite, e, 0.0)) + tol["atol"] * np.broadcast_to(scale, e.shape)
            bad = np.argwhere(err > bound)
            assert not len(bad), f"grad_{name} at {bad[0]}: {a[tuple(bad[0])]} vs reference {e[tuple(bad[0])]} (element scale)"
