"""CPU threading behaviour of the ndcls kernels (issue 10, item 7), measured, not assumed.

Two questions, each on a fixed piece of work (``construct`` + ``construct_grad`` of a ConvNeXt
depthwise kernel, bilinear; and, where the default CPU backend has it, ``conv`` + ``conv_grad``
of a 1-D DiffWave-style layer):

* **default threads against one thread**, with the machine as it is ("as found") and with every
  core kept busy by spinning subprocesses that this benchmark starts and stops itself (each
  spins for a bounded time and is terminated when its repetition ends), repeated, reporting the
  ratio of each repetition (the two settings alternate call by call): a parallel region waits
  for its slowest thread, and on a busy core a thread may be parked by the scheduler for a
  whole time slice;
* **two Python threads against one**: the same calls made twice, one after the other in one
  thread, or concurrently from two threads (each with one Numba thread). 2x means the kernels
  run without the GIL; 1x means the threads take turns.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np

#: spinning child: busy until its deadline (bounded even if the parent dies before stopping it)
_SPIN = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


class BusyCores:
    """Context manager: ``n`` subprocesses spinning for at most ``seconds``, stopped on exit."""

    def __init__(self, n: int, seconds: float = 60.0):
        self.n, self.seconds, self.procs = n, seconds, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", _SPIN, str(self.seconds)]) for _ in range(self.n)]
        time.sleep(0.2)  # let them start spinning
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        return False


def workloads(quick: bool = False) -> dict[str, Callable[[], object]]:
    """Name -> a call of ndcls on NumPy arrays (default CPU backend), inputs prepared once."""
    import ndcls
    from ndcls.torch_bridge import cost

    rng = np.random.default_rng(0)
    out = {}
    channels = 96 if quick else 768
    w = rng.standard_normal((channels, 1, 34)).astype(np.float32)
    p = (rng.random((2, channels, 1, 34)) * 16).astype(np.float32)
    g = rng.standard_normal((channels, 1, 17, 17)).astype(np.float32)

    def construct():
        ndcls.construct(w, p, (17, 17))
        ndcls.construct_grad(g, w, p, (17, 17))

    out[f"construct + grad, dw{channels} 17x17 c34 bilinear"] = construct
    if cost.direct_available("cpu"):
        c, length, size = (16, 1000, 257) if quick else (64, 8000, 1025)
        x = rng.standard_normal((1, c, length)).astype(np.float32)
        wc = rng.standard_normal((c, c, 3)).astype(np.float32)
        pc = (rng.random((1, c, c, 3)) * (size - 1)).astype(np.float32)
        go = rng.standard_normal((1, c, length)).astype(np.float32)
        kw = dict(padding=size // 2)

        def conv():
            ndcls.conv(x, wc, pc, (size,), **kw)
            ndcls.conv_grad(go, x, wc, pc, (size,), **kw)

        out[f"conv + grad, 1-D {c}->{c} c3 {size} bilinear"] = conv
    return out


def threads_vs_one(fn, *, repetitions: int = 3, calls: int = 15, busy: bool = False) -> list[dict]:
    """Per repetition: mean seconds per call with Numba's default thread count and with one thread.

    The two settings alternate call by call (default, one, default, ...), and the statistic is
    the mean (the total time of the work): on cores shared with other processes, the share this
    process gets changes from call to call (the same call may take twice as long as the one
    before, as the scheduler gives it a core of its own or half of one), so a median flips
    between the two modes, and timing one setting after the other would measure the drift as much as the threads."""
    import numba

    default = numba.config.NUMBA_NUM_THREADS
    rows = []
    for _ in range(repetitions):
        ctx = BusyCores(os.cpu_count() or 1, seconds=120.0) if busy else _Nothing()
        times = {default: [], 1: []}
        with ctx:
            for threads in (default, 1):  # warm both
                numba.set_num_threads(threads)
                fn()
            for _ in range(calls):
                for threads in (default, 1):
                    numba.set_num_threads(threads)
                    t0 = time.perf_counter()
                    fn()
                    times[threads].append(time.perf_counter() - t0)
            numba.set_num_threads(default)
        t_default, t_one = statistics.fmean(times[default]), statistics.fmean(times[1])
        rows.append(dict(default_threads=default, default_s=t_default, one_s=t_one, ratio=t_default / t_one))
    return rows


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def two_python_threads(fn, *, calls: int = 3) -> dict:
    """Seconds of 2 x ``calls`` calls in one thread, and split over two threads running at once."""
    import numba

    def worker(n, barrier=None):
        numba.set_num_threads(1)  # thread-local in Numba
        if barrier is not None:
            barrier.wait()
        for _ in range(n):
            fn()

    worker(1)  # warm
    t0 = time.perf_counter()
    worker(2 * calls)
    sequential = time.perf_counter() - t0
    barrier = threading.Barrier(3)
    threads = [threading.Thread(target=worker, args=(calls, barrier)) for _ in range(2)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    concurrent = time.perf_counter() - t0
    return dict(one_thread_s=sequential, two_threads_s=concurrent, speedup=sequential / concurrent)


def run(*, quick: bool = False, repetitions: Optional[int] = None, progress: Optional[Callable] = None) -> dict:
    reps = repetitions or (1 if quick else 3)
    calls = 2 if quick else 15
    result = {}
    items = list(workloads(quick).items())
    for name, fn in progress(items) if progress else items:
        result[name] = dict(
            as_found=threads_vs_one(fn, repetitions=reps, calls=calls),
            busy=threads_vs_one(fn, repetitions=reps, calls=calls, busy=True),
            python_threads=two_python_threads(fn, calls=calls),
        )
    return result


def markdown(result: dict) -> str:
    lines = ["| work | machine | default threads ms | one thread ms | default / one, per repetition |",
             "|---|---|---:|---:|---|"]
    for name, r in result.items():
        for key, label in (("as_found", "as found"), ("busy", "every core busy elsewhere")):
            reps = r[key]
            lines.append(f"| {name} | {label} ({reps[0]['default_threads']} threads) | "
                         f"{1e3 * statistics.median(x['default_s'] for x in reps):.3g} | "
                         f"{1e3 * statistics.median(x['one_s'] for x in reps):.3g} | "
                         + ", ".join(f"{x['ratio']:.2f}" for x in reps) + " |")
    lines += ["", "| work | 2 calls, one Python thread ms | same calls, two Python threads ms | speed-up |",
              "|---|---:|---:|---:|"]
    for name, r in result.items():
        t = r["python_threads"]
        lines.append(f"| {name} | {1e3 * t['one_thread_s']:.3g} | {1e3 * t['two_threads_s']:.3g} | {t['speedup']:.2f}x |")
    return "\n".join(lines)


def summary(result: dict) -> list[str]:
    out = []
    for name, r in result.items():
        busy = max(x["ratio"] for x in r["busy"])
        found = max(x["ratio"] for x in r["as_found"])
        out.append(f"threads: {name}: default / one thread worst {found:.2f}x as found, {busy:.2f}x with every core "
                   f"busy (target <= 1.5); two Python threads {r['python_threads']['speedup']:.2f}x (ideal 2)")
    return out
