"""Shared positions on the CPU: the matrix-product route against the per-pair route.

When positions (and sigma) broadcast over both channel axes, every channel pair has the same
taps, and ``ndcls.conv`` / ``ndcls.conv_grad`` on the CPU ("numba") run them as matrix
products over channels where that is the faster route (docs/conv.md, section 2, "Shared
positions": enough channels, taps that share cells). This script times forward + backward
(array API, float32) of that route (forced) against the per-pair route, which the same values
take when the positions are given expanded to every channel pair, in one run, the two
alternating call by call; minimum of the repeats; and the route the rule picks. It also checks
the two agree.

    PYTHONPATH=. python benchmarks/bench_shared_cpu.py [--repeats 5]
"""

import argparse
import sys
import time

import numpy as np

#: (name, batch, channels in = out, groups, spatial, sizes, count, interpolation)
SHAPES = (
    ("1-D 64->64 c3 1025 (DiffWave-like)", 1, 64, 1, (8000,), (1025,), 3, "bilinear"),
    ("2-D 64->64 c16 9x9", 2, 64, 1, (32, 32), (9, 9), 16, "gauss"),
    ("2-D 64->64 c16 9x9", 2, 64, 1, (32, 32), (9, 9), 16, "bilinear"),
    ("2-D 32->32 c16 9x9", 2, 32, 1, (32, 32), (9, 9), 16, "bilinear"),
    ("2-D 32->32 c16 9x9", 2, 32, 1, (32, 32), (9, 9), 16, "gauss"),
    ("2-D 16->16 c16 9x9", 2, 16, 1, (32, 32), (9, 9), 16, "gauss"),
    ("2-D 16->16 c16 9x9", 2, 16, 1, (32, 32), (9, 9), 16, "bilinear"),
    ("2-D 8->8 c16 9x9", 2, 8, 1, (32, 32), (9, 9), 16, "bilinear"),
    ("2-D 4->4 c16 9x9", 2, 4, 1, (32, 32), (9, 9), 16, "bilinear"),
)


def main(argv=None) -> int:
    import ndcls
    from ndcls.kernels import cpu_conv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rule = (cpu_conv.SHARED_MIN_CHANNELS, cpu_conv.SHARED_MIN_OVERLAP)
    print(f"rule: matrix products from {rule[0]} channels per group and {rule[1]} taps per distinct cell; "
          f"ms, fwd + bwd, min of {args.repeats}")
    print("| shape | interp | per-pair route ms | matrix-product route ms | per-pair / matrix | rule picks | max difference |")
    print("|---|---|---:|---:|---:|---|---:|")
    for name, batch, channels, groups, spatial, sizes, count, interp in SHAPES:
        m = len(sizes)
        x = rng.standard_normal((batch, channels, *spatial), dtype=np.float32)
        w = rng.standard_normal((channels, channels // groups, count), dtype=np.float32) / np.float32(channels)
        p = rng.uniform(0, np.array(sizes) - 1, size=(count, m)).T.reshape(m, 1, 1, count).astype(np.float32)
        s = None if interp == "bilinear" else np.full(p.shape, 0.5, np.float32)
        expand = (m, channels, channels // groups, count)
        p_all = np.ascontiguousarray(np.broadcast_to(p, expand))
        s_all = None if s is None else np.ascontiguousarray(np.broadcast_to(s, expand))
        kw = dict(interpolation=interp, padding=[k // 2 for k in sizes], groups=groups, backend="numba")

        def step(positions, sigma, force=False):
            cpu_conv.SHARED_MIN_CHANNELS, cpu_conv.SHARED_MIN_OVERLAP = (1, 0.0) if force else rule
            try:
                y = ndcls.conv(x, w, positions, sizes, sigma=sigma, **kw)
                return (y, *ndcls.conv_grad(np.ones_like(y), x, w, positions, sizes, sigma=sigma, **kw))
            finally:
                cpu_conv.SHARED_MIN_CHANNELS, cpu_conv.SHARED_MIN_OVERLAP = rule

        shared, pairs = step(p, s, force=True), step(p_all, s_all)  # compile, warm, and compare
        spec = ndcls.ConvSpec.from_arguments(
            input_shape=x.shape, input_dtype=x.dtype, weight_shape=w.shape, weight_dtype=w.dtype,
            positions_shape=p.shape, positions_dtype=p.dtype, sizes=sizes, interpolation=interp, learned_dims=None,
            sigma_shape=None if s is None else s.shape, sigma_dtype=None if s is None else s.dtype,
            padding=kw["padding"], groups=groups)
        canonical = [None if a is None else a[..., None, :] for a in (w, p, s)]  # (..., dense = 1, count)
        shared_taps = cpu_conv._shared_taps(spec, cpu_conv._Grid(spec), *canonical)
        picks = "per-pair" if shared_taps is None else "matrix"
        diff = 0.0
        for a, b in zip(shared, pairs):
            if a is not None:
                b = b if b.shape == a.shape else b.sum(axis=(1, 2), keepdims=True)  # positions' gradients, summed
                diff = max(diff, float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max())))
        times = {"shared": [], "pairs": []}
        for _ in range(args.repeats):
            for key, arrays in (("pairs", (p_all, s_all, False)), ("shared", (p, s, True))):
                t0 = time.perf_counter()
                step(*arrays)
                times[key].append(time.perf_counter() - t0)
        a, b = min(times["pairs"]), min(times["shared"])
        print(f"| {name} | {interp} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f} | {picks} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
