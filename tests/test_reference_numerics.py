"""The NumPy reference on its own: hand-computed normalised values (the eps of the normaliser
included), and exactness on the adversarial cases against the plain quotient rule evaluated
with 60 significant digits (mpmath)."""

import math

import numpy as np
import pytest

import ndcls
from _cases import ADVERSARIAL, adversarial_cases

mpmath = pytest.importorskip("mpmath")
EPS = 1e-7  # SPEC section 3, written out here on purpose


def _reference(case, g):
    return case.construct("numpy"), case.construct_grad(g, "numpy")


def test_triangle_value_with_eps_by_hand():
    """One element reaching a quarter cell into the kernel: K = w a / (a + eps), not w."""
    w, p, s = 2.0, -0.5, 0.75
    a = s - (0 - p)  # 0.25 at cell 0, nothing at cells 1 and 2
    k = ndcls.construct(np.array([w]), np.array([[p]]), (3,), sigma=np.array([[s]]), interpolation="triangle", backend="numpy")
    np.testing.assert_allclose(k, [w * a / (a + EPS), 0.0, 0.0], rtol=1e-15, atol=0)
    assert abs(k[0] - w) > 5e-7  # the eps term is visible at this precision
    g = np.array([1.5, -3.0, 7.0])
    gw, gp, gs = ndcls.construct_grad(g, np.array([w]), np.array([[p]]), (3,), sigma=np.array([[s]]),
                                      interpolation="triangle", backend="numpy")  # fmt: skip
    # d/dp and d/ds of w a / (a + eps) with da/dp = da/ds = 1 (cell 0 lies right of p)
    np.testing.assert_allclose(gw, [g[0] * a / (a + EPS)], rtol=1e-15)
    np.testing.assert_allclose(gp, [[g[0] * w * EPS / (a + EPS) ** 2]], rtol=1e-12)
    np.testing.assert_allclose(gs, [[g[0] * w * EPS / (a + EPS) ** 2]], rtol=1e-12)


def test_gauss_2d_value_by_hand():
    p, s, w = (0.0, 1.0), (1.0, 0.5), 3.0
    rows = [[math.exp(-0.5 * ((i - p[j]) / s[j]) ** 2) for i in range(n)] for j, n in enumerate((2, 3))]
    z = sum(rows[0]) * sum(rows[1]) + EPS
    expected = [[w * x * y / z for y in rows[1]] for x in rows[0]]
    k = ndcls.construct(np.array([w]), np.array(p)[:, None], (2, 3), sigma=np.array(s)[:, None], interpolation="gauss",
                        backend="numpy")  # fmt: skip
    np.testing.assert_allclose(k, expected, rtol=1e-14, atol=0)


def _exact(case, g):
    """K and the gradients of ``case`` (float64 inputs, learned axes only, no batch) by the plain
    quotient rule of SPEC sections 3-4, in 60-digit arithmetic."""
    mp = mpmath.mp
    mp.dps = 60
    m, count = case.positions.shape
    sizes = case.sizes
    kind = case.interpolation
    k = np.zeros(sizes, dtype=object)
    k[...] = mp.mpf(0)
    gw, gp, gs = [None] * count, np.empty((m, count), dtype=object), np.empty((m, count), dtype=object)
    for c in range(count):
        w = mp.mpf(float(case.weight[c]))
        a, dp, ds = [], [], []
        for j in range(m):
            p, s = mp.mpf(float(case.positions[j, c])), mp.mpf(float(case.sigma[j, c]))
            row, rp, rs = [], [], []
            for i in range(sizes[j]):
                x = mp.mpf(i)
                if kind == "triangle":
                    inside = abs(x - p) < s
                    row.append(s - abs(x - p) if inside else mp.mpf(0))
                    rp.append(mp.sign(x - p) if inside else mp.mpf(0))
                    rs.append(mp.mpf(1) if inside else mp.mpf(0))
                else:
                    u = (x - p) / s
                    v = mp.exp(-u * u / 2)
                    row.append(v)
                    rp.append(v * u / s)
                    rs.append(v * u * u / s)
            a.append(row), dp.append(rp), ds.append(rs)
        sums = [mp.fsum(row) for row in a]
        z = mp.fprod(sums) + mp.mpf(EPS)
        t = mp.mpf(0)
        u_p, u_s = [mp.mpf(0)] * m, [mp.mpf(0)] * m
        for cell in np.ndindex(*sizes):
            gc = mp.mpf(float(g[cell]))
            prod = mp.fprod(a[j][cell[j]] for j in range(m))
            k[cell] += w * prod / z
            t += gc * prod
            for j in range(m):
                rest = mp.fprod(a[i][cell[i]] for i in range(m) if i != j)
                u_p[j] += gc * dp[j][cell[j]] * rest
                u_s[j] += gc * ds[j][cell[j]] * rest
        gw[c] = t / z
        for j in range(m):
            others = mp.fprod(sums[i] for i in range(m) if i != j)
            gp[j, c] = w * (u_p[j] / z - t * mp.fsum(dp[j]) * others / z**2)
            gs[j, c] = w * (u_s[j] / z - t * mp.fsum(ds[j]) * others / z**2)
    return k, np.array(gw, dtype=object), gp, gs


def _to_float(x):
    """mpf -> float64 as the final rounding would give it (+-inf beyond the range)."""
    return np.array([float(v) if abs(v) < 1.7976931348623157e308 else math.copysign(math.inf, float(mpmath.sign(v)))
                     for v in np.ravel(x)]).reshape(np.shape(x))  # fmt: skip


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_reference_is_exact_on_adversarial_cases(name):
    """Elements mostly outside, tiny, subnormal and huge widths: the float64 reference equals the
    exact values to 1e-12 relative (+-inf where they exceed float64), never NaN."""
    case = adversarial_cases("float64")[name]
    g = case.grad_kernel()
    k, grads = _reference(case, g)
    exact_k, *exact_grads = _exact(case, g)
    wants = [_to_float(x) for x in (exact_k, *exact_grads)]
    # per element: the largest magnitude of its finite gradients (huge widths make every gradient
    # tiny, and components far below that are beyond what float64 profiles can represent)
    scale = np.zeros(case.weight.shape)
    for want in wants[1:]:
        x = np.abs(np.where(np.isfinite(want), want, 0.0))
        scale = np.maximum(scale, x if x.shape == scale.shape else x.max(axis=0))
    for i, (what, got, want) in enumerate(zip(("K", "grad_weight", "grad_positions", "grad_sigma"), (k, *grads), wants)):
        assert not np.isnan(got).any(), f"{what}: NaN"
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"{what}: +inf pattern")
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{what}: -inf pattern")
        finite = np.isfinite(want)
        floor = np.abs(want[finite]).max(initial=0.0) if i == 0 else np.broadcast_to(scale, want.shape)[finite]
        err = np.abs(got[finite] - want[finite])
        bound = 1e-12 * (np.abs(want[finite]) + floor)
        assert (err <= bound).all(), f"{what}: {got[finite][err > bound]} vs exact {want[finite][err > bound]}"
