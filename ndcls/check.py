"""``ndcls check``: every backend usable on this machine against the NumPy reference.

A fixed set of cases (every interpolation; N = 1, 2, 3, plain and N-M-D; a few invalid
elements; a large batch; on a GPU with the memory for it, a kernel of more than ``2**31``
cells) runs forward and backward on each backend in each dtype it takes (float64, float32,
float16, bfloat16), and every result is compared with the float64 NumPy reference computed
from the same rounded inputs, within the per-dtype tolerances of :mod:`ndcls._tolerances`.
One table row per (backend, dtype): cases run, the worst error as a fraction of the
tolerance (<= 1 passes), NaN patterns, time. Any disagreement or error fails the check.
Backends with the direct convolution also run ``conv`` and ``conv_grad`` on a few cases
(:data:`CONV_CASES`: depthwise 2-D, strided 1-D, N-M-D 3-D with shared positions and groups)
in every dtype, against the NumPy reference on the same rounded inputs.

Where the inputs come from: NumPy arrays for the CPU backends (bfloat16 through torch CPU
tensors, NumPy having none), CuPy arrays for the GPU backends (bfloat16 through torch CUDA
tensors). Without a GPU, "numba-cuda" runs under Numba's CUDA simulator on the small cases
(the CLI turns the simulator on when no NVIDIA device is present).
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

import ndcls
from ndcls._registry import operation_backends
from ndcls._tolerances import TOLERANCES, worst_error

DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple
    learned_dims: tuple | None
    interpolation: str
    batch: tuple
    count: int
    poison: bool = True
    seed: int = 0
    #: batch indices compared with the reference (None: all); for kernels too big for it
    check_batches: tuple | None = None

    @property
    def cells(self) -> int:
        return math.prod(self.batch) * math.prod(self.sizes)


LAYOUTS = (
    ((9,), None),
    ((7, 6), None),
    ((5, 6), (1,)),
    ((4, 5, 3), None),
    ((4, 5, 3), (2, 0)),
)


def cases(*, small: bool, large: bool = True, huge: bool = False) -> list[Case]:
    """The fixed cases: ``small`` shrinks batch and count (simulator), ``large`` adds a
    ConvNeXt-sized batch, ``huge`` a bilinear kernel of more than 2**31 cells (GPU only)."""
    out = []
    batch, count = ((2,), 2) if small else ((3, 2), 4)
    for i, (sizes, learned) in enumerate(LAYOUTS):
        for interpolation in ndcls.INTERPOLATIONS:
            tag = "x".join(map(str, sizes)) + ("" if learned is None else f" learned {learned}")
            out.append(Case(f"{interpolation} {tag}", sizes, learned, interpolation, batch, count, seed=i))
    if large and not small:
        for interpolation in ndcls.INTERPOLATIONS:
            out.append(Case(f"{interpolation} 17x17 batch 768 count 34", (17, 17), None, interpolation, (768,), 34, seed=7))
    if huge:
        n_batch = 2**31 // 64**3 + 8
        out.append(
            Case(
                "bilinear 64x64x64 batch 8200 (> 2**31 cells)", (64, 64, 64), None, "bilinear", (n_batch,), 1,
                poison=False, seed=9, check_batches=(0, 1, n_batch - 2, n_batch - 1),
            )
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class ConvCase:
    """A direct-convolution case (``ndcls.conv`` and ``ndcls.conv_grad``, every dtype)."""

    name: str
    input_shape: tuple  # (batch, in_channels, *spatial)
    out_channels: int
    groups: int
    sizes: tuple
    learned_dims: tuple | None
    interpolation: str
    count: int
    stride: int = 1
    padding: object = 0
    shared: bool = False  # positions (and sigma) shared by every channel pair
    seed: int = 0


CONV_CASES = (
    ConvCase("conv 2-D depthwise 17x17 count 34 bilinear 'same'", (2, 8, 20, 18), 8, 8, (17, 17), None, "bilinear", 34, padding="same"),
    ConvCase("conv 1-D 6->4 size 33 count 3 gauss stride 2", (3, 6, 40), 4, 1, (33,), None, "gauss", 3, stride=2, padding=5, seed=1),
    ConvCase("conv 3-D N-M-D (2, 0) triangle groups 2 shared", (2, 4, 7, 6, 8), 6, 2, (4, 3, 5), (2, 0), "triangle", 3, padding=1, shared=True, seed=2),
)
#: the one conv case of numba-cuda under the simulator (which runs CUDA threads one by one)
SIMULATOR_CONV_CASE = ConvCase("conv 2-D depthwise 5x4 count 3 gauss 'same'", (1, 2, 6, 5), 2, 2, (5, 4), None, "gauss", 3, padding="same")
CONV_DTYPES = DTYPES  # half precision computes in float32 (docs/conv.md, section 7)


def _conv_problem(case: ConvCase):
    """float64 ``(input, weight, positions, sigma, grad_output)`` of a conv case (one invalid element)."""
    rng = np.random.default_rng(100 + case.seed)
    n = len(case.sizes)
    learned = tuple(range(n)) if case.learned_dims is None else case.learned_dims
    dense = tuple(case.sizes[a] for a in range(n) if a not in learned)
    cin = case.input_shape[1]
    x = rng.standard_normal(case.input_shape)
    w = rng.standard_normal((case.out_channels, cin // case.groups, *dense, case.count))
    pairs = (1, 1) if case.shared else w.shape[:2]
    rows = np.array([case.sizes[a] for a in learned], dtype=np.float64).reshape(-1, *([1] * w.ndim))
    p = rng.uniform(-0.3, 1.1, size=(len(learned), *pairs, *w.shape[2:])) * (rows - 1)
    s = rng.uniform(0.4, 2.0, size=p.shape) if case.interpolation != "bilinear" else None
    p[(0,) * p.ndim] = np.nan  # an invalid element: contributes nothing, NaN gradients
    out = ndcls.ConvSpec.from_arguments(
        input_shape=x.shape, input_dtype=x.dtype, weight_shape=w.shape, weight_dtype=w.dtype,
        positions_shape=p.shape, positions_dtype=p.dtype, sigma_shape=None if s is None else s.shape,
        sigma_dtype=None if s is None else s.dtype, sizes=case.sizes, interpolation=case.interpolation,
        learned_dims=case.learned_dims, stride=case.stride, padding=case.padding, groups=case.groups,
    ).output_shape  # fmt: skip
    return x, w, p, s, rng.standard_normal(out)


def run_conv_case(row: "Row", case: ConvCase, lib: "_Library") -> float:
    """``conv`` and ``conv_grad`` of ``case`` on ``row.backend`` against the float64 reference."""
    x, w, p, s, g = (lib.rounded(a) for a in _conv_problem(case))
    kw = dict(interpolation=case.interpolation, learned_dims=case.learned_dims, stride=case.stride,
              padding=case.padding, groups=case.groups)
    xi, wi, pi, si, gi = (lib.put(a) for a in (x, w, p, s, g))
    start = time.perf_counter()
    out = ndcls.conv(xi, wi, pi, case.sizes, sigma=si, backend=row.backend, **kw)
    grads = ndcls.conv_grad(gi, xi, wi, pi, case.sizes, sigma=si, backend=row.backend, **kw)
    lib.synchronize()
    seconds = time.perf_counter() - start
    want_out = ndcls.conv(x, w, p, case.sizes, sigma=s, backend="numpy", **kw)
    want_grads = ndcls.conv_grad(g, x, w, p, case.sizes, sigma=s, backend="numpy", **kw)
    _compare(row, case, "conv output", lib.get(out), want_out, lib.dtype)
    for name, got, want in zip(("grad_input", "grad_weight", "grad_positions", "grad_sigma"), grads, want_grads):
        _compare(row, case, f"conv {name}", lib.get(got), want, lib.dtype)
    return seconds


# -- inputs and results in each array library -----------------------------------------------------


def _problem(case: Case):
    """float64 ``(weight, positions, sigma, grad_kernel)`` of a case (unrounded)."""
    rng = np.random.default_rng(case.seed)
    learned = tuple(range(len(case.sizes))) if case.learned_dims is None else case.learned_dims
    dense = tuple(case.sizes[a] for a in range(len(case.sizes)) if a not in learned)
    w = rng.standard_normal((*case.batch, *dense, case.count))
    rows = np.array([case.sizes[a] for a in learned], dtype=np.float64).reshape(-1, *([1] * w.ndim))
    p = rng.uniform(-0.7, 1.0, size=(len(learned), *w.shape)) * (rows - 1) + 0.3 * rng.standard_normal((len(learned), *w.shape))
    s = rng.uniform(0.6, 2.5, size=p.shape) if case.interpolation != "bilinear" else None
    if case.poison and case.count >= 3:  # invalid elements: NaN gradients, nothing in K
        p[0, ..., 0] = np.nan
        p[-1, ..., 1] = np.inf
        if s is not None:
            s[0, ..., 2] = 0.0
    g = rng.standard_normal((*case.batch, *case.sizes))
    return w, p, s, g


class _Library:
    """Converts float64 NumPy arrays to one array library in one dtype, and results back."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype
        if name.startswith("torch"):
            import torch

            self.torch = torch
            self.device = "cuda" if name == "torch-cuda" else "cpu"
        elif name == "cupy":
            import cupy

            self.cupy = cupy

    def rounded(self, x):
        """The float64 values of ``x`` after rounding to the dtype (what the backend sees)."""
        if x is None:
            return None
        if self.dtype == "bfloat16":
            return self.torch.from_numpy(x).to(self.torch.bfloat16).double().numpy()
        return x.astype(self.dtype).astype(np.float64)

    def put(self, x):
        if x is None:
            return None
        if self.name.startswith("torch"):
            return self.torch.from_numpy(x).to(device=self.device, dtype=getattr(self.torch, self.dtype))
        if self.name == "cupy":
            return self.cupy.asarray(x.astype(self.dtype))
        return x.astype(self.dtype)

    def get(self, x):
        if x is None:
            return None
        if self.name.startswith("torch"):
            got = x.detach()
            assert str(got.dtype) == f"torch.{self.dtype}", f"result dtype {got.dtype}, expected {self.dtype}"
            return got.double().cpu().numpy()
        if self.name == "cupy":
            x = x.get()
        assert x.dtype == np.dtype(self.dtype), f"result dtype {x.dtype}, expected {self.dtype}"
        return x.astype(np.float64)

    def synchronize(self):
        if self.name == "cupy":
            self.cupy.cuda.get_current_stream().synchronize()
        elif self.name == "torch-cuda":
            self.torch.cuda.synchronize()


