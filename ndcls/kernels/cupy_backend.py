"""Backend "cupy": CUDA C++ kernels compiled by NVRTC through CuPy ``RawModule``.

The kernels live in ``ndcls/kernels/cuda/`` (``dcls.cu`` including ``dcls_element.cuh``, a
line-by-line transcription of :mod:`ndcls.kernels._element`). They are templates over the
storage dtype, the number M of learned axes, the interpolation and the index type; one
:class:`Specialisation` names one instantiation of the forward and the backward kernel.
Sizes, strides, counts and batch are kernel arguments, so a new layer shape never recompiles.
Compiled kernels are memoised per (device, specialisation) and cached on disk by
:func:`load_functions`, which compiles with NVRTC itself: CuPy's ``RawModule(code=...)`` appends
``-ftz=true``, which would flush float32 subnormals to zero.

* forward: each CUDA block builds a range of ``K`` (a tile of whole batch kernels, or a chunk of
  one batch kernel that does not fit) in shared memory with shared-memory atomics and writes it
  to global memory once, coalesced;
* backward: a gather, one group of lanes per element, no atomics, deterministic.

Arithmetic is in float32 for float16, bfloat16 and float32 inputs, in float64 for float64
inputs (bfloat16 arrives as int16 bits, ``spec.storage == "bfloat16"``). NumPy inputs are
copied to the current CuPy device and the results copied back; CuPy inputs are used in place
and the results are CuPy arrays, allocated by CuPy's current allocator (torch's, while a torch
call is served). Work runs on CuPy's current stream. A call on CuPy inputs copies nothing
host-to-device and never synchronises: the layout is a struct passed by value, so launches can
be captured in a CUDA graph (the first call of a specialisation compiles it: warm up before
capturing).
CuPy itself is imported at the first call, so this module imports (and its kernels compile
with NVRTC, see :func:`specialisations`) without CuPy or a GPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ndcls._arrays import cupy_on_device, import_cupy
from ndcls._spec import INTERPOLATIONS, MAX_DIMS, KernelSpec
from ndcls.kernels._element import INTERPOLATION_CODES

#: NVRTC options, shared by the backend and the compile-only test. IEEE float32 like NumPy and
#: torch: subnormals kept (CuPy's own compile path would add -ftz=true), exact division and sqrt.
COMPILE_OPTIONS = ("--std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true")
#: Storage dtype -> C++ type in the kernels (float16 is a struct of IEEE half bits).
CTYPES = {"float16": "ndcls::f16", "bfloat16": "ndcls::bf16", "float32": "float", "float64": "double"}
#: Index types: 32-bit unless a flat index can come near 2**31 (see :func:`index_is_64bit`).
INDEX_TYPES = {False: "int", True: "long long"}

_THREADS = 256  # threads per block (a multiple of 32)
_SOURCE_DIR = "cuda"
_MAIN_SOURCE = "dcls.cu"
_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)


# -- specialisations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Specialisation:
    """One instantiation of the kernel templates: storage dtype, M, interpolation, index width."""

    dtype: str
    n_learned: int
    interpolation: str
    int64: bool

    @property
    def template_args(self) -> str:
        code = INTERPOLATION_CODES[self.interpolation]
        return f"{CTYPES[self.dtype]}, {self.n_learned}, {code}, {INDEX_TYPES[self.int64]}"

    @property
    def construct_name(self) -> str:
        return f"ndcls::construct_kernel<{self.template_args}>"

    @property
    def grad_name(self) -> str:
        return f"ndcls::construct_grad_kernel<{self.template_args}>"

    @property
    def name_expressions(self) -> tuple[str, str]:
        return (self.construct_name, self.grad_name)


def index_is_64bit(spec) -> bool:
    """Whether the kernels need 64-bit indices for ``spec``.

    ``spec.needs_int64`` covers flat indices into ``K``; positions hold ``M * B * D * C`` values,
    which can exceed it. 2**30 leaves headroom for the grid-stride increments in the kernels.
    """
    n_values = spec.n_learned * spec.n_batch * spec.n_dense * spec.count
    return spec.needs_int64 or max(n_values, spec.n_batch * spec.block) >= 2**30


def specialisation(spec) -> Specialisation:
    """The specialisation the dispatcher requests for ``spec``."""
    return Specialisation(spec.dtype_name, spec.n_learned, spec.interpolation, index_is_64bit(spec))


def specialisations() -> tuple[Specialisation, ...]:
    """Every specialisation :func:`specialisation` can return (the compile-only test builds them all)."""
    return tuple(
        Specialisation(dtype, m, interpolation, int64)
        for dtype in CTYPES
        for m in range(1, MAX_DIMS + 1)
        for interpolation in INTERPOLATIONS
        for int64 in (False, True)
    )


@functools.lru_cache(maxsize=None)
def kernel_source(main: str = _MAIN_SOURCE) -> str:
    """The CUDA source ``main`` with its local ``#include "..."`` files inlined (the compile cache keys on it)."""
    root = resources.files("ndcls.kernels").joinpath(_SOURCE_DIR)
    seen = set()

    def expand(name):
        if name in seen:
            return ""
        seen.add(name)
        text = root.joinpath(name).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(main)


