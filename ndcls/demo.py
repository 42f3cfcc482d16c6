"""Teacher-student demo: a DCLS layer learns where the elements of a hidden sparse kernel are.

A hidden ("teacher") kernel of ``count`` elements at non-grid positions is built with
:func:`ndcls.construct`; random inputs go through a convolution with it. Student DCLS kernels
of the torch bridge (``Dcls1d``/``Dcls2d``/``Dcls3d``, ``count`` elements each) start from random
positions and weights and learn both from the input/output pairs alone, by gradient descent
(Adam) on the relative squared error of their outputs.

How positions are found: a position gets gradients only from the cells its interpolation
touches, so a narrow element cannot "see" a hidden element a few cells away. As in the DCLS
papers, the elements start wide and narrow over the first 60 % of training
(:class:`ndcls.torch_bridge.training.SigmaSchedule` on ``SIG`` for "gauss" and "triangle"); the
teacher uses the student's final width, so the task has an exact solution. Bilinear elements
have no width: the same wide-to-narrow schedule blurs both outputs (a Gaussian whose width
shrinks to 0) before the loss, which widens what every element sees in the same way.

With exactly as many elements as the teacher, gradient descent has spurious minima (two
elements on one hidden element and none on another). The layer therefore holds several
students, its output channels, trained side by side from different random starts in one
convolution; the one with the lowest training loss is reported (chosen by the loss alone,
never by the hidden positions). docs/demo.md gives the measured rates.

Everything here imports torch lazily (``import ndcls.demo`` is light); :func:`run` does the work,
:func:`report` prints the matched elements, :func:`plot` draws the figure.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

#: --interpolation -> torch-bridge layer version
VERSIONS = {"bilinear": "v0", "triangle": "max", "gauss": "gauss"}
#: version -> constant added to abs(SIG) for the element width (as in the layers)
_WIDTH_OFFSET = {"max": 1.0, "gauss": 0.27}


@dataclass
class DemoConfig:
    """Settings of one run; ``None`` fields take the per-``ndim`` defaults of :data:`DEFAULTS`."""

    ndim: int = 2
    count: int = 5
    interpolation: str = "gauss"
    steps: Optional[int] = None
    seed: int = 0
    candidates: Optional[int] = None  # students trained side by side (the layer's output channels)
    size: Optional[int] = None  # dilated kernel size along every axis
    input_size: Optional[int] = None  # spatial size of the random inputs along every axis (>= size)
    batch: Optional[int] = None
    lr: float = 0.05  # Adam learning rate of the weights
    positions_lr: Optional[float] = None  # Adam learning rate of the positions
    schedule_fraction: float = 0.6  # part of training over which the width shrinks
    sigma_start: Optional[float] = None  # SIG at step 0; it ends at 0.23 (gauss) or 0.001 (triangle)
    log_every: int = 10  # steps between recorded positions / errors
    device: str = "cpu"

    def resolved(self) -> "DemoConfig":
        if self.ndim not in DEFAULTS:
            raise ValueError(f"ndim must be 1, 2 or 3, got {self.ndim!r}")
        if self.interpolation not in VERSIONS:
            raise ValueError(f"interpolation must be one of {tuple(VERSIONS)}, got {self.interpolation!r}")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        d = DEFAULTS[self.ndim]
        out = DemoConfig(**{k: (d[k] if v is None and k in d else v) for k, v in self.__dict__.items()})
        if out.steps < 1 or out.candidates < 1:
            raise ValueError(f"steps and candidates must be >= 1, got {out.steps} and {out.candidates}")
        if out.input_size < out.size:
            raise ValueError(f"input_size ({out.input_size}) must be >= size ({out.size})")
        return out


#: per-ndim defaults
DEFAULTS = {
    1: dict(size=33, input_size=96, batch=16, steps=600, candidates=64, sigma_start=4.0, positions_lr=0.03),
    2: dict(size=17, input_size=28, batch=8, steps=600, candidates=32, sigma_start=4.0, positions_lr=0.1),
    3: dict(size=9, input_size=14, batch=4, steps=600, candidates=32, sigma_start=2.0, positions_lr=0.1),
}


@dataclass
class DemoResult:
    config: DemoConfig
    true_positions: np.ndarray  # (count, ndim), kernel index coordinates
    true_weights: np.ndarray  # (count,)
    learned_positions: np.ndarray  # (count, ndim), matched to true_positions row by row
    learned_weights: np.ndarray  # (count,), matched
    true_kernel: np.ndarray  # (*sizes)
    learned_kernel: np.ndarray  # (*sizes)
    history_steps: np.ndarray  # (T,)
    history_positions: np.ndarray  # (T, count, ndim), matched order of the final assignment
    history_error: np.ndarray  # (T,) mean position error at each recorded step
    history_loss: np.ndarray  # (T,)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def position_errors(self) -> np.ndarray:
        """Distance (cells) between each matched learned and true element, ``(count,)``."""
        return np.linalg.norm(self.learned_positions - self.true_positions, axis=1)

    @property
    def mean_position_error(self) -> float:
        return float(self.position_errors.mean())


# -- optimal assignment --------------------------------------------------------------------
def assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square cost matrix: ``col[i]`` is row ``i``'s column.

    Brute force over permutations up to 7 rows, the Hungarian algorithm (shortest augmenting
    paths with potentials, O(n^3)) above.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"cost must be square, got shape {cost.shape}")
    if n <= 7:
        rows = np.arange(n)
        best = min(itertools.permutations(range(n)), key=lambda p: cost[rows, list(p)].sum())
        return np.array(best, dtype=np.int64)
    inf = float("inf")
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j] = row (1-based) assigned to column j
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[match[1:] - 1] = np.arange(n)
    return col


def match_positions(learned: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Index of the learned element matched to each true element (``(count,)``), minimising the
    summed distance."""
    dist = np.linalg.norm(true[:, None, :] - learned[None, :, :], axis=-1)
    return assignment(dist)


