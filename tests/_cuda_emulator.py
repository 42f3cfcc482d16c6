"""The "cupy" backend's CUDA C++ kernels run on the CPU, for checking their logic without a GPU.

The very source the backend hands to NVRTC (``cupy_backend.kernel_source()``) is compiled with
g++ against ``cuda_emulation/cuda_host.h``, which emulates threads, blocks, shared memory,
``__syncthreads``, ``__syncwarp``, warp shuffles and ``atomicAdd`` (one OS thread per CUDA
thread). Launch configurations come from the backend's own ``forward_launch`` and
``backward_launch``, for a device described by ``LIMITS`` (small, so that tiling, the
chunked fallback and whole-warp groups all occur on small kernels). float32, float64,
float16 and bfloat16. bfloat16's conversions are plain integer code (its arrays are int16 bits,
as the backend receives them: call :func:`construct`/:func:`construct_grad` with a bfloat16
spec); the PTX conversions of float16's loads and stores are rewritten into the emulation's own,
bit-exact ones (:func:`translate_ptx`); a PTX statement it does not know stops the build.

The direct convolution's kernels (``cupy_conv``, source ``dcls_conv.cu``, which includes
``dcls.cu``: one library per dtype holds both) run the same way: :func:`conv` and
:func:`conv_grad` follow ``cupy_conv``'s pipeline step by step on host arrays, with the plan,
specialisation and geometry of ``cupy_conv.call_plan`` for the ``LIMITS`` device and grids cut
to at most ``MAX_GRID`` blocks per axis (the kernels' grid-stride loops then take several
turns); scratch buffers that the GPU allocates uninitialised are poisoned here. float32 and
float64, N <= 3.

This module is a backend module in the sense of ``ndcls._registry`` (host arrays), with the
``conv`` operation too, registered under the name "cupy-emulated" by the tests that use it
(``_harness.registered``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ndcls._spec import gauss_cut
from ndcls.kernels import cupy_backend as cb
from ndcls.kernels import cupy_conv as cc

HEADER = Path(__file__).parent / "cuda_emulation" / "cuda_host.h"
#: A made-up device: 2 SMs, 4 KiB of shared memory per block (8 KiB opting in).
LIMITS = cb.DeviceLimits(n_sm=2, shared_default=4096, shared_optin=8192, capability=(8, 0))
THREADS = 64
#: the most blocks along each grid axis of a conv kernel's launch (OS threads are costly)
MAX_GRID = 3
#: dynamic shared memory a block gets on every CUDA device without opting in
SHARED_DEFAULT = 48 * 1024
CONV_SOURCE = "dcls_conv.cu"
CONV_MAX_NDIM = 3  # the conv specialisations built (the harness draws N <= 3)
DTYPES = ("float16", "float32", "float64")
#: PTX storage formats of ``cvt`` -> (exponent bits, mantissa bits) of emu::narrow / emu::widen.
PTX_FORMATS = {"f16": (5, 10)}
#: dtypes the emulation builds beyond those the registered "cupy-emulated" backend takes
BITS_DTYPES = ("bfloat16",)
CTYPES = {"float16": "ndcls::f16", "float32": "float", "float64": "double", "bfloat16": "ndcls::bf16"}

_CVT = re.compile(
    r'asm\("cvt\.(?:(?P<mode>rn|rz|rm|rp)\.)?(?P<dst>\w+)\.(?P<src>\w+) %0, %1;"\s*'
    r':\s*"=\w"\((?P<out>[^()]*)\)\s*:\s*"\w"\((?P<arg>[^()]*)\)\);'
)


def translate_ptx(source: str) -> str:
    """The kernel source with every inline-PTX ``cvt`` between float32 and a storage format of
    :data:`PTX_FORMATS` replaced by the emulation's conversion in the same rounding mode."""

    def replace(match):
        mode, dst, src = match["mode"], match["dst"], match["src"]
        if src == "f32" and dst in PTX_FORMATS and mode:
            e, m = PTX_FORMATS[dst]
            return f"{match['out']} = emu::narrow<{e}, {m}, emu::Round::{mode}>({match['arg']});"
        if dst == "f32" and src in PTX_FORMATS and not mode:
            e, m = PTX_FORMATS[src]
            return f"{match['out']} = emu::widen<{e}, {m}>({match['arg']});"
        raise ValueError(f"the host emulation has no meaning for the PTX {match[0]!r}")

    out = _CVT.sub(replace, source)
    if "asm(" in out:
        line = next(x for x in out.splitlines() if "asm(" in x)
        raise ValueError(f"the host emulation has no meaning for the PTX {line.strip()!r}")
    return out