# -- launch configuration (pure arithmetic, testable without a GPU) ----------------------------


@dataclass(frozen=True)
class DeviceLimits:
    n_sm: int
    shared_default: int  # bytes of shared memory per block without opting in
    shared_optin: int  # the most a block may opt in to
    capability: tuple[int, int]


@dataclass(frozen=True)
class Launch:
    grid: int
    threads: int
    group: int  # lanes per element
    shared: int  # dynamic shared memory, bytes
    span: int = 0  # forward: cells of K built per block


def layout_dtype(int64: bool) -> np.dtype:
    """NumPy twin of the kernels' ``Layout<I>`` struct (no padding: every field is of type I)."""
    it = np.int64 if int64 else np.int32
    fields = [(name, it, (MAX_DIMS,)) for name in ("sizes", "strides", "dense_sizes", "dense_strides")]
    return np.dtype([*fields, ("n_dense_axes", it)], align=True)


@functools.lru_cache(maxsize=1024)
def layout_value(sizes, learned_dims, int64: bool) -> np.void:
    """The ``Layout<I>`` kernel argument for kernels of ``sizes`` moved along ``learned_dims``."""
    spec = KernelSpec(sizes, learned_dims, "bilinear", (), 1, np.dtype(np.float32))
    value = np.zeros((), dtype=layout_dtype(int64))
    m, dense = spec.n_learned, spec.dense_dims
    value["sizes"][:m] = spec.learned_sizes
    value["strides"][:m] = spec.learned_strides
    value["dense_sizes"][: len(dense)] = spec.dense_sizes
    value["dense_strides"][: len(dense)] = [spec.axis_strides[a] for a in dense]
    value["n_dense_axes"] = len(dense)
    return value[()]


def _acc_bytes(spec) -> int:
    return 8 if np.dtype(spec.dtype) == np.float64 else 4


def _profile_length(spec) -> int:
    """Scratch values per profile: the cells an element's rows can touch (bilinear: 2 per row)."""
    if spec.interpolation == "bilinear":
        return sum(min(2, s) for s in spec.learned_sizes)
    return sum(spec.learned_sizes)


def _group_width(spec) -> int:
    """Lanes per element: a power of two <= 32 near the number of cells one element can touch."""
    cells = 2**spec.n_learned if spec.interpolation == "bilinear" else math.prod(spec.learned_sizes)
    return min(32, 1 << max(0, cells - 1).bit_length())


