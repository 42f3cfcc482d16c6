"""The "cupy" backend's module loader without a GPU: ``load_functions`` over a stand-in for
CuPy's device and ``RawModule``, and its disk cache (``compiled_module``) compiled by NVRTC.

The GPU side (loading the cached cubin and running it) is exercised by every "cupy" test on a
device, e.g. the subnormal-width cases of tests/test_backends.py.
"""

from __future__ import annotations

import shutil
import threading
import types

import pytest

from ndcls.kernels import cupy_backend as cb

pytestmark = pytest.mark.cuda_compile
pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

SUPPORTED = (70, 75, 80, 86, 89, 90, 100, 120, 121)
KEY = cb.Specialisation("float32", 1, "bilinear", False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of this test's own, and empty in-memory caches."""
    monkeypatch.setenv("NDCLS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cb, "_MODULES", {})
    monkeypatch.setattr(cb, "_FALLBACK_DIR", [])
    return tmp_path / "cupy"


class _FakeModule:
    """``cupy.RawModule(path=...)``: records its path; functions are named by their lowered name."""

    loaded: list = []

    def __init__(self, *, path):
        self.path = path
        _FakeModule.loaded.append(path)

    def get_function(self, name):
        return types.SimpleNamespace(name=name, path=self.path)


@pytest.fixture
def fake_cupy(monkeypatch):
    device = types.SimpleNamespace(id=0, compute_capability="90")
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: device), RawModule=_FakeModule)
    monkeypatch.setattr(cb, "_cupy", lambda: fake)
    _FakeModule.loaded = []
    return device


def _no_compile(*args, **kwargs):
    raise AssertionError("compiled although the entry is cached")


def test_nvrtc_target_prefers_sass_and_falls_back_to_ptx():
    assert cb.nvrtc_target(90, SUPPORTED) == ("-arch=sm_90", "cubin")
    assert cb.nvrtc_target(87, SUPPORTED) == ("-arch=compute_86", "ptx")
    assert cb.nvrtc_target(130, SUPPORTED) == ("-arch=compute_121", "ptx")  # newer than NVRTC
    with pytest.raises(RuntimeError, match="compute capability 60"):
        cb.nvrtc_target(60, SUPPORTED)


def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NDCLS_CACHE_DIR", str(tmp_path))
    assert cb.cache_dir() == tmp_path / "cupy"
    monkeypatch.delenv("NDCLS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cb.cache_dir() == tmp_path / "xdg" / "ndcls" / "cupy"


def test_load_functions_compiles_once_and_caches_in_memory_and_on_disk(cache, fake_cupy, monkeypatch):
    names = KEY.name_expressions
    functions = cb.load_functions(cb.kernel_source(), names)
    assert list(functions) == list(names)
    path = _FakeModule.loaded[0]
    assert path.startswith(str(cache)) and path.endswith(".cubin")
    with open(path, "rb") as f:
        assert f.read(4) == b"\x7fELF"  # SASS for the device's sm_90
    assert all(fn.name.startswith("_ZN5ndcls") and fn.name.encode() in open(path, "rb").read() for fn in functions.values())
    # memory: the same functions, nothing loaded again; disk: a fresh process reuses the binary
    monkeypatch.setattr(cb, "compile_source", _no_compile)
    assert cb.load_functions(cb.kernel_source(), names) is functions
    assert len(_FakeModule.loaded) == 1
    cb._MODULES.clear()
    again = cb.load_functions(cb.kernel_source(), names)
    assert _FakeModule.loaded == [path, path] and {n: f.name for n, f in again.items()} == {n: f.name for n, f in functions.items()}
    assert sorted(p.suffix for p in cache.iterdir()) == [".cubin", ".json"]  # no temporary files left


def test_entries_differ_by_device_target_and_names(cache, fake_cupy):
    cb.load_functions(cb.kernel_source(), KEY.name_expressions)
    cb.load_functions(cb.kernel_source(), KEY.name_expressions[:1])  # other names
    fake_cupy.id, fake_cupy.compute_capability = 1, "200"  # a device newer than NVRTC: PTX
    functions = cb.load_functions(cb.kernel_source(), KEY.name_expressions)
    assert _FakeModule.loaded[-1].endswith(".ptx") and len(set(_FakeModule.loaded)) == 3
    with open(_FakeModule.loaded[-1], "rb") as f:
        assert b".target sm_" in f.read()
    assert len(cb._MODULES) == 3 and len(functions) == 2


def test_compile_errors_show_nvrtc_log(cache, fake_cupy):
    broken = cb.kernel_source().replace("A total = A(1);", "A total = A(1)", 1)
    with pytest.raises(cb.CompileError, match=r"(?s)-ftz=false.*error: expected a \";\""):
        cb.load_functions(broken, KEY.name_expressions)
    assert not cache.exists() or not list(cache.iterdir())


def test_concurrent_compiles_of_one_entry_leave_a_complete_entry(cache):
    results, errors = [], []

    def work():
        try:
            results.append(cb.compiled_module(cb.kernel_source(), KEY.name_expressions, 90))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({str(path) for path, _ in results}) == 1
    assert sorted(p.suffix for p in cache.iterdir()) == [".cubin", ".json"]


def test_unwritable_cache_falls_back_to_a_temporary_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NDCLS_CACHE_DIR", str(blocker))
    monkeypatch.setattr(cb, "_FALLBACK_DIR", [])
    with pytest.warns(RuntimeWarning, match="NDCLS_CACHE_DIR"):
        path, lowered = cb.compiled_module(cb.kernel_source(), KEY.name_expressions, 90)
    assert path.is_file() and not str(path).startswith(str(blocker)) and set(lowered) == set(KEY.name_expressions)
    monkeypatch.setattr(cb, "compile_source", _no_compile)
    assert cb.compiled_module(cb.kernel_source(), KEY.name_expressions, 90)[0] == path
    shutil.rmtree(path.parent)
