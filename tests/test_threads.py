"""How many threads a CPU conv call gets (ndcls.kernels._threads)."""

from __future__ import annotations

import os

import numba
import pytest

from ndcls.kernels import _threads


def test_busy_elsewhere_counts_other_processes_only():
    busy = _threads._busy_now()
    assert isinstance(busy, int) and busy >= 0
    if os.path.exists("/proc/loadavg"):
        # this process's own running threads are not counted: an idle test machine reads 0 or
        # a few; never more than every task on the machine
        with open("/proc/loadavg") as f:
            assert busy <= int(f.read().split()[3].split("/")[0])


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
