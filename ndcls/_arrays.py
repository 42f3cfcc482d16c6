"""Caller's arrays in, caller's arrays out: library detection and zero-copy DLPack exchange.

Backends compute on NumPy arrays (host) or CuPy arrays (CUDA). Whatever the caller passed
(NumPy, CuPy, torch, JAX, any ``__dlpack__`` object) is viewed as one of those two without
copying, and results go back to the caller's library the same way. Nothing here imports
torch, CuPy or JAX unless the caller's arrays already come from them.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass

import numpy as np

_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def _library(x) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    root = type(x).__module__.partition(".")[0]
    if root in ("torch", "cupy"):
        return root
    if root in ("jax", "jaxlib"):
        return "jax"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return "dlpack"
    raise TypeError(
        f"expected an array (NumPy, CuPy, torch, JAX or any object with __dlpack__), got {type(x).__name__}"
    )


def _device(x, library: str) -> tuple[str, int]:
    if library == "numpy":
        return ("cpu", 0)
    if library == "torch":
        dev = x.device
        if dev.type == "cpu":
            return ("cpu", 0)
        if dev.type == "cuda":
            return ("cuda", dev.index or 0)
        raise ValueError(f"torch tensors on device {dev} are not supported (use cpu or cuda)")
    kind, index = x.__dlpack_device__()
    if kind in (_DL_CPU, _DL_CUDA_HOST):
        return ("cpu", 0)
    if kind in (_DL_CUDA, _DL_CUDA_MANAGED):
        return ("cuda", int(index))
    raise ValueError(f"arrays on DLPack device type {kind} are not supported (use CPU or CUDA)")


def import_cupy():
    """CuPy, or an ImportError that says how to install it."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        raise ImportError(
            "CuPy is needed for CUDA arrays and the 'cupy' backend but could not be imported "
            f"({exc}). Install it with: pip install 'ndcls[cuda]' (CUDA 12: cupy-cuda12x)"
        ) from exc
    return cupy


@functools.lru_cache(maxsize=None)
def _cuda_device_count() -> int:
    return import_cupy().cuda.runtime.getDeviceCount()


def cupy_on_device(index: int):
    """CuPy, once CUDA device ``index`` is known to exist; else a RuntimeError that says why.

    Without this, arrays that report a CUDA device on a machine without a usable one would
    fail deep inside CuPy with a driver error that does not name the cause.
    """
    cupy = import_cupy()
    try:
        count = _cuda_device_count()
    except Exception as exc:  # no driver, driver too old, no device
        raise RuntimeError(f"the arrays are on cuda:{index}, but CUDA is not usable on this machine ({exc})") from exc
    if not 0 <= index < count:
        raise RuntimeError(f"the arrays are on cuda:{index}, but this machine has {count} CUDA device(s)")
    return cupy


@dataclass(frozen=True)
class ArrayContext:
    """Where the caller's arrays live: their library and device."""

    library: str  # "numpy", "torch", "cupy", "jax" or "dlpack"
    device: tuple[str, int]  # ("cpu", 0) or ("cuda", ordinal)

    @property
    def on_gpu(self) -> bool:
        return self.device[0] == "cuda"

    def to_compute(self, x):
        """View a caller array as NumPy (host) or CuPy (CUDA), without copying."""
        if x is None:
            return None
        if self.library == "numpy":
            return x
        if self.library == "cupy":
            return x
        if self.library == "torch":
            x = x.detach()
            if x.is_conj() or x.is_neg():
                x = x.resolve_conj().resolve_neg()
            if self.on_gpu:
                return cupy_on_device(self.device[1]).from_dlpack(x)
            return np.from_dlpack(x)
        if self.on_gpu:
            return cupy_on_device(self.device[1]).from_dlpack(x)
        return np.from_dlpack(x)

    def from_compute(self, x):
        """Hand a NumPy/CuPy result back as the caller's array type, without copying."""
        if x is None or self.library in ("numpy", "cupy", "dlpack"):
            return x
        if self.library == "torch":
            import torch

            return torch.from_dlpack(x)
        if self.library == "jax":
            import jax

            return jax.dlpack.from_dlpack(x)
        raise AssertionError(self.library)

    def stream(self):
        """Context in which GPU work runs on the caller's current stream.

        CuPy callers: CuPy's current stream already is theirs. torch callers: torch's current
        CUDA stream, wrapped as CuPy's current stream (and the device made current).
        """
        if not self.on_gpu:
            return contextlib.nullcontext()
        cupy = cupy_on_device(self.device[1])
        stack = contextlib.ExitStack()
        stack.enter_context(cupy.cuda.Device(self.device[1]))
        if self.library == "torch":
            import torch

            ptr = torch.cuda.current_stream(self.device[1]).cuda_stream
            stack.enter_context(cupy.cuda.ExternalStream(ptr, self.device[1]))
        return stack


#: arguments that may be None (skipped); any other None is a TypeError naming the argument
OPTIONAL_ARRAYS = frozenset({"sigma"})


def _check_not_differentiated(name: str, x) -> None:
    """The array API builds no autograd graph: refuse tensors that expect one."""
    if getattr(x, "requires_grad", False) and sys.modules["torch"].is_grad_enabled():
        raise TypeError(
            f"{name} requires grad, but ndcls.construct and ndcls.construct_grad are not differentiable (the "
            f"result would have no autograd graph): use ndcls.torch_bridge.construct, which is, or call "
            f"them on {name}.detach() or under torch.no_grad()"
        )


def array_context(**arrays) -> ArrayContext:
    """Common library and device of the named arrays (None is allowed for :data:`OPTIONAL_ARRAYS`).

    Raises TypeError for non-arrays, mixed libraries and torch tensors that require grad (with
    grad mode on), ValueError for mixed devices, naming the arguments.
    """
    seen: dict[str, tuple[str, tuple[str, int]]] = {}
    for name, x in arrays.items():
        if x is None and name in OPTIONAL_ARRAYS:
            continue
        try:
            lib = _library(x)
        except TypeError as exc:
            raise TypeError(f"{name}: {exc}") from None
        if lib == "torch":
            _check_not_differentiated(name, x)
        seen[name] = (lib, _device(x, lib))
    if not seen:
        raise TypeError("no arrays given")
    (first, (lib, dev)), *rest = seen.items()
    for name, (other_lib, other_dev) in rest:
        if other_lib != lib:
            raise TypeError(f"{name} is a {other_lib} array but {first} is a {lib} array: mixed array libraries")
        if other_dev != dev:
            raise ValueError(f"{name} is on {other_dev[0]}:{other_dev[1]} but {first} is on {dev[0]}:{dev[1]}")
    return ArrayContext(lib, dev)


def shape_and_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and NumPy dtype of a compute array (NumPy or CuPy)."""
    return tuple(x.shape), np.dtype(x.dtype)
