"""Helpers every benchmark section shares: the reference package, timing, peak memory.

* :func:`reference_modules` imports the reference implementation (``dcls`` on PyPI, import
  ``DCLS``) with its log lines silenced: its ``Dcls2d`` logs ``WARNING:root:...`` lines about a
  CUDA-only kernel on every construction, which would land in the middle of progress bars;
* :func:`time_round_robin` times several callables one after the other, round after round, so
  that a change of machine load affects all of them alike;
* :func:`peak_growth` measures the growth of the process's resident-set high-water mark during
  one call (Linux; ``None`` elsewhere).
"""

from __future__ import annotations

import ctypes
import logging
import os
import statistics
import time
from typing import Callable, Optional

#: Linux batches RSS counter updates per thread (every 64 page faults): growth below this is not seen
RSS_RESOLUTION = 64 * 4096


class _DropReferenceRecords(logging.Filter):
    """Drops log records emitted from inside the reference package."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return "/DCLS/" not in path


_FILTER = _DropReferenceRecords()


def silence_reference_logs() -> None:
    """Filter the reference package's records out of the root logger (idempotent)."""
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)


def reference_modules():
    """``DCLS.construct.modules`` with its log lines silenced, or None if it is not installed."""
    silence_reference_logs()
    try:
        import torch  # noqa: F401
        from DCLS.construct import modules
    except Exception:
        return None
    return modules


def time_round_robin(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` rounds after ``warmup`` rounds (which absorb compilation)."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


_MALLOC_SET = False


def _return_large_blocks_to_the_os() -> None:
    """glibc: serve blocks over 64 KiB with mmap, so that freeing them lowers the RSS again."""
    global _MALLOC_SET
    if not _MALLOC_SET:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
        _MALLOC_SET = True


def peak_growth(fn: Callable[[], object]) -> Optional[int]:
    """Bytes by which the resident-set high-water mark grows during ``fn()`` (None off Linux).

    Call after a warm-up of ``fn``: compilation, thread pools and caches are then in place, and
    what is measured is the memory the call itself needs (its outputs included).
    """
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    _return_large_blocks_to_the_os()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(peak - before, 0) * 1024


def fmt_ms(s: Optional[float]) -> str:
    if s is None or s != s:
        return "n/a"
    return f"{s * 1e3:.3g}"


def fmt_mib(b: Optional[int]) -> str:
    if b is None:
        return "n/a"
    if b < RSS_RESOLUTION:
        return f"< {RSS_RESOLUTION // 1024} KiB"
    return f"{b / 2**20:.3g}"
