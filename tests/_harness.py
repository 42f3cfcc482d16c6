"""The one harness every backend passes: which backends run here, and how big their cases are.

A backend that is registered and can run on this machine is tested by every property in
``test_backends.py`` against the NumPy reference. Simulated CUDA gets small shapes and
fewer examples; real-GPU backends are marked ``gpu``.

Emulated backends (:data:`EMULATIONS`: a GPU backend's own kernels compiled for the host, e.g.
"cupy-emulated") are not in the registry: the harness lists them for the operations they take
part in, and ``conftest.py`` registers one for each test that runs on it (:func:`registered`).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings

import ndcls
from conftest import SIMULATED


@dataclass(frozen=True)
class Budget:
    max_examples: int | None = None  # None: the profile's number
    case_limits: dict = field(default_factory=dict)


_SIMULATOR = Budget(max_examples=12, case_limits=dict(max_ndim=3, max_size=4, max_batch=2, max_count=2, max_cells=96))
# the g++ emulation of the CUDA C++ kernels (an OS thread per CUDA thread, grids cut to a few
# blocks) runs the conv harness's own draws (N <= 3, as built) in about 15 s on 2 cores
_EMULATOR = Budget(max_examples=40, case_limits=dict(max_ndim=3, max_size=5, max_batch=2, max_count=3))


@dataclass(frozen=True)
class Emulation:
    """A backend that runs another backend's device kernels on the host, registered by the harness."""

    module: str
    operations: tuple[str, ...]  # registered operations beyond construct / construct_grad
    harness: tuple[str, ...]  # the harness operations whose tests run on it
    available: bool

    def backend(self, name):
        import importlib

        return ndcls.Backend(name=name, device="cpu", module=self.module, dtypes=importlib.import_module(self.module).DTYPES)


#: name -> emulation (the construction kernels of "cupy-emulated" have their own tests in test_cupy_cpu.py)
EMULATIONS = {
    "cupy-emulated": Emulation("_cuda_emulator", ("conv", "conv_grad"), ("conv",), shutil.which("g++") is not None),
}
_NEEDS_GXX = pytest.mark.skipif(not EMULATIONS["cupy-emulated"].available, reason="needs g++ for the host emulation")

#: backend name -> (pytest marks, budget). Backends absent from the registry (and not in
#: EMULATIONS) are skipped.
_HARNESS = {
    "numba": ((), Budget()),
    "numba-cuda": ((pytest.mark.cudasim,) if SIMULATED else (pytest.mark.gpu,), _SIMULATOR if SIMULATED else Budget()),
    "cupy": ((pytest.mark.gpu,), Budget()),
    "cupy-emulated": ((pytest.mark.cuda_compile, _NEEDS_GXX), _EMULATOR),
}


def backend_params(operation="construct"):
    """pytest params for the backends compared with the reference (the reference itself too),
    among those that implement ``operation`` ("construct" or "conv")."""
    from ndcls._registry import operation_backends

    params = [pytest.param("numpy", id="numpy")]
    for name, (marks, _) in _HARNESS.items():
        emulation = EMULATIONS.get(name)
        if (operation in emulation.harness) if emulation else (name in operation_backends(operation)):
            params.append(pytest.param(name, id=name, marks=marks))
    return params


@contextmanager
def registered(name):
    """``name`` registered, with its operations, while the block runs, if it is an emulation
    (the registry is then restored as it was); nothing otherwise."""
    from ndcls import _registry

    emulation = EMULATIONS.get(name)
    if emulation is None:
        yield name
        return
    saved = _registry._BACKENDS.get(name), {op: _registry._OPERATIONS.get((op, name)) for op in emulation.operations}
    _registry.register_backend(emulation.backend(name))
    for op in emulation.operations:
        _registry.register_operation(op, name, emulation.module)
    try:
        yield name
    finally:
        backend, operations = saved
        if backend is None:
            _registry._BACKENDS.pop(name, None)
        else:
            _registry._BACKENDS[name] = backend
        for op, module in operations.items():
            if module is None:
                _registry._OPERATIONS.pop((op, name), None)
            else:
                _registry._OPERATIONS[op, name] = module


def budget(backend: str) -> Budget:
    return _HARNESS.get(backend, ((), Budget()))[1]


def for_cases(backend: str, strategy_factory, *, max_examples=None, **case_kwargs):
    """Run ``prop(case)`` over cases drawn by ``strategy_factory(**kwargs)`` within the backend's
    budget (and at most ``max_examples``, for properties whose cases are costly)."""
    b = budget(backend)
    limits = {**case_kwargs, **{k: min(v, case_kwargs.get(k, v)) for k, v in b.case_limits.items()}}
    caps = [n for n in (b.max_examples, max_examples) if n is not None]

    def decorate(prop):
        test = given(strategy_factory(**limits))(prop)
        if caps:
            test = settings(settings(), max_examples=min(*caps, settings().max_examples))(test)
        return test()

    return decorate

