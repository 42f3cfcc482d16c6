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

This module is a backend module in the sense of ``ndcls._registry`` (host arrays), registered
by the test that uses it under the name "cupy-emulated".
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

from ndcls.kernels import cupy_backend as cb

HEADER = Path(__file__).parent / "cuda_emulation" / "cuda_host.h"
#: A made-up device: 2 SMs, 4 KiB of shared memory per block (8 KiB opting in).
LIMITS = cb.DeviceLimits(n_sm=2, shared_default=4096, shared_optin=8192, capability=(8, 0))
THREADS = 64
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


def library(keys) -> ctypes.CDLL:
    """A shared library with the forward and backward kernels of ``keys`` (compiled once, cached on disk)."""
    keys = tuple(sorted(set(keys), key=_tag))
    if keys in _LIBRARIES:
        return _LIBRARIES[keys]
    # the kernels' Layout<I> must have the size of its NumPy twin, which the backend passes by value
    checks = "".join(
        f"static_assert(sizeof(ndcls::Layout<{cb.INDEX_TYPES[w]}>) == {cb.layout_dtype(w).itemsize});\n" for w in (False, True)
    )
    source = f'#include "{HEADER}"\n' + translate_ptx(cb.kernel_source()) + checks + "".join(_wrappers(k) for k in keys)
    lib = _build(source)
    _LIBRARIES[keys] = lib
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
    return key, getattr(library(all_keys(_MAX_LEARNED, key.dtype)), f"{name}_{_tag(key)}")


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
