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
