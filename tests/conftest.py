"""Shared test configuration: hypothesis profiles, GPU detection, the backends under test.

Without a CUDA device the Numba CUDA kernels run on the CPU simulator: the variable must be
set before numba.cuda is first imported, which is why it is set here, at collection start.
Nothing here initialises CUDA.
"""

import hashlib
import os
import pathlib
import tempfile

import pytest
from hypothesis import HealthCheck, settings

# Numba's on-disk cache is keyed on the file that defines each jitted function only, so a kernel
# that inlines a helper from another file would keep a stale copy after the helper changes. Key
# the test cache on the hash of every kernel source instead (set before numba is imported).
_KERNELS = pathlib.Path(__file__).resolve().parent.parent / "ndcls" / "kernels"
_digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_KERNELS.rglob("*.py")))).hexdigest()[:16]
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"ndcls-numba-cache-{_digest}"))

HAS_GPU = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
if not HAS_GPU:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# One default for everyone: the derandomised "ci" profile, so the README's test command runs
# exactly what CI runs. Random exploration is opt-in (README): HYPOTHESIS_PROFILE=explore, with
# pytest's --hypothesis-seed=N to pick (and later replay) the draws; "dev" is its old name.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=300, derandomize=True, print_blob=True, **_common)
settings.register_profile("explore", max_examples=40, print_blob=True, **_common)
settings.register_profile("dev", settings.get_profile("explore"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker itself: item.keywords also holds the names of the parent folders
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _full_float32_on_gpu(request):
    """cuDNN and cuBLAS use TF32 for float32 by default on Ampere and later (errors near 1e-3):
    every ``gpu`` test compares in full float32. Does nothing (and imports nothing) elsewhere."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    try:
        import torch
    except ImportError:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _harness_emulation(request):
    """A test parametrised with an emulated backend (tests/_harness.py, EMULATIONS) runs with it
    registered; the registry is restored afterwards."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec is not None else None
    if not isinstance(name, str):
        yield
        return
    from _harness import registered

    with registered(name):
        yield