# -- the task ------------------------------------------------------------------------------
def teacher(ndim: int, count: int, size: int, rng: np.random.Generator):
    """Hidden positions ``(count, ndim)`` and weights ``(count,)``.

    Positions are non-grid (at least 0.15 from an integer), at least 2 cells from the border and
    3 cells apart (less when that many cannot fit); weights are positive, 0.7 to 1.3.
    """
    margin = 2.0 if size >= 7 else 0.0
    for min_dist in (3.0, 2.0, 1.0, 0.0):
        positions = []
        for _ in range(2000):
            p = rng.uniform(margin, size - 1.0 - margin, ndim)
            p = np.where(np.abs(p - np.round(p)) < 0.15, p + 0.3, p)  # keep off the grid
            if all(np.linalg.norm(p - q) >= min_dist for q in positions):
                positions.append(p)
                if len(positions) == count:
                    weights = rng.uniform(0.7, 1.3, count)
                    return np.array(positions), weights
    raise ValueError(f"cannot place {count} elements in a kernel of size {size}")


def _gaussian_blur(y, width: float, ndim: int):
    """``y`` ``(batch, channels, *spatial)`` blurred along every spatial axis by a normalised Gaussian of
    standard deviation ``width`` cells (separable, zero padding); ``y`` itself for width < 0.3."""
    import torch
    import torch.nn.functional as F

    if width < 0.3:
        return y
    r = int(math.ceil(3 * width))
    x = torch.arange(-r, r + 1, dtype=y.dtype, device=y.device)
    g = torch.exp(-0.5 * (x / width) ** 2)
    g = g / g.sum()
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    shape_in = y.shape
    y = y.reshape(-1, 1, *shape_in[2:])
    for axis in range(ndim):
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = 2 * r + 1
        pad = [0] * ndim
        pad[axis] = r
        y = conv(y, g.view(shape), padding=tuple(pad))
    return y.reshape(shape_in)


def _axis_positions(layer):
    """The layer's element positions, ``(out_channels, count, ndim)`` in kernel-axis order (numpy)."""
    kp = layer.kernel_positions().detach().reshape(len(layer.row_axes), layer.out_channels, -1).cpu().numpy()
    out = np.empty(kp.shape[1:] + (len(layer.row_axes),))
    for j, a in enumerate(layer.row_axes):
        out[..., a] = kp[j]
    return out


def _matched_error(positions: np.ndarray, true: np.ndarray) -> float:
    col = match_positions(positions, true)
    return float(np.linalg.norm(positions[col] - true, axis=1).mean())


