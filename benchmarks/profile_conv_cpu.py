"""Where the CPU direct convolution spends its time: the stages of ``ndcls.kernels.cpu_conv``
(taps, padding copies, forward gather, input gradient, dL/dK + chain rule) timed inside
``ndcls.conv`` and ``ndcls.conv_grad`` on the CPU benchmark shapes (array API, float32,
positions uniform over the kernel, gauss width 0.5), median over repeats.

    PYTHONPATH=. python benchmarks/profile_conv_cpu.py [--repeats 5] [--threads N]
"""

import argparse
import statistics
import sys
import time

import numpy as np

STAGES = ("_taps", "_embed", "_gather", "_grad_input", "_grad_elements")


def main(argv=None) -> int:
    import numba

    import ndcls
    from ndcls.bench.conv import CASES, case_arrays
    from ndcls.kernels import cpu_conv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="Numba threads (default: Numba's)")
    args = parser.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    spent = {}

    def timed(name):
        fn = getattr(cpu_conv, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    for name in STAGES:
        setattr(cpu_conv, name, timed(name))
    print(f"threads: {numba.get_num_threads()}; ms, median of {args.repeats} calls; "
          "conv = taps + padding + forward gather; conv_grad = taps + input gradient (its gather and padding "
          "included) + dL/dK and chain rule (`_grad_elements`) + padding")
    print("| case | interp | taps / cells gathered | conv: taps | conv: gather | conv total | grad: taps | grad: grad_input | grad: dL/dK + chain rule | conv_grad total |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for case in CASES:
        x, w, p, s, sizes, kw = case_arrays(case, rng)
        kw.update(sigma=s, backend="numba")
        interp = kw["interpolation"]
        y = ndcls.conv(x, w, p, sizes, **kw)
        gy = rng.standard_normal(y.shape, dtype=np.float32)
        ndcls.conv_grad(gy, x, w, p, sizes, **kw)  # compile and warm
        taps = cpu_conv._MEMO.entries[0][4]  # the call's taps, and the cells the gathers visit (shared cells merged)
        counts = f"{len(taps.value):,} / {len(taps.values):,}"
        rows = {"conv": [], "grad": []}
        for _ in range(args.repeats):
            w = w * np.float32(1 + 2**-20)  # new weights each step, as in training: conv builds the taps, conv_grad reuses them
            for phase, call in (("conv", lambda: ndcls.conv(x, w, p, sizes, **kw)),
                                ("grad", lambda: ndcls.conv_grad(gy, x, w, p, sizes, **kw))):
                spent.clear()
                t0 = time.perf_counter()
                call()
                rows[phase].append(dict(spent, total=time.perf_counter() - t0))

        def med(phase, key):
            return statistics.median(r.get(key, 0.0) for r in rows[phase]) * 1e3

        print(f"| {case.name} {case.input_shape} | {interp} | {counts} | {med('conv', '_taps'):.2f} | {med('conv', '_gather'):.2f} | "
              f"{med('conv', 'total'):.2f} | {med('grad', '_taps'):.2f} | {med('grad', '_grad_input'):.2f} | "
              f"{med('grad', '_grad_elements'):.2f} | {med('grad', 'total'):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
