"""The one harness every backend passes: which backends run here, and how big their cases are.

A backend that is registered and can run on this machine is tested by every property in
``test_backends.py`` against the NumPy reference. Simulated CUDA gets small shapes and
fewer examples; real-GPU backends are marked ``gpu``.
"""

from __future__ import annotations

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

#: backend name -> (pytest marks, budget). Backends absent from the registry are skipped.
_HARNESS = {
    "numba": ((), Budget()),
    "numba-cuda": ((pytest.mark.cudasim,) if SIMULATED else (pytest.mark.gpu,), _SIMULATOR if SIMULATED else Budget()),
    "cupy": ((pytest.mark.gpu,), Budget()),
}


def backend_params(operation="construct"):
    """pytest params for the backends compared with the reference (the reference itself too),
    among those that implement ``operation`` ("construct" or "conv")."""
    from ndcls._registry import operation_backends

    params = [pytest.param("numpy", id="numpy")]
    for name, (marks, _) in _HARNESS.items():
        if name in operation_backends(operation):
            params.append(pytest.param(name, id=name, marks=marks))
    return params


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