def warm_up(config: DemoConfig = DemoConfig()) -> float:
    """Compile (or load from Numba's on-disk cache) the kernels :func:`run` calls; returns seconds.

    Builds the same student layer and teacher kernel as :func:`run`, once, with a backward pass,
    so that a progress bar started afterwards times training rather than compilation.
    """
    import torch

    import ndcls
    from ndcls.torch_bridge import Dcls1d, Dcls2d, Dcls3d

    t0 = time.perf_counter()
    cfg = config.resolved()
    n, version = cfg.ndim, VERSIONS[cfg.interpolation]
    layer = {1: Dcls1d, 2: Dcls2d, 3: Dcls3d}[n](1, cfg.candidates, cfg.count, dilated_kernel_size=cfg.size,
                                                   bias=False, version=version).to(cfg.device)
    layer.construct_kernel().sum().backward()
    w = np.ones((1, 1, cfg.count), np.float32)
    p = np.full((n, 1, 1, cfg.count), cfg.size / 2, np.float32)
    ndcls.construct(w, p, (cfg.size,) * n, sigma=None if version == "v0" else np.ones_like(p),
                    interpolation=cfg.interpolation)
    return time.perf_counter() - t0


def run(config: DemoConfig = DemoConfig(), progress: Optional[Callable] = None) -> DemoResult:
    """Train the students on the teacher's input/output pairs and return what the best one learned.

    The student layer has ``candidates`` output channels: that many independent students of
    ``count`` elements each, from different random starts, trained together on the same data
    (one convolution call). With as many elements as the teacher, gradient descent can leave two
    elements on one hidden element and none on another; the student with the lowest training
    loss is the one reported (chosen from the loss only, never from the hidden positions).

    ``progress(iterable)`` wraps the step loop (e.g. ``tqdm``); when the wrapper has a
    ``set_postfix`` method it is given the best student's loss and mean position error.
    """
    import torch
    import torch.nn.functional as F

    import ndcls
    from ndcls.torch_bridge import Dcls1d, Dcls2d, Dcls3d
    from ndcls.torch_bridge.training import SigmaSchedule, clamp_parameters

    cfg = config.resolved()
    n, size, version, R = cfg.ndim, cfg.size, VERSIONS[cfg.interpolation], cfg.candidates
    device = torch.device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    # teacher: the student's interpolation at its final width, so an exact solution exists
    sig_end = 0.23 if version == "gauss" else 1e-3
    true_p, true_w = teacher(n, cfg.count, size, rng)
    sigma = None
    if version in _WIDTH_OFFSET:
        sigma = np.full((n, 1, 1, cfg.count), sig_end + _WIDTH_OFFSET[version], dtype=np.float32)
    # float32 like the students, so the first run compiles one dtype only
    true_K = ndcls.construct(true_w.reshape(1, 1, -1).astype(np.float32),
                             true_p.T.reshape(n, 1, 1, -1).astype(np.float32), (size,) * n,
                             sigma=sigma, interpolation=cfg.interpolation)
    true_K = np.asarray(true_K).reshape((size,) * n)
    K_t = torch.as_tensor(true_K, dtype=torch.float32, device=device)

    # students: R output channels, each a DCLS kernel of `count` elements
    layer_cls = {1: Dcls1d, 2: Dcls2d, 3: Dcls3d}[n]
    # the construct route: the kernels the warm-up compiled (the direct route would compile its own)
    layer = layer_cls(1, R, cfg.count, dilated_kernel_size=size, padding=0, bias=False, version=version,
                      method="construct")
    with torch.no_grad():
        for j, (lo, hi) in enumerate(layer.position_limits):  # uniform over the kernel
            layer.P[j].uniform_(lo + 0.5, hi - 0.5, generator=gen)
        layer.weight.uniform_(-0.1, 0.1, generator=gen)
    layer.to(device)
    schedule = SigmaSchedule(cfg.sigma_start, sig_end, total_steps=cfg.steps, fraction=cfg.schedule_fraction)
    if layer.SIG is not None:
        layer.SIG.requires_grad_(False)  # set by the schedule
    opt = torch.optim.Adam([dict(params=[layer.weight], lr=cfg.lr), dict(params=[layer.P], lr=cfg.positions_lr)])
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    in_shape = (cfg.batch, 1) + (cfg.input_size,) * n
    reduce_dims = (0,) + tuple(range(2, 2 + n))

    steps, errors, losses, snaps, cand_losses = [], [], [], [], []
    t0 = time.perf_counter()
    bar = progress(range(cfg.steps)) if progress else range(cfg.steps)
    for step in bar:
        width = schedule.value(step)
        if layer.SIG is not None:
            schedule.apply(layer, step)
        x = torch.randn(in_shape, generator=gen).to(device)
        with torch.no_grad():
            y_t = conv(x, K_t.view(1, 1, *K_t.shape))
        y_s = layer(x)
        if layer.SIG is None:  # bilinear: the schedule widens the loss instead of the elements
            y_s, y_t = _gaussian_blur(y_s, width, n), _gaussian_blur(y_t, width, n)
        # relative squared error of each student, (R,); students are independent: sum them
        per_student = (y_s - y_t).square().mean(reduce_dims) / y_t.square().mean().clamp_min(1e-12)
        opt.zero_grad(set_to_none=True)
        per_student.sum().backward()
        opt.step()
        clamp_parameters(layer)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            lv = per_student.detach().cpu().numpy()
            pos = _axis_positions(layer)  # (R, count, n)
            best = int(lv.argmin())
            steps.append(step)
            cand_losses.append(lv)
            losses.append(float(lv[best]))
            errors.append(_matched_error(pos[best], true_p))
            snaps.append(pos)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.2e}", pos_err=f"{errors[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - t0

    # the student with the lowest loss at the end (the loss before the last step, averaged
    # over the last records, is less noisy than one batch)
    final = np.mean(cand_losses[-3:], axis=0)
    best = int(final.argmin())
    learned_p = _axis_positions(layer)[best]
    col = match_positions(learned_p, true_p)
    learned_w = layer.weight.detach().reshape(R, -1)[best].cpu().numpy()
    with torch.no_grad():
        learned_K = layer.construct_kernel()[best].reshape((size,) * n).cpu().numpy()
    all_errors = [_matched_error(p, true_p) for p in _axis_positions(layer)]
    history = np.stack(snaps)[:, best]
    return DemoResult(
        config=cfg,
        true_positions=true_p,
        true_weights=true_w,
        learned_positions=learned_p[col],
        learned_weights=learned_w[col].astype(np.float64),
        true_kernel=true_K,
        learned_kernel=learned_K,
        history_steps=np.array(steps),
        history_positions=history[:, col],
        history_error=np.array([np.linalg.norm(h[col] - true_p, axis=1).mean() for h in history]),
        history_loss=np.array([c[best] for c in cand_losses]),
        seconds=seconds,
        extra=dict(best_candidate=best, candidate_errors=all_errors, candidate_losses=final.tolist()),
    )


def report(result: DemoResult) -> str:
    """A text table of learned vs true positions and weights, matched element by element."""
    n = result.config.ndim
    lines = [
        f"{'elem':>4}  {'true position':>{9 * n}}  {'learned position':>{9 * n}}  {'error':>6}  "
        f"{'true w':>7}  {'learned w':>9}"
    ]
    for i in range(len(result.true_weights)):
        tp = "".join(f"{v:9.3f}" for v in result.true_positions[i])
        lp = "".join(f"{v:9.3f}" for v in result.learned_positions[i])
        lines.append(
            f"{i:>4}  {tp}  {lp}  {result.position_errors[i]:6.3f}  {result.true_weights[i]:7.3f}  "
            f"{result.learned_weights[i]:9.3f}"
        )
    c = result.config
    lines.append(
        f"mean position error {result.mean_position_error:.3f} cells ({c.ndim}-D, {c.interpolation}, "
        f"count {c.count}, size {c.size}, {c.steps} steps, {result.seconds:.1f} s; positions are kernel index "
        f"coordinates along axes {tuple(range(n))}; best of {c.candidates} students)"
    )
    return "\n".join(lines)


def plot(result: DemoResult, path) -> None:
    """Write a PNG: true kernel, learned kernel with the position trajectories, error curve.

    3-D kernels are shown as their maximum-magnitude projection along the first axis, with the
    trajectories projected onto the same plane.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    c = result.config
    fig, axs = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    true_K, learned_K = result.true_kernel, result.learned_kernel
    traj = result.history_positions  # (T, count, ndim)
    colors = plt.get_cmap("tab10")(np.arange(len(result.true_weights)) % 10)

    if c.ndim == 1:
        cells = np.arange(c.size)
        for ax, K, title in ((axs[0], true_K, "true kernel"), (axs[1], learned_K, "learned kernel")):
            ax.bar(cells, K, color="0.6", width=0.8)
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xlabel("kernel index")
            ax.set_title(title)
        for i, col in enumerate(colors):
            axs[0].axvline(result.true_positions[i, 0], color=col, ls="--", lw=1)
            axs[1].axvline(result.learned_positions[i, 0], color=col, ls="--", lw=1)
        ax = axs[1].twinx()  # trajectories: position (x) against step (right axis)
        for i, col in enumerate(colors):
            ax.plot(traj[:, i, 0], result.history_steps, color=col, lw=1.2)
        ax.set_ylabel("training step (trajectories)")
        ax.set_ylim(result.history_steps[-1], 0)
        axs[0].legend(handles=[Line2D([], [], color="k", ls="--", lw=1, label="true position")], fontsize=8,
                      loc="upper right")
        ax.legend(handles=[Line2D([], [], color="k", ls="--", lw=1, label="learned position"),
                           Line2D([], [], color="k", lw=1.2, label="trajectory (right axis: step)")],
                  fontsize=8, loc="upper right")
    else:
        def proj(K):
            if K.ndim == 3:
                idx = np.abs(K).argmax(axis=0)
                return np.take_along_axis(K, idx[None], axis=0)[0]
            return K

        lim = max(np.abs(true_K).max(), np.abs(learned_K).max())
        signed = min(true_K.min(), learned_K.min()) < -1e-3 * lim
        cmap, vmin = ("RdBu_r", -lim) if signed else ("Greys", 0.0)
        ya, xa = (1, 2) if c.ndim == 3 else (0, 1)  # plotted kernel axes: rows, columns
        for ax, K, title in ((axs[0], true_K, "true kernel"), (axs[1], learned_K, "learned kernel + trajectories")):
            im = ax.imshow(proj(K), cmap=cmap, vmin=vmin, vmax=lim, origin="upper")
            ax.set_title(title + (" (max-|.| projection over axis 0)" if c.ndim == 3 else ""), fontsize=10)
            ax.set_xlabel(f"kernel axis {xa}")
            ax.set_ylabel(f"kernel axis {ya}")
        fig.colorbar(im, ax=axs[:2], shrink=0.8, label="kernel value")
        for i, col in enumerate(colors):
            axs[0].plot(result.true_positions[i, xa], result.true_positions[i, ya], "x", color=col, ms=9, mew=2)
            axs[1].plot(traj[:, i, xa], traj[:, i, ya], "-", color=col, lw=1.3)
            axs[1].plot(traj[0, i, xa], traj[0, i, ya], "o", color=col, ms=5, mfc="none")
            axs[1].plot(result.true_positions[i, xa], result.true_positions[i, ya], "x", color=col, ms=9, mew=2)
            axs[1].plot(traj[-1, i, xa], traj[-1, i, ya], ".", color="k", ms=5)
        markers = [
            Line2D([], [], color="k", marker="x", ls="none", ms=7, mew=2, label="true position"),
            Line2D([], [], color="k", marker="o", ls="none", ms=5, mfc="none", label="start"),
            Line2D([], [], color="k", lw=1.3, label="trajectory"),
            Line2D([], [], color="k", marker=".", ls="none", ms=5, label="learned position"),
        ]
        axs[0].legend(handles=markers[:1], fontsize=8, loc="upper right")
        axs[1].legend(handles=markers, fontsize=8, loc="upper right")

    ax = axs[2]
    zeros = []  # log scale: values that are exactly 0 are drawn as markers on the bottom axis, not floored
    for values, color, label in ((result.history_error, "C0", "mean position error (cells)"),
                                 (result.history_loss, "C1", "relative MSE loss")):
        positive = values > 0
        ax.semilogy(result.history_steps[positive], values[positive], color=color, label=label)
        if not positive.all():
            zeros.append((result.history_steps[~positive], color))
    ax.axhline(0.25, color="C0", ls=":", lw=1, label="0.25 cells")
    bottom = ax.get_ylim()[0]
    for steps, color in zeros:
        ax.plot(steps, np.full(len(steps), bottom), "v", color=color, ms=6, clip_on=False,
                label="exactly 0 (on the axis)")
    ax.set_ylim(bottom=bottom)
    ax.set_xlabel("training step")
    ax.set_title(f"final mean position error {result.mean_position_error:.3f} cells")
    ax.legend(fontsize=9)
    fig.suptitle(
        f"ndcls demo: {c.ndim}-D, {c.count} elements, {c.interpolation}, kernel {'x'.join([str(c.size)] * c.ndim)}, "
        f"{c.steps} steps, seed {c.seed}; best of {c.candidates} students (the one shown)"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
