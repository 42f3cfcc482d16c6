"""Where the cupy direct convolution spends its time: each stage of ``ndcls.kernels.cupy_conv``
timed alone with CUDA events (median of repeats), on the GPU benchmark shapes (array API,
float32). Needs a GPU.

    PYTHONPATH=. python benchmarks/profile_conv_gpu.py [--repeats 10]
"""

import argparse
import sys

import numpy as np


def _time(fn, repeats):
    """Median milliseconds of ``fn()`` between CUDA events, after one warm-up call."""
    from ndcls.bench.gpu import _event_time

    fn()
    return _event_time(fn, repeats) * 1e3


def main(argv=None) -> int:
    import cupy

    import ndcls
    from ndcls._api import _prepare_conv
    from ndcls.bench.conv import GPU_CASES, case_arrays
    from ndcls.kernels import cupy_conv as cc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print("| case | interp | taps (mark+compact) ms | forward ms | grad_input ms | dL/dK taps ms | conv ms | conv_grad ms | taps/row |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for case in GPU_CASES:
        x, w, p, s, sizes, kw = case_arrays(case, rng)
        x, w, p = cupy.asarray(x), cupy.asarray(w), cupy.asarray(p)
        s = None if s is None else cupy.asarray(s)
        kw.update(sigma=s, backend="cupy")
        interp = kw["interpolation"]
        y = ndcls.conv(x, w, p, sizes, **kw)
        gy = cupy.asarray(rng.standard_normal(y.shape, dtype=np.float32))
        call = _prepare_conv("conv", x, w, p, s, None, sizes, dict({k: v for k, v in kw.items() if k != "sigma"}, learned_dims=None, stride=1))
        dev = cupy.cuda.Device().id
        taps = cc._Taps(call.spec, call.weight, call.positions, call.sigma, dev)
        out = cupy.empty(call.spec.output_shape, dtype=np.float32)
        gx = cupy.empty(call.spec.input_shape, dtype=np.float32)
        pl = taps.plan
        partial = cupy.empty(pl.n_rows * pl.n_chunks * pl.cap, dtype=np.float32)
        t_taps = _time(lambda: cc._Taps(call.spec, call.weight, call.positions, call.sigma, dev), args.repeats)
        t_fwd = _time(lambda: cc._planes(taps.kernels["forward"], pl.forward, call.input, taps, out), args.repeats)
        t_gin = _time(lambda: cc._planes(taps.kernels["grad_input"], pl.transposed, gy, taps, gx), args.repeats)
        t_gk = _time(lambda: cc._grad_taps(taps, gy, call.input, partial), args.repeats)
        t_conv = _time(lambda: ndcls.conv(x, w, p, sizes, **kw), args.repeats)
        t_grad = _time(lambda: ndcls.conv_grad(gy, x, w, p, sizes, **kw), args.repeats)
        mean_taps = float(taps.n_taps.mean())
        print(f"| {case.name} {case.input_shape} | {interp} | {t_taps:.3f} | {t_fwd:.3f} | {t_gin:.3f} | {t_gk:.3f} | "
              f"{t_conv:.3f} | {t_grad:.3f} | {mean_taps:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