def compiler():
    return shutil.which("g++")


def _tag(key: cb.Specialisation) -> str:
    return f"{key.dtype}_{key.n_learned}_{key.interpolation}_{'i64' if key.int64 else 'i32'}"


def _wrappers(key: cb.Specialisation) -> str:
    t = CTYPES[key.dtype]
    i = cb.INDEX_TYPES[key.int64]
    args = cb.INTERPOLATION_CODES[key.interpolation]
    targs = f"{t}, {key.n_learned}, {args}, {i}"
    tag = _tag(key)
    return f"""
extern "C" void construct_{tag}(int grid, int threads, int group, const void* w, const void* p, const void* s,
        void* k, const void* layout, long long nb, long long nd, long long c, long long block, long long span, int plen) {{
    emu::launch(&ndcls::construct_kernel<{targs}>, grid, threads, group, (const {t}*)w, (const {t}*)p,
        (const {t}*)s, ({t}*)k, *(const ndcls::Layout<{i}>*)layout, ({i})nb, ({i})nd, ({i})c, ({i})block, ({i})span,
        plen, group);
}}
extern "C" void construct_grad_{tag}(int grid, int threads, int group, const void* g, const void* w, const void* p,
        const void* s, void* gw, void* gp, void* gs, const void* layout, long long nb, long long nd, long long c,
        long long block, int plen) {{
    emu::launch(&ndcls::construct_grad_kernel<{targs}>, grid, threads, group, (const {t}*)g, (const {t}*)w,
        (const {t}*)p, (const {t}*)s, ({t}*)gw, ({t}*)gp, ({t}*)gs, *(const ndcls::Layout<{i}>*)layout, ({i})nb, ({i})nd, ({i})c,
        ({i})block, plen, group);
}}
"""


_LIBRARIES: dict = {}

#: Parameters of the conv kernels by role (``cupy_conv.ConvSpecialisation.names``), in order:
#: T the storage type, I the index type, A the accumulator; Layout and Geometry by value.
CONV_PARAMS = {
    "mark": ("const T*", "const T*", "const T*", "unsigned char*", "A*", "A*", "Layout", "I", "I", "I", "I", "double"),
    "compact": ("const T*", "const T*", "const A*", "const A*", "const unsigned char*", "I*", "I*", "A*", "Layout", "I", "I",
                "I", "I", "I"),
    "forward": ("const T*", "const I*", "const I*", "const A*", "T*", "Geometry", "int", "int", "int"),
    "grad_input": ("const T*", "const I*", "const I*", "const A*", "T*", "Geometry", "int", "int", "int"),
    "grad_taps": ("const T*", "const T*", "const I*", "const I*", "A*", "Geometry", "I", "I"),
    "scatter": ("const I*", "const I*", "const A*", "T*", "I", "I", "I", "I"),
}


def conv_symbol(role: str, name: str) -> str:
    """The wrapper's C symbol for the kernel template instance ``name`` (as in ``names``)."""
    return f"conv_{role}_" + re.sub(r"\W+", "_", name).strip("_")


def _conv_wrapper(role: str, name: str, key: cc.ConvSpecialisation) -> str:
    types = {"T": CTYPES[key.dtype], "I": cb.INDEX_TYPES[key.int64]}
    types["A"] = f"typename ndcls::Scalar<{types['T']}>::acc"
    params, args = [], []
    for j, kind in enumerate(CONV_PARAMS[role]):
        if kind.endswith("*"):
            params.append(f"const void* a{j}")
            args.append(f"({' '.join(types.get(w, w) for w in kind[:-1].split())}*)a{j}")
        elif kind in ("Layout", "Geometry"):
            struct = {"Layout": "Layout", "Geometry": "ConvGeometry"}[kind]
            params.append(f"const void* a{j}")
            args.append(f"*(const ndcls::{struct}<{types['I']}>*)a{j}")
        elif kind == "I":
            params.append(f"long long a{j}")
            args.append(f"({types['I']})a{j}")
        else:
            params.append(f"{kind} a{j}")
            args.append(f"a{j}")
    return f"""
extern "C" void {conv_symbol(role, name)}(int grid_x, int grid_y, int threads, {", ".join(params)}) {{
    emu::launch_2d(&{name}, grid_x, grid_y, threads, 32, {", ".join(args)});
}}
"""


def conv_keys(dtype: str):
    """The conv specialisations of ``dtype`` the emulation builds (none for half precision)."""
    return [k for k in cc.specialisations(CONV_MAX_NDIM) if k.dtype == dtype]


