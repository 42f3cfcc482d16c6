"""ndcls demo: the optimal assignment, convergence of the teacher-student task, determinism, the figure."""

import itertools

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from ndcls import demo  # noqa: E402


@pytest.mark.parametrize("n", [1, 3, 8])
def test_assignment_is_optimal(n):
    rng = np.random.default_rng(n)
    cost = rng.random((n, n))
    col = demo.assignment(cost)  # brute force up to 7, Hungarian above
    assert sorted(col.tolist()) == list(range(n))
    best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    assert cost[np.arange(n), col].sum() == pytest.approx(best, rel=1e-12)


def test_assignment_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        demo.assignment(np.zeros((2, 3)))


def test_teacher_positions_off_grid_apart_inside():
    p, w = demo.teacher(2, 5, 17, np.random.default_rng(0))
    assert p.shape == (5, 2) and w.shape == (5,)
    assert np.all(np.abs(p - np.round(p)) >= 0.15 - 1e-12)
    assert np.all((p >= 2) & (p <= 14))
    d = np.linalg.norm(p[:, None] - p[None], axis=-1) + 100 * np.eye(5)
    assert d.min() >= 3.0
    assert np.all((w >= 0.7) & (w <= 1.3))


def test_config_validation():
    with pytest.raises(ValueError, match="ndim"):
        demo.DemoConfig(ndim=4).resolved()
    with pytest.raises(ValueError, match="interpolation"):
        demo.DemoConfig(interpolation="cubic").resolved()
    assert demo.DemoConfig(ndim=3).resolved().size == demo.DEFAULTS[3]["size"]


@pytest.mark.parametrize(
    "config",
    [
        dict(ndim=2, interpolation="gauss", steps=300, candidates=16),
        dict(ndim=1, interpolation="gauss"),  # the defaults (600 steps, 64 students)
        dict(ndim=2, interpolation="bilinear"),
    ],
    ids=["2d-gauss", "1d-gauss", "2d-bilinear"],
)
def test_demo_converges(config):
    result = demo.run(demo.DemoConfig(seed=0, **config))
    assert result.mean_position_error < 0.25, demo.report(result)
    # the hidden weights are recovered too
    np.testing.assert_allclose(result.learned_weights, result.true_weights, atol=0.05)
    # the error went down during training and the history is consistent with the result
    assert result.history_error[0] > 1.0
    assert result.history_error[-1] == pytest.approx(result.mean_position_error, abs=1e-9)


def test_demo_deterministic_and_plot(tmp_path):
    config = demo.DemoConfig(ndim=3, steps=30, candidates=4, log_every=5, seed=3)
    a, b = demo.run(config), demo.run(config)
    np.testing.assert_array_equal(a.learned_positions, b.learned_positions)
    np.testing.assert_array_equal(a.history_loss, b.history_loss)
    assert a.history_positions.shape == (len(a.history_steps), 5, 3)
    for result, name in ((a, "3d.png"),):
        path = tmp_path / name
        demo.plot(result, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = demo.report(a)
    assert "mean position error" in text and len(text.splitlines()) == 5 + 2
