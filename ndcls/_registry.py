"""The one registry of backends: name -> where it computes and the module that implements it.

A backend module is imported only when first used, so ``import ndcls`` stays light. It
provides two functions over canonical arrays (see :class:`ndcls.KernelSpec`)::

    construct(spec, weight, positions, sigma, out=None) -> kernel
        weight (B, D, C); positions, sigma (M, B, D, C) or sigma None -> kernel (B, prod(sizes));
        ``out``, if given, is a C-contiguous (B, prod(sizes)) array of the inputs' kind that
        receives the kernel (tests use it to check nothing is written outside K)
    construct_grad(spec, grad_kernel, weight, positions, sigma) -> (grad_weight, grad_positions, grad_sigma)
        grad_kernel (B, prod(sizes)) -> shapes of weight, positions, sigma (grad_sigma None for bilinear)

Further operations are registered per (operation, backend) with :func:`register_operation`
(SPEC section 9; see :class:`ndcls._spec.ConvSpec` for the canonical arrays)::

    conv(spec, input, weight, positions, sigma) -> output
        input (batch, in_channels, *spatial); weight (O, I, D, C); positions, sigma
        (M, Po, Pi, D, C) with Po in (1, O), Pi in (1, I) (broadcast axes kept at 1)
        -> output (batch, out_channels, *out_spatial)
    conv_grad(spec, grad_output, input, weight, positions, sigma)
        -> (grad_input, grad_weight, grad_positions, grad_sigma), grad_positions/grad_sigma
        shaped like the positions/sigma received (summed over their broadcast axes)

All inputs are C-contiguous arrays of ``spec.dtype``, NumPy arrays for ``device="cpu"``
backends; GPU backends accept NumPy (copied in and out) or CuPy arrays and return the same kind.

Dtypes: ``dtypes`` are those a backend takes natively (bfloat16 arrives as its bits, int16,
with ``spec.storage == "bfloat16"``); ``upcast`` are those the array API converts to float32
before calling the backend and converts the results back from (SPEC section 6: half precision
on the CPU). Any other dtype is refused with a TypeError naming both lists.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from ndcls._spec import HALF_DTYPES, dtype_name


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # "cpu": computes on host arrays; "cuda": on CUDA arrays (host arrays copied in/out)
    module: str
    dtypes: tuple[str, ...]
    install_hint: str = ""
    description: str = ""
    upcast: tuple[str, ...] = ()  # dtypes computed in float32 and returned in their own dtype

    def load(self):
        module = sys.modules.get(self.module)
        if module is not None:
            return module
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            hint = f" Install it with: {self.install_hint}" if self.install_hint else ""
            raise ImportError(f"backend {self.name!r} is not usable here: {exc}.{hint}") from exc

    def supports(self, dtype) -> bool:
        """Whether the array API accepts ``dtype`` for this backend (natively or upcast)."""
        name = dtype_name(dtype)
        return name in self.dtypes or name in self.upcast

    def compute_mode(self, dtype) -> str:
        """How arrays of ``dtype`` reach the kernels: "native", "bits" (bfloat16 as int16) or
        "float32" (upcast); a TypeError naming what the backend takes otherwise."""
        name = dtype_name(dtype)
        if name in self.dtypes:
            return "bits" if name == "bfloat16" else "native"
        if name in self.upcast:
            return "float32"
        raise TypeError(
            f"backend {self.name!r} takes dtypes {self.dtypes}"
            + (f" (and {self.upcast}, computed in float32)" if self.upcast else "")
            + f", got {name}"
        )


_BACKENDS: dict[str, Backend] = {}
_DEFAULTS = {"cpu": "numba", "cuda": "cupy"}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


def backends() -> tuple[str, ...]:
    """Names of the registered backends."""
    return tuple(_BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend must be None or one of {backends()}, got {name!r}") from None


#: (operation, backend name) -> module, for the operations a backend implements beyond
#: ``construct``/``construct_grad`` (those live in ``Backend.module``).
_OPERATIONS: dict[tuple[str, str], str] = {}


def register_operation(operation: str, backend: str, module: str) -> None:
    """Declare that ``module`` implements ``operation`` (a function of that name) for ``backend``."""
    _OPERATIONS[(operation, backend)] = module


def operation_backends(operation: str) -> tuple[str, ...]:
    """Names of the backends that implement ``operation``."""
    if operation in ("construct", "construct_grad"):
        return backends()
    return tuple(b for (op, b) in _OPERATIONS if op == operation and b in _BACKENDS)


def check_operation(operation: str, backend: Backend) -> None:
    """Raise NotImplementedError, before anything runs, if ``backend`` lacks ``operation``."""
    if operation not in ("construct", "construct_grad") and (operation, backend.name) not in _OPERATIONS:
        raise NotImplementedError(
            f"backend {backend.name!r} does not implement {operation!r} yet; "
            f"backends that do: {operation_backends(operation)}"
        )


def get_operation(operation: str, backend: Backend):
    """The function computing ``operation`` on ``backend`` (imports its module on first use)."""
    check_operation(operation, backend)
    if operation in ("construct", "construct_grad"):
        return getattr(backend.load(), operation)
    module = _OPERATIONS[(operation, backend.name)]
    try:
        return getattr(importlib.import_module(module), operation)
    except ImportError as exc:
        hint = f" Install it with: {backend.install_hint}" if backend.install_hint else ""
        raise ImportError(f"backend {backend.name!r} is not usable here: {exc}.{hint}") from exc


def default_backend(device: str) -> Backend:
    """The backend used for arrays on ``device`` ("cpu" or "cuda") when none is named."""
    name = _DEFAULTS[device]
    if name not in _BACKENDS:
        raise ValueError(
            f"no backend for {device} arrays is registered yet (registered: {backends()}); "
            f"the default for {device} arrays will be {name!r}"
        )
    return _BACKENDS[name]


register_backend(
    Backend(
        name="numpy",
        device="cpu",
        module="ndcls.kernels.reference",
        dtypes=("float32", "float64"),
        upcast=HALF_DTYPES,
        description="vectorised NumPy reference (dense intermediates; for testing)",
    )
)
register_backend(
    Backend(
        name="numba",
        device="cpu",
        module="ndcls.kernels.cpu",
        dtypes=("float32", "float64"),
        upcast=HALF_DTYPES,
        install_hint="pip install numba",
        description="Numba CPU kernels, parallel over batch",
    )
)
register_backend(
    Backend(
        name="cupy",
        device="cuda",
        module="ndcls.kernels.cupy_backend",
        dtypes=("float16", "bfloat16", "float32", "float64"),
        install_hint="pip install 'ndcls[cuda]'",
        description="CUDA C++ kernels compiled with NVRTC (no flush-to-zero) and loaded through CuPy (float16 and bfloat16 compute in float32)",
    )
)
register_backend(
    Backend(
        name="numba-cuda",
        device="cuda",
        module="ndcls.kernels.numba_cuda",
        dtypes=("float32", "float64"),
        upcast=HALF_DTYPES,
        install_hint="pip install 'ndcls[cuda]'",
        description="Numba CUDA kernels: one block per batch index, shared-memory tiles (runs under NUMBA_ENABLE_CUDASIM=1)",
    )
)

register_operation("conv", "numpy", "ndcls.kernels.reference_conv")
register_operation("conv_grad", "numpy", "ndcls.kernels.reference_conv")
register_operation("conv", "numba", "ndcls.kernels.cpu_conv")
register_operation("conv_grad", "numba", "ndcls.kernels.cpu_conv")
register_operation("conv", "cupy", "ndcls.kernels.cupy_conv")
register_operation("conv_grad", "cupy", "ndcls.kernels.cupy_conv")
register_operation("conv", "numba-cuda", "ndcls.kernels.numba_cuda_conv")
register_operation("conv_grad", "numba-cuda", "ndcls.kernels.numba_cuda_conv")
