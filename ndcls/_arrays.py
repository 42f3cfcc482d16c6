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

from ndcls._spec import dtype_name

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
        if x.is_cpu:
            return ("cpu", 0)
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


def _torch_allocator(device: int):
    """A CuPy allocator that takes memory from torch's caching allocator on ``device``.

    Each block is a uint8 torch tensor, kept alive by the CuPy memory that wraps it; torch
    allocates it on its current stream (the caller's, see :meth:`ArrayContext.stream`), so its
    reuse is ordered on that stream as for any torch tensor, and ``torch.cuda.memory_allocated``,
    ``empty_cache`` and torch's out-of-memory retry all see it.
    """
    import torch

    cupy = sys.modules["cupy"]
    where = torch.device("cuda", device)

    def allocate(size: int):
        block = torch.empty((size,), dtype=torch.uint8, device=where)
        memory = cupy.cuda.UnownedMemory(block.data_ptr(), size, block, device)
        return cupy.cuda.MemoryPointer(memory, 0)

    return allocate


_TORCH_ALLOCATORS: dict = {}


def _numpy_dtype(name: str):
    """NumPy dtype of ``name``; bfloat16 is ml_dtypes' (the only way a NumPy array holds one)."""
    return sys.modules["ml_dtypes"].bfloat16 if name == "bfloat16" else np.dtype(name)


@dataclass(frozen=True)
class ArrayContext:
    """Where the caller's arrays live: their library and device.

    Conversions take a ``mode`` (see :meth:`ndcls.Backend.compute_mode`): "native" views the
    array as it is, "float32" converts half precision to float32 for backends that compute in
    it (and results back), "bits" views bfloat16 as its int16 bits (NumPy and CuPy have no
    bfloat16 dtype) for kernels that read and write bfloat16 themselves.
    """

    library: str  # "numpy", "torch", "cupy", "jax" or "dlpack"
    device: tuple[str, int]  # ("cpu", 0) or ("cuda", ordinal)

    @property
    def on_gpu(self) -> bool:
        return self.device[0] == "cuda"

    def dtype_of(self, x):
        """A caller array's dtype: a NumPy dtype, or its name for torch ("float32", "bfloat16", ...)."""
        if self.library == "numpy" or self.library == "cupy":
            return x.dtype
        if self.library == "torch":
            return str(x.dtype).rpartition(".")[2]
        return dtype_name(x.dtype)

    def to_compute(self, x, mode: str = "native"):
        """View a caller array as NumPy (host) or CuPy (CUDA), without copying unless ``mode`` converts."""
        if x is None:
            return None
        if self.library == "numpy" or self.library == "cupy":
            if mode == "float32":
                return x.astype(np.float32)
            return x.view(np.int16) if mode == "bits" else x
        if self.library == "torch":
            x = x.detach()
            if x.is_conj() or x.is_neg():
                x = x.resolve_conj().resolve_neg()
            if mode == "float32":
                x = x.float()
            elif mode == "bits":
                import torch

                x = x.view(torch.int16)
            if self.on_gpu:
                return cupy_on_device(self.device[1]).from_dlpack(x)
            return x.numpy()  # a view, as np.from_dlpack gives, in half the time
        if mode != "native":
            raise TypeError(
                f"{self.library} arrays of dtype {dtype_name(x.dtype)} cannot be exchanged through DLPack with "
                "NumPy or CuPy; pass torch tensors or float32/float64 arrays"
            )
        if self.on_gpu:
            return cupy_on_device(self.device[1]).from_dlpack(x)
        return np.from_dlpack(x)

    def from_compute(self, x, mode: str = "native", dtype: str = ""):
        """Hand a NumPy/CuPy result back as the caller's array type (of dtype ``dtype`` when
        ``mode`` converted it), without copying where the dtype allows."""
        if x is None:
            return None
        if self.library == "numpy" or self.library == "cupy":
            if mode == "native":
                return x
            return x.astype(_numpy_dtype(dtype)) if mode == "float32" else x.view(_numpy_dtype(dtype))
        if self.library == "torch":
            import torch

            t = torch.from_numpy(x) if type(x) is np.ndarray else torch.from_dlpack(x)
            if mode == "float32":
                return t.to(getattr(torch, dtype))
            return t.view(torch.bfloat16) if mode == "bits" else t
        if self.library == "jax":
            import jax

            y = jax.dlpack.from_dlpack(x)
            return y.astype(dtype) if mode == "float32" else y
        if self.library == "dlpack":
            return x
        raise AssertionError(self.library)

    def stream(self):
        """Context in which GPU work runs on the caller's current stream.

        CuPy callers: CuPy's current stream already is theirs. torch callers: torch's current
        CUDA stream, wrapped as CuPy's current stream (and the device made current), and CuPy
        allocating from torch's caching allocator, so that every result is a torch allocation.
        """
        if not self.on_gpu:
            return contextlib.nullcontext()
        index = self.device[1]
        cupy = cupy_on_device(index)
        stack = contextlib.ExitStack()
        stack.enter_context(cupy.cuda.Device(index))
        if self.library == "torch":
            import torch

            ptr = torch.cuda.current_stream(index).cuda_stream
            stack.enter_context(cupy.cuda.ExternalStream(ptr, index))
            allocator = _TORCH_ALLOCATORS.get(index)
            if allocator is None:
                allocator = _TORCH_ALLOCATORS.setdefault(index, _torch_allocator(index))
            stack.enter_context(cupy.cuda.using_allocator(allocator))
        return stack