# -- which backends and dtypes run here -----------------------------------------------------------


def gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def simulated() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _module_available(name: str) -> str:
    """"" if ``name`` imports, else the reason."""
    try:
        __import__(name)
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return f"{name} not importable ({type(exc).__name__}: {exc})"
    return ""


def _cuda_usable() -> str:
    why = _module_available("cupy")
    if why:
        return why
    try:
        from ndcls._arrays import cupy_on_device

        cupy_on_device(0)
    except Exception as exc:
        return f"no usable CUDA device ({exc})"
    return ""


def library_for(backend: str, dtype: str) -> tuple[str, str]:
    """``(library name, "")`` of the inputs for ``backend`` in ``dtype``, or ``("", why not)``."""
    device = ndcls.get_backend(backend).device
    if device == "cpu" or (backend == "numba-cuda" and simulated()):
        if dtype != "bfloat16":
            return "numpy", ""
        why = _module_available("torch")
        return ("torch-cpu", "") if not why else ("", f"bfloat16 needs torch ({why})")
    why = _cuda_usable()
    if why:
        return "", why
    if dtype != "bfloat16":
        return "cupy", ""
    why = _module_available("torch")
    if why:
        return "", f"bfloat16 needs torch ({why})"
    import torch

    return ("torch-cuda", "") if torch.cuda.is_available() else ("", "bfloat16 needs torch built with CUDA")