def library(keys, conv=()) -> ctypes.CDLL:
    """A shared library with the construction kernels of ``keys`` and the conv kernels of the
    specialisations ``conv`` (compiled once, cached on disk)."""
    keys = tuple(sorted(set(keys), key=_tag))
    conv = tuple(sorted(set(conv), key=repr))
    if (keys, conv) in _LIBRARIES:
        return _LIBRARIES[keys, conv]
    # the kernels' Layout<I> and ConvGeometry<I> must have the sizes of their NumPy twins, which
    # the backend passes by value
    checks = "".join(
        f"static_assert(sizeof(ndcls::Layout<{cb.INDEX_TYPES[w]}>) == {cb.layout_dtype(w).itemsize});\n"
        f"static_assert(sizeof(ndcls::ConvGeometry<{cb.INDEX_TYPES[w]}>) == {cc.geometry_dtype(w).itemsize});\n"
        for w in (False, True)
    )
    wrappers = {}
    for key in conv:
        for role, name in key.names.items():
            wrappers.setdefault(conv_symbol(role, name), _conv_wrapper(role, name, key))
    source = (
        f'#include "{HEADER}"\n' + translate_ptx(cb.kernel_source(CONV_SOURCE)) + checks
        + "".join(_wrappers(k) for k in keys) + "".join(wrappers.values())
    )  # fmt: skip
    lib = _build(source)
    _LIBRARIES[keys, conv] = lib
    return lib


