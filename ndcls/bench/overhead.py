"""Host overhead of one call: ``ndcls.construct`` on tiny NumPy arrays and the torch op.

The kernel is 3 cells (one element, one batch index), so what is measured is the Python on
the host: argument checks, dispatch, DLPack exchange, the torch custom op and autograd. Each
figure is the median, over ``rounds`` rounds, of the mean time of ``number`` calls; the first
calls (Numba compilation) are excluded. The minimum over rounds is printed too: on a machine
shared with other work it is the better estimate of the cost itself.

Run it from a checkout (``PYTHONPATH=<checkout> python benchmarks/bench_overhead.py``); to
compare two checkouts on a busy machine, run both in one command, back to back.
"""

from __future__ import annotations

import statistics
import time


def _median_us(fn, number: int, rounds: int) -> tuple[float, float]:
    fn()
    fn()
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        means.append((time.perf_counter() - t0) / number)
    return 1e6 * statistics.median(means), 1e6 * min(means)


def measure(number: int = 2000, rounds: int = 7, torch_ops: bool = True) -> dict[str, float]:
    """``(median, min)`` microseconds per call for "construct", "construct_grad", "torch fwd", "torch fwd+bwd"."""
    import numpy as np

    import ndcls

    w = np.ones((1, 1))
    p = np.full((1, 1, 1), 1.25)
    g = np.ones((1, 3))
    out = {
        "construct": _median_us(lambda: ndcls.construct(w, p, (3,)), number, rounds),
        "construct_grad": _median_us(lambda: ndcls.construct_grad(g, w, p, (3,)), number, rounds),
    }
    if torch_ops:
        import torch

        from ndcls.torch_bridge import construct

        tw = torch.ones((1, 1), dtype=torch.float64, requires_grad=True)
        tp = torch.full((1, 1, 1), 1.25, dtype=torch.float64, requires_grad=True)

        def fwd():
            with torch.no_grad():
                construct(tw, tp, (3,))

        def fwd_bwd():
            construct(tw, tp, (3,)).sum().backward()

        out["torch fwd"] = _median_us(fwd, number // 4, rounds)
        out["torch fwd+bwd"] = _median_us(fwd_bwd, number // 4, rounds)
    return out


def main(argv=None) -> int:
    import argparse
    import os

    import ndcls

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    figures = measure(args.number, args.rounds, not args.no_torch)
    where = os.path.dirname(os.path.dirname(os.path.abspath(ndcls.__file__)))
    print(f"ndcls from {where}  (us per call: median, min of {args.rounds} rounds of {args.number})")
    for name, (median, best) in figures.items():
        print(f"  {name:<16} {median:8.1f} {best:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