def backend_available(backend: str) -> str:
    """"" if ``backend`` can run here, else why not."""
    b = ndcls.get_backend(backend)
    if b.device == "cuda":
        if backend == "numba-cuda" and simulated():
            return _module_available("numba.cuda")
        if not gpu_present():
            return "no NVIDIA GPU on this machine"
        why = _cuda_usable()
        if why:
            return why
    try:
        b.load()
    except ImportError as exc:
        return str(exc)
    return ""


# -- running ----------------------------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    dtype: str
    cases: int = 0
    worst: float = 0.0  # worst |error| / allowed over every result (<= 1 passes)
    worst_where: str = ""
    seconds: float = 0.0
    failures: list = field(default_factory=list)
    skipped: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures


def _compare(row: Row, case: Case, what: str, got, want, dtype: str):
    if got is None or want is None:
        if (got is None) != (want is None):
            row.failures.append(f"{case.name}: {what} is {'None' if got is None else 'an array'}")
        return
    if got.shape != want.shape:
        row.failures.append(f"{case.name}: {what} has shape {got.shape}, expected {want.shape}")
        return
    worst, same_nan = worst_error(got, want, dtype)
    if not same_nan:
        row.failures.append(f"{case.name}: {what} NaN pattern differs from the reference")
    if worst > row.worst or row.worst_where == "":
        row.worst, row.worst_where = max(worst, row.worst), f"{case.name}: {what}"
    if not worst <= 1.0:
        row.failures.append(f"{case.name}: {what} off by {worst:.3g} x the {dtype} tolerance {TOLERANCES[dtype]}")