def _build(source: str) -> ctypes.CDLL:
    """Compile ``source`` with g++ into a shared library, cached on disk by content."""
    digest = hashlib.sha256((source + HEADER.read_text()).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"ndcls-cuda-emulation-{os.getuid()}"
    cache.mkdir(exist_ok=True)
    lib_path = cache / f"{digest}.so"
    if not lib_path.exists():
        src_path = cache / f"{digest}.cpp"
        src_path.write_text(source)
        tmp = cache / f"{digest}.{os.getpid()}.so"
        cmd = [compiler(), "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas"]
        subprocess.run([*cmd, "-o", str(tmp), str(src_path)], check=True, capture_output=True, text=True)
        tmp.replace(lib_path)
    return ctypes.CDLL(str(lib_path))


def all_keys(max_learned: int, dtype: str):
    return [k for k in cb.specialisations() if k.dtype == dtype and k.n_learned <= max_learned]


_MAX_LEARNED = 4  # specialisations built into the library (the harness draws N <= 4)


def _function(spec, name):
    key = cb.specialisation(spec)
    if key.n_learned > _MAX_LEARNED:
        raise ValueError(f"the emulation is built for M <= {_MAX_LEARNED}, got M = {key.n_learned}")
    return key, getattr(_library(key.dtype), f"{name}_{_tag(key)}")


def _library(dtype: str) -> ctypes.CDLL:
    """The one library of ``dtype``: construction (M <= 4) and conv (N <= 3) kernels."""
    return library(all_keys(_MAX_LEARNED, dtype), conv_keys(dtype))


def _ptr(x):
    return ctypes.c_void_p(x.ctypes.data)


def construct(spec, weight, positions, sigma, out=None):
    kernel = np.empty((spec.n_batch, spec.block), dtype=spec.dtype) if out is None else out
    if kernel.size == 0:
        return kernel
    key, fn = _function(spec, "construct")
    launch = cb.forward_launch(spec, LIMITS, threads=THREADS)
    layout = np.array(cb.layout_value(spec.sizes, spec.learned_dims, key.int64))
    sigma = positions if sigma is None else sigma
    fn(
        ctypes.c_int(launch.grid), ctypes.c_int(launch.threads), ctypes.c_int(launch.group),
        _ptr(weight), _ptr(positions), _ptr(sigma), _ptr(kernel), _ptr(layout),
        *(ctypes.c_longlong(v) for v in (spec.n_batch, spec.n_dense, spec.count, spec.block, launch.span)),
        ctypes.c_int(cb._profile_length(spec)),
    )  # fmt: skip
    return kernel


def construct_grad(spec, grad_kernel, weight, positions, sigma):
    grad_w = np.empty_like(weight)
    grad_p = np.empty_like(positions)
    grad_s = np.empty_like(positions) if spec.normalised else None
    if weight.size:
        key, fn = _function(spec, "construct_grad")
        launch = cb.backward_launch(spec, LIMITS, threads=THREADS)
        layout = np.array(cb.layout_value(spec.sizes, spec.learned_dims, key.int64))
        fn(
            ctypes.c_int(launch.grid), ctypes.c_int(launch.threads), ctypes.c_int(launch.group),
            _ptr(grad_kernel), _ptr(weight), _ptr(positions), _ptr(positions if sigma is None else sigma),
            _ptr(grad_w), _ptr(grad_p), _ptr(grad_p if grad_s is None else grad_s), _ptr(layout),
            *(ctypes.c_longlong(v) for v in (spec.n_batch, spec.n_dense, spec.count, spec.block)),
            ctypes.c_int(cb._profile_length(spec)),
        )  # fmt: skip
    return grad_w, grad_p, grad_s


def conversion_library() -> ctypes.CDLL:
    """emu::narrow / emu::widen for float16 (round to nearest) over arrays, to test them alone."""
    source = f'#include "{HEADER}"\n' + """
extern "C" void narrow_f16_rn(const float* x, unsigned short* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = emu::narrow<5, 10, emu::Round::rn>(x[i]);
}
extern "C" void widen_f16(const unsigned short* x, float* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = emu::widen<5, 10>(x[i]);
}
"""
    return _build(source)


# -- the direct convolution (cupy_conv's pipeline, step by step, on host arrays) ------------------

#: what scratch that the GPU allocates uninitialised holds here: NaN values, and tap slots naming
#: plausible cells (slot t of a row: cell t, likely one that other slots of the row name too)
_POISON = np.nan


def _value(kind: str, arg, types: dict):
    if kind.endswith("*"):  # an array of the kernel's element type
        want = types[kind[:-1].split()[-1]]
        assert arg.dtype == want and arg.flags.c_contiguous, f"{kind}: got a {arg.dtype} array, C order {arg.flags.c_contiguous}"
        return ctypes.c_void_p(arg.ctypes.data)
    if kind in ("Layout", "Geometry"):  # a 0-d structured array, its bytes passed by value
        return ctypes.c_void_p(arg.ctypes.data)
    if kind == "I":
        return ctypes.c_longlong(int(arg))
    if kind == "int":
        return ctypes.c_int(int(arg))
    return ctypes.c_double(float(arg))


def _launch(key: cc.ConvSpecialisation, role: str, grid, threads: int, *args, shared: int = 0):
    """Run the ``role`` kernel of ``key`` on at most MAX_GRID blocks along each grid axis."""
    assert shared <= SHARED_DEFAULT, f"{role}: {shared} bytes of shared memory need opting in"
    assert 1 <= threads <= 1024 and threads % 32 == 0, f"{role}: {threads} threads per block"
    gx, gy = (grid, 1) if isinstance(grid, int) else grid
    assert gx >= 1 and gy >= 1, f"{role}: empty grid {grid}"
    kinds = CONV_PARAMS[role]
    assert len(kinds) == len(args)
    t = np.dtype(key.dtype)
    types = {"T": t, "A": t if t == np.float64 else np.dtype(np.float32), "I": np.dtype(np.int64 if key.int64 else np.int32)}
    types["char"] = np.dtype(np.uint8)
    arrays = [np.array(a) if isinstance(a, np.void) else a for a in args]  # kept alive during the call
    fn = getattr(_library(key.dtype), conv_symbol(role, key.names[role]))
    fn(ctypes.c_int(min(gx, MAX_GRID)), ctypes.c_int(min(gy, MAX_GRID)), ctypes.c_int(threads),
       *(_value(kind, a, types) for kind, a in zip(kinds, arrays)))  # fmt: skip


def conv_plan(spec):
    """``cupy_conv.call_plan`` on the emulated device: (plan, specialisation, geometry)."""
    if spec.ndim > CONV_MAX_NDIM:
        raise ValueError(f"the emulation builds the conv kernels for N <= {CONV_MAX_NDIM}, got N = {spec.ndim}")
    return cc.call_plan(spec, LIMITS.n_sm, THREADS)


def _expand(a, spec):
    """(M, Po, Pi, D, C) -> (M, B, D, C), contiguous."""
    k = spec.kernel
    if a is None:
        return None
    full = (k.n_learned, *k.batch_shape, k.n_dense, k.count)
    return np.ascontiguousarray(np.broadcast_to(a, full)).reshape(k.n_learned, k.n_batch, k.n_dense, k.count)


class _Taps:
    """The taps: ``n_taps (B,)``, ``cell``/``value (B * cap,)``; ``K`` is not built (cupy_conv._Taps)."""

    def __init__(self, spec, weight, positions, sigma):
        k = spec.kernel
        self.plan, self.key, self.geometry = conv_plan(spec)
        p = self.plan
        it = np.int64 if p.int64 else np.int32
        self.weight = weight.reshape(k.n_batch, k.n_dense, k.count)
        self.positions, self.sigma = _expand(positions, spec), _expand(sigma, spec)
        acc = np.float64 if k.dtype == np.float64 else np.float32
        mask = np.zeros(p.n_rows * p.cells, dtype=np.uint8)
        n_elements = k.n_batch * k.n_dense * k.count
        scale = np.full(n_elements, _POISON, dtype=acc)  # poisoned: mark must write every scale
        row_sums = np.full(k.n_learned * n_elements if k.interpolation != "bilinear" else 1, _POISON, dtype=acc)
        layout = cb.layout_value(k.sizes, k.learned_dims, p.int64)
        radius = gauss_cut(k.dtype) if k.interpolation == "gauss" else 0.0
        sigma_arg = self.positions if self.sigma is None else self.sigma
        _launch(
            self.key, "mark", p.grid(n_elements, LIMITS.n_sm), p.threads,
            self.weight, self.positions, sigma_arg, mask, scale, row_sums, layout, k.n_batch,
            k.n_dense, k.count, k.block, radius,
        )  # fmt: skip
        self.n_taps = np.full(p.n_rows, p.cap, dtype=it)  # poisoned: compact must write every count
        self.cell = (np.arange(p.n_rows * p.cap) % p.cells).astype(it)
        self.value = np.full(p.n_rows * p.cap, _POISON, dtype=acc)
        _launch(
            self.key, "compact", max(1, min(p.n_rows, 2**31 - 1)), p.compact_threads,
            self.positions, sigma_arg, scale, row_sums, mask, self.n_taps, self.cell, self.value, layout, p.n_rows,
            k.n_dense, k.count, p.cells, p.cap, shared=4 * p.compact_threads,
        )  # fmt: skip

    def planes(self, role, st: cc.Stage, src, dst):
        _launch(self.key, role, st.grid, st.threads, src, self.n_taps, self.cell, self.value, dst, self.geometry,
                st.entries, st.span, st.batch, shared=st.shared)  # fmt: skip


def conv(spec, input, weight, positions, sigma, out=None):
    """``(batch, out_channels, *out_spatial)``, written into ``out`` when given (as the kernel
    writes it: the tests see any write outside the output)."""
    result = np.full(spec.output_shape, np.nan, dtype=spec.dtype) if out is None else out
    if result.size:
        if weight.size == 0 or input.size == 0:
            result.fill(0)
        else:
            taps = _Taps(spec, weight, positions, sigma)
            taps.planes("forward", taps.plan.forward, input, result)
    return result


def conv_grad(spec, grad_output, input, weight, positions, sigma):
    """``(grad_input, grad_weight (B, D, C), grad_positions, grad_sigma)`` (cupy_conv.conv_grad)."""
    k = spec.kernel
    grad_x = np.zeros(spec.input_shape, dtype=spec.dtype)
    grad_kernel = np.zeros((k.n_batch, k.block), dtype=spec.dtype)
    if weight.size and input.size and grad_output.size:
        taps = _Taps(spec, weight, positions, sigma)
        p = taps.plan
        taps.planes("grad_input", p.transposed, grad_output, grad_x)
        partial = np.full(p.n_rows * p.n_chunks * p.cap, _POISON, dtype=taps.value.dtype)
        blocks = p.n_rows * p.n_chunks
        _launch(
            taps.key, "grad_taps", max(1, min(blocks, 2**31 - 1)), p.threads,
            grad_output, input, taps.n_taps, taps.cell, partial, taps.geometry, p.n_rows, p.n_chunks,
            shared=p.threads // 32 * taps.value.dtype.itemsize,
        )  # fmt: skip
        _launch(
            taps.key, "scatter", p.grid(p.n_rows * p.cap, LIMITS.n_sm), p.threads,
            taps.n_taps, taps.cell, partial, grad_kernel, p.n_rows, p.cells, p.cap, p.n_chunks,
        )  # fmt: skip
        positions_full, sigma_full, weight_rows = taps.positions, taps.sigma, taps.weight
    else:
        positions_full, sigma_full = _expand(positions, spec), _expand(sigma, spec)
        weight_rows = weight.reshape(k.n_batch, k.n_dense, k.count)
    grad_w, grad_p, grad_s = construct_grad(k, grad_kernel, weight_rows, positions_full, sigma_full)
    return grad_x, grad_w, spec.sum_to(grad_p, positions.shape), None if sigma is None else spec.sum_to(grad_s, sigma.shape)
