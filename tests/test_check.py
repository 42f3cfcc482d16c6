"""``ndcls check``: passes on this machine's backends, fails on a planted disagreement."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ndcls
from ndcls import check
from ndcls._registry import _BACKENDS

ROOT = Path(__file__).resolve().parent.parent


def test_check_quick_passes_on_this_machine():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "ndcls", "check", "--quick"], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {tuple(line.split()[:2]): line for line in res.stdout.splitlines() if line.split()[:1] and line.split()[0] in ndcls.backends()}
    for dtype in check.DTYPES:  # the CPU backends run every dtype (half precision upcast)
        for backend in ("numpy", "numba"):
            assert rows[(backend, dtype)].rstrip().endswith("ok"), rows[(backend, dtype)]
    if not check.gpu_present():  # numba-cuda under the simulator, cupy skipped with the reason
        assert rows[("numba-cuda", "float32")].rstrip().endswith("ok")
        assert "skipped: no NVIDIA GPU" in rows[("cupy", "float32")]
    assert "passed:" in res.stdout


@pytest.fixture
def broken():
    ndcls.register_backend(ndcls.Backend(name="broken", device="cpu", module="_broken_backend", dtypes=("float32", "float64")))
    yield "broken"
    _BACKENDS.pop("broken", None)


def test_check_fails_on_disagreement(broken):
    lines = []
    rc = check.main([broken], ("float64", "float32", "bfloat16"), quick=True, huge=False, out=lines.append)
    text = "\n".join(lines)
    assert rc == 1 and "FAILED" in text
    rows = check.run([broken], ("float64",), quick=True, huge=False)
    (row,) = rows
    assert not row.ok and row.worst > 1
    assert any("K off by" in f for f in row.failures)
    assert any("grad_sigma off by" in f for f in row.failures)
    assert not any("grad_weight" in f for f in row.failures)
    assert "skipped: dtype not taken by broken" in text  # bfloat16: neither native nor upcast


def test_cases_cover_every_interpolation_and_layout():
    small = check.cases(small=True)
    assert {c.interpolation for c in small} == set(ndcls.INTERPOLATIONS)
    assert {len(c.sizes) for c in small} == {1, 2, 3}
    assert any(c.learned_dims is not None and len(c.learned_dims) < len(c.sizes) for c in small)
    full = check.cases(small=False, huge=True)
    huge = [c for c in full if c.check_batches is not None]
    assert len(huge) == 1 and huge[0].cells > 2**31
    assert max(c.batch[0] for c in full) >= 768