_REFERENCES: dict = {}  # (case, dtype) -> reference results, shared by the backends of one run


def _reference(case: Case, w, p, s, g, dtype: str):
    """float64 reference (of the checked batch indices, already selected by the caller)."""
    key = (case, dtype) if case.check_batches is None else None  # huge cases: dL/dK comes from the backend
    if key in _REFERENCES:
        return _REFERENCES[key]
    kw = dict(sigma=s, interpolation=case.interpolation, learned_dims=case.learned_dims, backend="numpy")
    found = ndcls.construct(w, p, case.sizes, **kw), ndcls.construct_grad(g, w, p, case.sizes, **kw)
    if key is not None:
        _REFERENCES[key] = found
    return found


def run_case(row: Row, case: Case, lib: _Library) -> float:
    w, p, s, g = (lib.rounded(x) for x in _problem(case))
    kw = dict(interpolation=case.interpolation, learned_dims=case.learned_dims, backend=row.backend)
    ins = [lib.put(x) for x in (w, p, s)]
    start = time.perf_counter()
    k = ndcls.construct(ins[0], ins[1], case.sizes, sigma=ins[2], **kw)
    grad_in = k if case.check_batches is not None else lib.put(g)  # huge kernels: dL/dK = K
    grads = ndcls.construct_grad(grad_in, ins[0], ins[1], case.sizes, sigma=ins[2], **kw)
    lib.synchronize()
    seconds = time.perf_counter() - start
    if case.check_batches is not None:  # compare the checked batch indices only
        idx = list(case.check_batches)
        gw, gp, gs = grads
        k_host = lib.get(k[idx])
        grads_host = [lib.get(gw[idx]), lib.get(gp[:, idx]), None if gs is None else lib.get(gs[:, idx])]
        w, p, g = w[idx], p[:, idx], k_host
        s = None if s is None else s[:, idx]
    else:
        k_host = lib.get(k)
        grads_host = [lib.get(x) for x in grads]
    want_k, want_grads = _reference(case, w, p, s, g, lib.dtype)
    _compare(row, case, "K", k_host, want_k, lib.dtype)
    for name, got, want in zip(("grad_weight", "grad_positions", "grad_sigma"), grads_host, want_grads):
        _compare(row, case, name, got, want, lib.dtype)
    return seconds


