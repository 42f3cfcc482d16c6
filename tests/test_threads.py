"""How many threads a CPU conv call gets (ndcls.kernels._threads)."""

from __future__ import annotations

import os

import numba
import pytest

from ndcls.kernels import _threads


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="reads /proc (Linux)")
def test_busy_elsewhere_sees_a_spinning_process():
    """A process spinning beside this one is counted as busy (and readings are never negative)."""
    from ndcls.bench.threads import BusyCores

    with BusyCores(1, seconds=30):
        readings = [_threads._busy_now() for _ in range(5)]
    assert all(isinstance(r, int) and r >= 0 for r in readings)
    assert max(readings) >= 1, f"a spinning child process was not seen as busy: {readings}"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc (Linux)")
def test_busy_elsewhere_averages_a_spinning_process_over_time(monkeypatch):
    """Over a window of a few tenths of a second, a process spinning beside this one is a busy core."""
    import time

    from ndcls.bench.threads import BusyCores

    monkeypatch.setattr(_threads, "_last_busy", (-1.0, None, 0))
    with BusyCores(1, seconds=30):
        time.sleep(0.1)
        _threads.busy_elsewhere()  # the first reading starts the window
        time.sleep(0.3)
        reading = _threads.busy_elsewhere()
    assert reading >= 1, f"a spinning child process was not seen as busy: {reading}"


@pytest.mark.parametrize("own, expected", [(0, 2), (20, 1), (40, 0), (50, 0)])
def test_busy_elsewhere_leaves_out_this_process(monkeypatch, own, expected):
    """The machine's busy CPU time less this process's own, per second of the window: this
    process's threads (torch's OpenMP workers spinning after an operation) are never counted."""
    clock = iter([10.0, 10.2, 10.25])
    ticks = iter([(1000, 500), (1040, 500 + own)])  # 40 ticks in 0.2 s at 100 ticks/s: two busy cores
    monkeypatch.setattr(_threads, "_last_busy", (-1.0, None, 0))
    monkeypatch.setattr(_threads, "_TICKS_PER_SECOND", 100)
    monkeypatch.setattr(_threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(_threads, "_cpu_ticks", lambda: next(ticks))
    monkeypatch.setattr(_threads, "_busy_now", lambda: 7)
    assert _threads.busy_elsewhere() == 7  # the first reading: a snapshot
    assert _threads.busy_elsewhere() == expected
    assert _threads.busy_elsewhere() == expected  # within BUSY_TTL: the same reading


@pytest.mark.parametrize("busy, expected", [(0, "all"), (10**6, 1)])
def test_threads_follow_the_idle_cores(monkeypatch, busy, expected):
    threads = numba.get_num_threads()
    monkeypatch.setattr(_threads, "busy_elsewhere", lambda: busy)
    with _threads.threads_for(10 * _threads.SMALL_WORK) as used:
        assert used == numba.get_num_threads()
        assert used == (min(threads, os.cpu_count() or 1) if expected == "all" else 1)
    assert numba.get_num_threads() == threads


def test_small_work_runs_on_one_thread(monkeypatch):
    threads = numba.get_num_threads()
    monkeypatch.setattr(_threads, "busy_elsewhere", lambda: 0)
    with _threads.threads_for(_threads.SMALL_WORK - 1) as used:
        assert used == 1 == numba.get_num_threads()
    assert numba.get_num_threads() == threads