_CPU = ("cpu", 0)
_CONTEXTS: dict = {}  # (library, device) -> ArrayContext: one instance each


#: arguments that may be None (skipped); any other None is a TypeError naming the argument
OPTIONAL_ARRAYS = frozenset({"sigma"})


def _check_not_differentiated(name: str, x) -> None:
    """The array API builds no autograd graph: refuse tensors that expect one."""
    if getattr(x, "requires_grad", False) and sys.modules["torch"].is_grad_enabled():
        raise TypeError(
            f"{name} requires grad, but the ndcls array API is not differentiable (the result would "
            f"have no autograd graph): use ndcls.torch_bridge.construct (or ndcls.torch_bridge.conv), "
            f"which is, or call it on {name}.detach() or under torch.no_grad()"
        )


def array_context(**arrays) -> ArrayContext:
    """Common library and device of the named arrays (None is allowed for :data:`OPTIONAL_ARRAYS`).

    Raises TypeError for non-arrays, mixed libraries and torch tensors that require grad (with
    grad mode on), ValueError for mixed devices, naming the arguments.
    """
    first = lib = dev = None
    for name, x in arrays.items():
        if x is None and name in OPTIONAL_ARRAYS:
            continue
        if type(x) is np.ndarray:  # the common case, without the general detection
            other_lib, other_dev = "numpy", _CPU
        else:
            try:
                other_lib = _library(x)
            except TypeError as exc:
                raise TypeError(f"{name}: {exc}") from None
            if other_lib == "torch":
                _check_not_differentiated(name, x)
            other_dev = _device(x, other_lib)
        if first is None:
            first, lib, dev = name, other_lib, other_dev
            continue
        if other_lib != lib:
            raise TypeError(f"{name} is a {other_lib} array but {first} is a {lib} array: mixed array libraries")
        if other_dev != dev:
            raise ValueError(f"{name} is on {other_dev[0]}:{other_dev[1]} but {first} is on {dev[0]}:{dev[1]}")
    if first is None:
        raise TypeError("no arrays given")
    ctx = _CONTEXTS.get((lib, dev))
    if ctx is None:
        ctx = _CONTEXTS.setdefault((lib, dev), ArrayContext(lib, dev))
    return ctx


def shape_and_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and NumPy dtype of a compute array (NumPy or CuPy)."""
    return tuple(x.shape), np.dtype(x.dtype)
