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
* and it uses only the cores that other processes leave idle (Linux: the CPU time of the
  machine less this process's own over the last tenth of a second or more, from ``/proc/stat``
  and ``/proc/self/stat``): with every core busy elsewhere a parallel region would wait, at
  its end, for a thread the scheduler parked, for as long as a time slice.

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


#: seconds over which :func:`busy_elsewhere` averages, at least (its reading is reused within
#: them); background load (data loaders, other jobs) changes more slowly than that
BUSY_TTL = 0.1
_last_busy = (-1.0, None, 0)  # (time, CPU ticks from _cpu_ticks, reading)


def busy_elsewhere():
    """Cores that other processes kept busy, on average, since the last reading at least
    BUSY_TTL seconds ago (Linux; the first reading: tasks runnable right now), rounded to
    the nearest whole core; 0 where unknown.

    An average over time, not a snapshot: right after a torch operation, torch's own OpenMP
    workers (a thread pool apart from Numba's) spin for a moment and then sleep, and a
    snapshot of ``/proc/loadavg`` less this process's running threads, read a moment apart,
    often counted them as another process's after a torch convolution, and the 1-D delays
    layer then ran on one thread (docs/conv.md, section 6).
    """
    global _last_busy
    now = time.monotonic()
    then, ticks, reading = _last_busy
    if now - then < BUSY_TTL:
        return reading
    new = _cpu_ticks()
    if new is None:
        reading = 0
    elif ticks is None:
        reading = _busy_now()
    else:
        others = (new[0] - ticks[0]) - (new[1] - ticks[1])  # ticks of every CPU less this process's
        reading = max(0, int(others / ((now - then) * _TICKS_PER_SECOND) + 0.5))
    _last_busy = (now, new, reading)
    return reading


_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks():
    """``(busy, own)``: clock ticks the machine's CPUs spent busy (user, nice, system, irq,
    softirq: not idle, I/O wait or time stolen by a hypervisor) and ticks this process ran,
    since boot (Linux), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()  # b"cpu", user, nice, system, idle, iowait, irq, softirq, steal, ...
        busy = int(fields[1]) + int(fields[2]) + int(fields[3]) + int(fields[6]) + int(fields[7])
        with open("/proc/self/stat", "rb") as f:
            after_name = f.read().rsplit(b") ", 1)[1].split()  # from field 3 (state) on
        return busy, int(after_name[11]) + int(after_name[12])  # utime, stime: fields 14 and 15
    except (OSError, ValueError, IndexError):
        return None


def _busy_now():
    """Tasks of other processes running or runnable right now (Linux), or 0 where unknown: the
    first reading of :func:`busy_elsewhere`, which has no earlier one to average from."""
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
