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
  many more iterations (planes, channel pairs, chunks) than there are threads.

Every kernel writes each output from one iteration in a fixed order, so results do not
depend on the number of threads or on which thread ran what.
"""

from __future__ import annotations

import contextlib

import numba

#: Estimated operations (multiply-adds, cells written) below which a call runs on one thread.
SMALL_WORK = 1_000_000


@contextlib.contextmanager
def threads_for(work: float):
    """Run the kernel calls inside on one thread if ``work`` is small, else on all with
    dynamic claiming of loop iterations."""
    threads = numba.get_num_threads()
    if threads == 1 or work < SMALL_WORK:
        numba.set_num_threads(1)
        try:
            yield 1
        finally:
            numba.set_num_threads(threads)
        return
    with numba.parallel_chunksize(1):
        yield threads