def run(backends=None, dtypes=DTYPES, *, quick=False, large=True, huge=True, progress=None) -> list[Row]:
    """One :class:`Row` per (backend, dtype); ``quick`` runs the small cases only."""
    rows = []
    _REFERENCES.clear()
    for backend in backends or ndcls.backends():
        why = backend_available(backend)
        sim = backend == "numba-cuda" and simulated()
        for dtype in dtypes:
            row = Row(backend, dtype)
            rows.append(row)
            if why:
                row.skipped = why
                continue
            if not ndcls.get_backend(backend).supports(dtype):
                row.skipped = f"dtype not taken by {backend}"
                continue
            lib_name, why_not = library_for(backend, dtype)
            if why_not:
                row.skipped = why_not
                continue
            lib = _Library(lib_name, dtype)
            on_gpu = ndcls.get_backend(backend).device == "cuda" and not sim
            todo = cases(small=quick or sim, large=large and not quick, huge=huge and on_gpu and not quick and dtype == "float32")
            for case in todo:
                if case.check_batches is not None and not _memory_for(case, dtype):
                    continue
                if progress:
                    progress(f"{backend} {dtype}: {case.name}")
                try:
                    if row.cases == 0:  # warm-up: compilation is not timed
                        run_case(Row(backend, dtype), case, lib)
                    row.seconds += run_case(row, case, lib)
                    row.cases += 1
                except Exception as exc:  # a crash is a failure of the check, with its cause
                    row.failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
                    if os.environ.get("NDCLS_CHECK_TRACEBACK"):
                        traceback.print_exc()
            if dtype not in CONV_DTYPES or backend not in operation_backends("conv"):
                continue
            for case in (SIMULATOR_CONV_CASE,) if sim else CONV_CASES:
                if progress:
                    progress(f"{backend} {dtype}: {case.name}")
                try:
                    row.seconds += run_conv_case(row, case, lib)
                    row.cases += 1
                except Exception as exc:
                    row.failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
                    if os.environ.get("NDCLS_CHECK_TRACEBACK"):
                        traceback.print_exc()
    return rows


def _memory_for(case: Case, dtype: str) -> bool:
    """Whether the GPU has room for a huge case (K and a few copies)."""
    try:
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
    except Exception:
        return False
    return free > 2.5 * case.cells * np.dtype(dtype).itemsize


def table(rows) -> str:
    lines = [
        f"{'backend':<12} {'dtype':<9} {'cases':>5} {'worst/tol':>10} {'time (s)':>9}  result",
        "-" * 78,
    ]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.backend:<12} {r.dtype:<9} {'-':>5} {'-':>10} {'-':>9}  skipped: {r.skipped}")
            continue
        status = "ok" if r.ok else f"FAIL ({len(r.failures)})"
        lines.append(f"{r.backend:<12} {r.dtype:<9} {r.cases:>5} {r.worst:>10.3g} {r.seconds:>9.3f}  {status}")
    failures = [(r, f) for r in rows for f in r.failures]
    if failures:
        lines.append("")
        lines.append("disagreements and errors:")
        lines.extend(f"  {r.backend} {r.dtype}: {f}" for r, f in failures[:50])
        if len(failures) > 50:
            lines.append(f"  ... and {len(failures) - 50} more")
    return "\n".join(lines)


def describe_machine() -> str:
    parts = [f"ndcls {ndcls.__version__}", f"python {sys.version.split()[0]}", f"numpy {np.__version__}"]
    if simulated():
        parts.append("numba-cuda under the CUDA simulator")
    if gpu_present() and not _cuda_usable():
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        parts.append(f"GPU {name} (cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()})")
    return ", ".join(parts)


def main(backends=None, dtypes=DTYPES, *, quick=False, large=True, huge=True, out=print) -> int:
    out(f"ndcls check: {describe_machine()}")
    rows = run(backends, dtypes, quick=quick, large=large, huge=huge)
    out(table(rows))
    failed = [r for r in rows if not r.ok]
    ran = [r for r in rows if not r.skipped]
    if failed:
        out(f"FAILED: {len(failed)} of {len(ran)} (backend, dtype) pairs disagree with the reference")
        return 1
    if not ran:
        out("FAILED: no backend could run")
        return 1
    out(f"passed: {len(ran)} (backend, dtype) pairs agree with the reference")
    return 0
