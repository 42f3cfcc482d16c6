"""DCLS layers under DistributedDataParallel: 2 CPU processes with the gloo backend."""

import socket
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import _distributed  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")  # 2 workers on a small machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    initial = {k: v.clone() for k, v in _distributed.make_model().state_dict().items()}
    x, y = _distributed.data()
    single_model = _distributed.make_model(initial)
    single = _distributed.train(single_model, single_model, x, y)

    ctx = torch.multiprocessing.spawn(
        _distributed.worker, args=(2, _free_port(), initial, str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "DDP workers did not finish in 240 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    names = list(initial)
    assert "stage.1.P" in names and "stage.1.SIG" in names
    for step, (s0, s1, ref) in enumerate(zip(ranks[0], ranks[1], single)):
        for name in names:
            assert torch.equal(s0[name], s1[name]), f"ranks differ at step {step}: {name}"
            torch.testing.assert_close(s0[name], ref[name], rtol=1e-10, atol=1e-12,
                                       msg=f"DDP vs one process at step {step}: {name}")
        assert torch.equal(s0["stage.1.P"], s0["stage.0.P"])  # still one shared Parameter
    for name in names:  # the steps moved every parameter, positions included
        assert not torch.equal(single[-1][name], initial[name]), name
