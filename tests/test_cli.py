"""The ``ndcls`` command: --help without heavy imports, ``demo`` and ``bench --quick`` write their files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_module_help_is_light():
    code = "import sys; from ndcls.cli import build_parser; build_parser(); " \
           "print(sorted(m for m in ('torch', 'matplotlib', 'tqdm', 'cupy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "[]"
    for args in (["--help"], ["demo", "--help"], ["bench", "--help"], ["check", "--help"]):
        res = subprocess.run([sys.executable, "-m", "ndcls", *args], capture_output=True, text=True, env=_env())
        assert res.returncode == 0, res.stderr
        assert "usage: ndcls" in res.stdout


def test_demo_help_lists_options():
    res = subprocess.run([sys.executable, "-m", "ndcls", "demo", "--help"], capture_output=True, text=True, env=_env())
    for option in ("--interpolation", "--ndim", "--count", "--steps", "--seed", "--out", "--device"):
        assert option in res.stdout


def test_unknown_option_fails():
    res = subprocess.run([sys.executable, "-m", "ndcls", "demo", "--ndim", "5"], capture_output=True, text=True, env=_env())
    assert res.returncode != 0 and "invalid choice" in res.stderr


def test_demo_command_writes_png(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from ndcls.cli import main

    assert main(["demo", "--ndim", "1", "--steps", "40", "--out", str(tmp_path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mean position error" in out
    png = tmp_path / "demo-1d-gauss.png"
    assert png.stat().st_size > 1000


def test_bench_quick_writes_files_and_prints_a_summary(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    res = subprocess.run([sys.executable, "-m", "ndcls", "bench", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "benchmarks.md").read_text()
    for needle in ("date:", "machine:", "command: `ndcls bench --quick", "## Kernel construction",
                   "## ConvNeXt block", "## Cost against the dilated kernel size", "bench.png",
                   "## Direct convolution", "### Cost model", "## CPU threads", "two Python threads", "## Host overhead per call"):
        assert needle in md, needle
    png = tmp_path / "bench.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    raw = json.loads((tmp_path / "results.json").read_text())
    assert set(raw["sections"]) == {"construct", "layer", "sweep", "conv", "threads", "overhead"}
    # stdout: a short summary and where the tables are, no tables; no log lines of the reference anywhere
    assert "|---" not in res.stdout and len(res.stdout.splitlines()) < 20, res.stdout
    assert str(tmp_path / "benchmarks.md") in res.stdout
    assert "WARNING" not in res.stdout + res.stderr


def test_bench_sections_option(tmp_path):
    pytest.importorskip("torch")
    from ndcls.bench import report

    with pytest.raises(ValueError, match="unknown sections"):
        report.run_all(str(tmp_path), quick=True, sections=["construct", "nope"])