def _groups(spec, limits: DeviceLimits, per_group: int, threads: int) -> tuple[int, int]:
    """(threads, group): ``threads`` in groups of :func:`_group_width`, or, when their scratch
    would take more than half the default shared memory, fewer groups of the same width (whole
    warps where possible: a warp of narrow groups costs the scratch of all of them)."""
    group = _group_width(spec)
    if (threads // group) * per_group <= limits.shared_default // 2:
        return threads, group
    n_groups = max(1, (limits.shared_default // 2) // per_group)
    per_warp = 32 // group
    if n_groups >= per_warp:
        n_groups -= n_groups % per_warp
    return group * n_groups, group


def _too_long(spec, limits: DeviceLimits, need: int):
    return ValueError(
        f"backend 'cupy' cannot build kernels with learned sizes {spec.learned_sizes}: one element's "
        f"profiles need {need} bytes of shared memory, more than this device allows per block "
        f"({limits.shared_optin}); use backend='numba-cuda' or a CPU backend"
    )


def forward_launch(spec, limits: DeviceLimits, threads: int = _THREADS) -> Launch:
    """Grid, block and shared memory of the forward kernel for ``spec`` on a device with ``limits``."""
    acc = _acc_bytes(spec)
    per_group = _profile_length(spec) * acc
    threads, group = _groups(spec, limits, per_group, threads)
    scratch = (threads // group) * per_group
    total = spec.n_batch * spec.block
    cells_default = (limits.shared_default - scratch) // acc
    cells_optin = (limits.shared_optin - scratch) // acc
    if cells_optin < 32:
        raise _too_long(spec, limits, scratch + 32 * acc)
    if spec.block <= cells_default:
        # whole batch kernels per block, but keep about two blocks per SM busy
        tiles = min(cells_default // spec.block, -(-spec.n_batch // (2 * limits.n_sm)))
        span = max(1, tiles) * spec.block
    elif spec.block <= cells_optin:
        span = spec.block
    else:  # fallback: each batch kernel in several chunks
        span = cells_optin
    grid = max(1, min(-(-total // span), 2**31 - 1))
    return Launch(grid=grid, threads=threads, group=group, shared=span * acc + scratch, span=span)


def backward_launch(spec, limits: DeviceLimits, threads: int = _THREADS) -> Launch:
    """Grid, block and shared memory of the backward kernel for ``spec`` on a device with ``limits``."""
    per_group = 3 * _profile_length(spec) * _acc_bytes(spec)
    threads, group = _groups(spec, limits, per_group, threads)
    shared = (threads // group) * per_group
    if shared > limits.shared_optin:
        raise _too_long(spec, limits, shared)
    n_elements = spec.n_batch * spec.n_dense * spec.count
    grid = max(1, min(-(-n_elements // (threads // group)), 2**31 - 1))
    return Launch(grid=grid, threads=threads, group=group, shared=shared)


# -- per-device state ---------------------------------------------------------------------------

_LOCK = threading.Lock()
_KERNELS: dict = {}  # (device id, Specialisation) -> (forward RawKernel, backward RawKernel)


def _cupy():
    return import_cupy()


@functools.lru_cache(maxsize=None)
def _limits(device_id: int) -> DeviceLimits:
    props = _cupy().cuda.runtime.getDeviceProperties(device_id)
    limits = DeviceLimits(
        n_sm=int(props["multiProcessorCount"]),
        shared_default=int(props["sharedMemPerBlock"]),
        shared_optin=int(props.get("sharedMemPerBlockOptin", props["sharedMemPerBlock"])),
        capability=(int(props["major"]), int(props["minor"])),
    )
    if limits.capability < (7, 0):
        raise RuntimeError(
            f"backend 'cupy' needs a GPU of compute capability 7.0 or newer (independent thread "
            f"scheduling for its sub-warp groups); device {device_id} has {limits.capability[0]}.{limits.capability[1]}"
        )
    return limits


def _kernels(device_id: int, key: Specialisation):
    """Forward and backward kernels of ``key`` on ``device_id`` (the current device), loaded once per device."""
    found = _KERNELS.get((device_id, key))
    if found is not None:
        return found
    with _LOCK:
        found = _KERNELS.get((device_id, key))
        if found is None:
            functions = load_functions(kernel_source(), key.name_expressions)
            found = tuple(functions[name] for name in key.name_expressions)
            optin = _limits(device_id).shared_optin
            for fn in found:  # allow launches up to the device's opt-in shared memory
                fn.max_dynamic_shared_size_bytes = optin - fn.shared_size_bytes
            _KERNELS[(device_id, key)] = found
    return found


# -- compiling and loading modules (shared with the other CuPy kernel modules) --------------------

#: Bumped when the layout of the disk cache changes.
_CACHE_FORMAT = 1
_MODULE_LOCK = threading.Lock()
_MODULES: dict = {}  # (device id, source, name expressions) -> {name expression: kernel function}
_FALLBACK_DIR: list = []  # a private temporary directory, once the cache directory proved unwritable


class CompileError(RuntimeError):
    """NVRTC rejected a source; the message holds NVRTC's log."""


def cache_dir() -> Path:
    """Where compiled modules are kept: ``$NDCLS_CACHE_DIR/cupy``, by default ``~/.cache/ndcls/cupy``."""
    root = os.environ.get("NDCLS_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "ndcls")
    return Path(root) / "cupy"


def nvrtc_target(capability: int, supported) -> tuple[str, str]:
    """``(-arch option, "cubin" or "ptx")`` for a device of ``capability`` (e.g. 90).

    SASS for the device when NVRTC knows its architecture; otherwise PTX of the newest one
    NVRTC supports below it, which the driver compiles for the device (as CuPy does).
    """
    if capability in supported:
        return f"-arch=sm_{capability}", "cubin"
    older = [arch for arch in supported if arch < capability]
    if not older:
        raise RuntimeError(f"NVRTC cannot generate code for compute capability {capability} (it supports {sorted(supported)})")
    return f"-arch=compute_{max(older)}", "ptx"


def compile_source(source: str, name_expressions, arch_option: str) -> tuple[bytes, dict[str, str]]:
    """Compile ``source`` with :data:`COMPILE_OPTIONS` and ``arch_option`` (``-arch=sm_90`` gives a
    cubin, ``-arch=compute_90`` PTX); returns ``(binary, {name expression: lowered name})``.

    NVRTC only, no GPU needed. Raises :class:`CompileError` with NVRTC's log.
    """
    from cupy_backends.cuda.libs import nvrtc

    options = (*COMPILE_OPTIONS, arch_option)
    program = nvrtc.createProgram(source, "ndcls.cu", (), ())
    try:
        for name in name_expressions:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(program)
            raise CompileError(f"NVRTC could not compile the kernels ({exc}), options {' '.join(options)}:\n{log}") from None
        lowered = {name: nvrtc.getLoweredName(program, name) for name in name_expressions}
        binary = nvrtc.getPTX(program) if arch_option.startswith("-arch=compute_") else nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    return binary, lowered


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: readers in other
    processes see the old file or the whole new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def compiled_module(source: str, name_expressions, capability: int) -> tuple[Path, dict[str, str]]:
    """``(path of a cubin or PTX file, {name expression: lowered name})`` of ``source`` for a
    device of ``capability``, from the disk cache or compiled into it (no GPU needed).

    The cache key hashes the source, options, target, name expressions, NVRTC's and CuPy's
    versions. Each entry is a binary and a JSON file of lowered names, written in that order,
    each atomically, so an entry whose JSON file reads is complete.
    """
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    names = tuple(dict.fromkeys(name_expressions))
    arch_option, kind = nvrtc_target(capability, nvrtc.getSupportedArchs())
    key = "\0".join((str(_CACHE_FORMAT), source, *COMPILE_OPTIONS, arch_option, *names, repr(nvrtc.getVersion()), cupy.__version__))
    digest = hashlib.sha256(key.encode()).hexdigest()
    for directory in (cache_dir(), *_FALLBACK_DIR):
        path = directory / f"{digest}.{kind}"
        try:
            lowered = json.loads(path.with_suffix(".json").read_text())
            if path.is_file() and sorted(lowered) == sorted(names):
                return path, lowered
        except (OSError, ValueError):
            pass  # absent or unreadable: compile (again) and overwrite
    binary, lowered = compile_source(source, names, arch_option)
    try:
        return _store(cache_dir(), f"{digest}.{kind}", binary, lowered)
    except OSError as exc:
        if not _FALLBACK_DIR:
            _FALLBACK_DIR.append(Path(tempfile.mkdtemp(prefix="ndcls-cupy-")))
            warnings.warn(f"ndcls: cannot write the kernel cache in {cache_dir()} ({exc}); set NDCLS_CACHE_DIR. "
                          f"Using {_FALLBACK_DIR[0]} for now", RuntimeWarning, stacklevel=3)
        return _store(_FALLBACK_DIR[0], f"{digest}.{kind}", binary, lowered)


def _store(directory: Path, name: str, binary: bytes, lowered: dict) -> tuple[Path, dict[str, str]]:
    """Write one cache entry: the binary first, then its JSON file of lowered names."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    _write_atomically(path, binary)
    _write_atomically(path.with_suffix(".json"), json.dumps(lowered, indent=0).encode())
    return path, lowered


def load_functions(source: str, name_expressions: tuple[str, ...]) -> dict[str, "cupy.RawKernel"]:
    """Compile ``source`` for the current device with :data:`COMPILE_OPTIONS` (``-ftz=false``, no
    fast math), load it and return ``{name_expression: kernel function}``; cached per (device,
    source, names) in memory and on disk (:func:`compiled_module`).

    ``name_expressions`` are C++ expressions naming ``__global__`` functions, e.g. template
    instantiations such as ``ndcls::construct_kernel<float, 2, 2, int>``. The functions are the
    ``RawKernel`` objects of ``cupy.RawModule(path=...)``, called as
    ``fn(grid, block, args, shared_mem=...)``. Raises :class:`CompileError`, with NVRTC's log,
    if the source does not compile. Use this, not ``RawModule(code=...)``, which adds ``-ftz=true``.
    """
    cupy = _cupy()
    names = tuple(dict.fromkeys(name_expressions))  # without repeats, in order
    device = cupy.cuda.Device()
    key = (device.id, source, names)
    found = _MODULES.get(key)
    if found is not None:
        return found
    with _MODULE_LOCK:
        found = _MODULES.get(key)
        if found is None:
            path, lowered = compiled_module(source, names, int(device.compute_capability))
            module = cupy.RawModule(path=str(path))
            found = {name: module.get_function(lowered[name]) for name in names}
            _MODULES[key] = found
    return found


@functools.lru_cache(maxsize=1024)
def _plan(spec, device_id: int, direction: str):
    """``(Specialisation, Launch, layout value)`` of one call: what depends only on shapes and dtypes."""
    key = specialisation(spec)
    plan = forward_launch if direction == "forward" else backward_launch
    return key, plan(spec, _limits(device_id)), layout_value(spec.sizes, spec.learned_dims, key.int64)


def _device_and_arrays(*arrays):
    """CuPy's current device id and the arrays on it (NumPy copied in, CuPy as is)."""
    cupy = _cupy()
    try:
        device_id = cupy.cuda.Device().id
        cupy_on_device(device_id)
    except Exception as exc:
        raise RuntimeError(f"backend 'cupy' needs a CUDA device, but none is usable here ({exc})") from exc
    return device_id, [None if x is None else cupy.asarray(x) for x in arrays]


def _scalars(spec, int64: bool):
    it = np.int64 if int64 else np.int32
    return it(spec.n_batch), it(spec.n_dense), it(spec.count), it(spec.block)


# -- the backend contract ----------------------------------------------------------------------


def construct(spec, weight, positions, sigma, out=None):
    """``K`` of shape ``(B, prod(sizes))`` from weight ``(B, D, C)``, positions and sigma ``(M, B, D, C)``.

    NumPy inputs give a NumPy result (written into ``out`` if given); CuPy inputs a CuPy result.
    """
    host = isinstance(weight, np.ndarray)
    if spec.n_batch * spec.block == 0:
        kernel = np.zeros((spec.n_batch, spec.block), dtype=spec.dtype) if host else _cupy().zeros((spec.n_batch, spec.block), dtype=spec.dtype)
        return kernel if out is None else out
    device_id, (w, p, s) = _device_and_arrays(weight, positions, sigma)
    cupy = _cupy()
    kernel = out if (out is not None and not host) else cupy.empty((spec.n_batch, spec.block), dtype=spec.dtype)
    key, launch, layout = _plan(spec, device_id, "forward")
    forward, _ = _kernels(device_id, key)
    it = np.int64 if key.int64 else np.int32
    args = (w, p, p if s is None else s, kernel, layout, *_scalars(spec, key.int64), it(launch.span))
    args += (np.int32(_profile_length(spec)), np.int32(launch.group))
    forward((launch.grid,), (launch.threads,), args, shared_mem=launch.shared)
    if not host:
        return kernel
    if out is None:
        return kernel.get()
    kernel.get(out=out)
    return out


def construct_grad(spec, grad_kernel, weight, positions, sigma):
    """``(grad_weight, grad_positions, grad_sigma)`` shaped like weight, positions, sigma (None for bilinear)."""
    host = isinstance(weight, np.ndarray)
    device_id, (g, w, p, s) = _device_and_arrays(grad_kernel, weight, positions, sigma)
    cupy = _cupy()
    grad_w = cupy.empty(w.shape, dtype=spec.dtype)
    grad_p = cupy.empty(p.shape, dtype=spec.dtype)
    grad_s = cupy.empty(p.shape, dtype=spec.dtype) if spec.normalised else None
    if w.size:
        key, launch, layout = _plan(spec, device_id, "backward")
        _, backward = _kernels(device_id, key)
        args = (g, w, p, p if s is None else s, grad_w, grad_p, grad_p if grad_s is None else grad_s, layout)
        args += (*_scalars(spec, key.int64), np.int32(_profile_length(spec)), np.int32(launch.group))
        backward((launch.grid,), (launch.threads,), args, shared_mem=launch.shared)
    grads = (grad_w, grad_p, grad_s)
    if host:
        return tuple(None if x is None else x.get() for x in grads)
    return grads
