"""How many threads a CPU kernel call gets, and how its parallel loop is shared out.

On a machine whose cores are busy with other work (data loaders, other jobs), a parallel
region waits for its slowest thread, and a thread the scheduler has parked makes a
millisecond call take ten. Two rules keep the CPU kernels robust there:

* small work runs on the calling thread alone (``numba.set_num_threads`` is per calling
  thread, so other Python threads are not affected): below :data:`SMALL_WORK` operations the
  cost of waking and joining threads is comparable to the work itself;
* larger work is claimed dynamically, one iteration of the ``prange`` at a time
  (``numba.parallel_chunksize(1)``): a thread that was parked takes fewer iterations instead
  of holding a fixed share that every other thread then waits for. The kernels loop over
  many more iterations (planes, channel pairs, chunks) than there are threads;
* and it uses only the cores that other processes leave idle at the time of the call (Linux:
  the runnable tasks of ``/proc/loadavg`` less this process's own, from ``/proc/self/task``):
  with every core busy elsewhere a parallel region would wait, at its end, for a thread the
  scheduler parked, for as long as a time slice.

Every kernel writes each output from one iteration in a fixed order, so results do not
depend on the number of threads or on which thread ran what.
"""

from __future__ import annotations

import contextlib
import os
import time

import numba

#: Estimated operations (multiply-adds, cells written) below which a call runs on one thread.
SMALL_WORK = 1_000_000


#: seconds for which a reading of :func:`busy_elsewhere` is reused: a reading opens one file per
#: thread of this process, so it is taken at most ten times a second; background load (data
#: loaders, other jobs) changes more slowly than that
BUSY_TTL = 0.1
_last_busy = (-1.0, 0)


def busy_elsewhere():
    """Tasks of other processes running or runnable right now (Linux), or 0 where unknown."""
    global _last_busy
    now = time.monotonic()
    if now - _last_busy[0] < BUSY_TTL:
        return _last_busy[1]
    _last_busy = (now, _busy_now())
    return _last_busy[1]


def _busy_now():
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
        if running <= 1:  # the caller alone
            return 0
        own = 0  # this process's running threads (the caller, workers still spinning after a region)
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat", "rb") as f:
                own += f.read().rsplit(b") ", 1)[1][:1] == b"R"
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - own)


@contextlib.contextmanager
def threads_for(work: float):
    """Run the kernel calls inside on one thread if ``work`` is small, else on the threads
    that idle cores allow (at least one), with dynamic claiming of loop iterations."""
    threads = numba.get_num_threads()
    use = 1 if threads == 1 or work < SMALL_WORK else max(1, min(threads, (os.cpu_count() or 1) - busy_elsewhere()))
    if use < threads:
        numba.set_num_threads(use)
    try:
        if use == 1:
            yield 1
        else:
            with numba.parallel_chunksize(1):
                yield use
    finally:
        numba.set_num_threads(threads)
