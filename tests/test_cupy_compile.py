"""Every kernel specialisation the "cupy" backend can request compiles with NVRTC, without a GPU.

The list comes from ``cupy_backend.specialisations()`` (the dispatcher's own enumeration) and the
source from ``cupy_backend.kernel_source()`` with ``cupy_backend.COMPILE_OPTIONS``: exactly what
``cupy_backend.load_functions`` compiles at run time. All of them are lowered to PTX for compute_80
and compute_90; the largest (M = MAX_DIMS) are also assembled to SASS for sm_80 and sm_90. The
float32 PTX is checked for flush-to-zero instructions (CuPy's own compile path adds ``-ftz=true``).
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from hypothesis import given, settings

import ndcls
from _cases import cases
from ndcls.kernels import cupy_backend as cb

pytestmark = pytest.mark.cuda_compile

ARCHS = (80, 90)


class CompileError(Exception):
    pass


def nvrtc_compile(source: str, names, arch_option: str, *, cubin=False, extra=(), log=None):
    """Compile ``source`` with the name expressions ``names``; returns (ptx or cubin, {name: lowered}).
    The compiler's log is appended to the list ``log`` when one is given."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")

    def check(result, prog=None):
        err = result[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = ""
            if prog is not None:
                _, size = nvrtc.nvrtcGetProgramLogSize(prog)
                buf = b" " * size
                nvrtc.nvrtcGetProgramLog(prog, buf)
                log = buf.decode(errors="replace")
            raise CompileError(f"{err}: {log}")
        return result[1:]

    (prog,) = check(nvrtc.nvrtcCreateProgram(source.encode(), b"dcls.cu", 0, [], []))
    try:
        for name in names:
            check(nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        options = [arch_option.encode(), *(o.encode() for o in (*cb.COMPILE_OPTIONS, *extra))]
        check(nvrtc.nvrtcCompileProgram(prog, len(options), options), prog)
        if log is not None:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log.append(buf.decode(errors="replace"))
        lowered = {name: check(nvrtc.nvrtcGetLoweredName(prog, name.encode()))[0].decode() for name in names}
        if cubin:
            (size,) = check(nvrtc.nvrtcGetCUBINSize(prog))
            out = b" " * size
            check(nvrtc.nvrtcGetCUBIN(prog, out))
        else:
            (size,) = check(nvrtc.nvrtcGetPTXSize(prog))
            out = b" " * size
            check(nvrtc.nvrtcGetPTX(prog, out))
            out = out.decode(errors="replace")
        return out, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _names(keys):
    return [name for key in keys for name in key.name_expressions]


@pytest.mark.parametrize("dtype", list(cb.CTYPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_specialisation_compiles_to_ptx(arch, dtype, record_property):
    keys = [k for k in cb.specialisations() if k.dtype == dtype]
    start = time.perf_counter()
    ptx, lowered = nvrtc_compile(cb.kernel_source(), _names(keys), f"--gpu-architecture=compute_{arch}")
    record_property("seconds", round(time.perf_counter() - start, 1))
    assert f".target sm_{arch}" in ptx
    for name, mangled in lowered.items():
        assert f".entry {mangled}(" in ptx, f"{name} ({mangled}) missing from the PTX"
    assert len(set(lowered.values())) == 2 * len(keys)


@pytest.mark.parametrize("arch", ARCHS)
def test_largest_specialisations_assemble_for_real_gpus(arch):
    keys = [k for k in cb.specialisations() if k.n_learned == ndcls.MAX_DIMS and k.int64]
    binary, lowered = nvrtc_compile(cb.kernel_source(), _names(keys), f"--gpu-architecture=sm_{arch}", cubin=True)
    assert binary[:4] == b"\x7fELF"
    for mangled in lowered.values():
        assert mangled.encode() in binary


def test_a_broken_kernel_fails_to_compile():
    key = cb.specialisations()[0]
    broken = cb.kernel_source().replace("A total = A(1);", "A total = A(1)", 1)
    assert broken != cb.kernel_source()
    with pytest.raises(CompileError, match="error"):
        nvrtc_compile(broken, key.name_expressions, "--gpu-architecture=compute_80")


def test_kernel_source_inlines_its_headers():
    source = cb.kernel_source()
    assert '#include "' not in source
    assert "element_valid" in source and "construct_grad_kernel" in source


@settings(max_examples=60)
@given(cases(dtypes=("float16", "float32", "float64"), max_ndim=ndcls.MAX_DIMS, max_size=3, max_cells=2000))
def test_dispatcher_requests_only_enumerated_specialisations(case):
    key = cb.specialisation(case.spec)
    assert key in set(cb.specialisations())
    assert key.dtype == np.dtype(case.dtype).name and key.n_learned == len(case.learned_dims)


def test_layout_struct_argument_has_the_size_of_its_numpy_twin():
    """The Layout<I> kernel parameter, as NVRTC lays it out, is what the backend passes by value."""
    keys = [k for k in cb.specialisations() if k.n_learned == 2 and k.dtype == "float32" and k.interpolation == "gauss"]
    ptx, lowered = nvrtc_compile(cb.kernel_source(), _names(keys), "--gpu-architecture=compute_80")
    for key in keys:
        want = cb.layout_dtype(key.int64).itemsize
        for name in key.name_expressions:
            sizes = re.findall(rf"{re.escape(lowered[name])}_param_\d+\[(\d+)\]", ptx)
            assert sizes == [str(want)], f"{name}: struct parameters {sizes}, expected one of {want} bytes"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_conv_specialisation_compiles_to_ptx(arch):
    """The direct convolution's kernels (cupy_conv.specialisations: N <= 3, float32/float64,
    every M and interpolation, 32- and 64-bit indices) compile."""
    from ndcls.kernels import cupy_conv

    names = sorted({name for key in cupy_conv.specialisations() for name in key.names.values()})
    ptx, lowered = nvrtc_compile(cb.kernel_source("dcls_conv.cu"), names, f"--gpu-architecture=compute_{arch}")
    assert set(lowered) == set(names)
    for name in lowered.values():
        assert f".entry {name}(" in ptx


def test_conv_kernels_keep_their_accumulators_in_registers():
    """ptxas for sm_90: the tap loops of the conv kernels use no local memory (conv_planes_kernel's
    per-batch accumulators stay in registers) and, with 32-bit indices, at most 64 registers per
    thread, which leaves room for 4 blocks of 256 threads per SM (64-bit indices: at most 96)."""
    from ndcls.kernels import cupy_conv

    roles = ("forward", "grad_input", "grad_taps")
    names = sorted({key.names[r] for key in cupy_conv.specialisations() for r in roles})
    log = []
    _, lowered = nvrtc_compile(cb.kernel_source("dcls_conv.cu"), names, "--gpu-architecture=sm_90", cubin=True,
                               extra=("--ptxas-options=-v",), log=log)
    report = {}  # mangled name -> its ptxas lines
    for line in log[0].splitlines():
        if "Compiling entry function" in line:
            current = report.setdefault(line.split("'")[1], [])
        elif report:
            current.append(line)
    for name, mangled in lowered.items():
        lines = " ".join(report[mangled])
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in lines, f"{name}: {lines}"
        registers = int(re.search(r"Used (\d+) registers", lines).group(1))
        assert registers <= (96 if "long long" in name else 64), f"{name}: {registers} registers"


# -- IEEE float32: no flush to zero -----------------------------------------------------------------

# libdevice's expf evaluates 2**x with ex2.approx.ftz on a range-reduced argument whatever -ftz
# says; its result is scaled afterwards and keeps subnormals. Any other .ftz. instruction flushes.
_FTZ_IN_EXPF = {"ex2.approx.ftz.f32"}


def _ftz_instructions(ptx: str) -> set:
    return {line.split()[0] for line in ptx.splitlines() if ".ftz." in line and not line.lstrip().startswith("//")}


def test_compile_options_keep_subnormals():
    options = cb.COMPILE_OPTIONS
    assert "-ftz=false" in options and "-prec-div=true" in options and "-prec-sqrt=true" in options
    assert not any(o.startswith(("-ftz=true", "--ftz=true", "-use_fast_math", "--use_fast_math")) for o in options)


@pytest.mark.parametrize("interpolation", ["bilinear", "triangle", "gauss"])
def test_float32_kernels_do_not_flush_subnormals(interpolation):
    """The regression test for widths of 1e-42 read as 0 on a GPU: the PTX the backend itself
    compiles (``compile_source``, the compiler behind ``load_functions``) has no ``.ftz.``
    arithmetic; with ``-ftz=true`` it has plenty (checked too, so the test can fail)."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    key = cb.Specialisation("float32", 2, interpolation, False)
    ptx, lowered = cb.compile_source(cb.kernel_source(), key.name_expressions, "-arch=compute_90")
    ptx = ptx.decode()
    assert all(f".entry {mangled}(" in ptx for mangled in lowered.values())
    assert _ftz_instructions(ptx) <= _FTZ_IN_EXPF
    if interpolation != "gauss":  # no exp: no .ftz. at all
        assert not _ftz_instructions(ptx)
    flushed, _ = nvrtc_compile(cb.kernel_source(), key.name_expressions, "--gpu-architecture=compute_90", extra=("-ftz=true",))
    assert {"add.ftz.f32", "mul.ftz.f32", "fma.rn.ftz.f32"} <= _ftz_instructions(flushed)
