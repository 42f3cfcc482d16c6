"""Construction benchmark: ndcls construct + construct_grad against the reference implementation.

For each layer shape and interpolation, in one process and one run:

* ndcls (default backend for host arrays, or the one named): time of ``construct`` and of
  ``construct_grad`` (median over repeats after a warm-up that compiles);
* the reference implementation (``dcls`` on PyPI, the ``DCK`` module of its layers) on torch
  CPU: time of the kernel construction forward and backward;
* for both, the extra peak memory of one forward + backward: growth of the process's RSS
  high-water mark (reset through ``/proc/self/clear_refs``) in a fresh subprocess after a
  warm-up, inputs already allocated, with a fixed glibc mmap threshold;
* the time to allocate and fill (with ones) a NumPy array the size of ``K``: the floor that a
  kernel writing ``K`` once cannot beat.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from ndcls.bench._util import reference_modules


@dataclass(frozen=True)
class LayerShape:
    name: str
    out_channels: int
    in_per_group: int  # in_channels // groups
    count: int
    sizes: tuple[int, ...]

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_per_group, self.count)

    @property
    def kernel_bytes_f32(self):
        return 4 * self.out_channels * self.in_per_group * math.prod(self.sizes)


SHAPES = (
    LayerShape("convnext-dw96 17x17 c34", 96, 1, 34, (17, 17)),
    LayerShape("convnext-dw768 17x17 c34", 768, 1, 34, (17, 17)),
    LayerShape("dense2d 128x128 7x7 c5", 128, 128, 5, (7, 7)),
    LayerShape("dense3d 32x32 7x7x7 c10", 32, 32, 10, (7, 7, 7)),
    LayerShape("delays1d 512x512 31 c1", 512, 512, 1, (31,)),
)
QUICK_SHAPES = (
    LayerShape("convnext-dw96 17x17 c34", 96, 1, 34, (17, 17)),
    LayerShape("delays1d 64x64 31 c1", 64, 64, 1, (31,)),
)
#: ndcls interpolation -> the reference implementation's version
REFERENCE_VERSION = {"bilinear": "v0", "gauss": "gauss", "triangle": "max"}


def inputs(shape: LayerShape, interpolation: str, dtype=np.float32, seed=0):
    """Weight, positions (inside the kernel), sigma and a kernel gradient, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape.weight_shape).astype(dtype)
    m = len(shape.sizes)
    limits = np.array(shape.sizes, dtype=np.float64).reshape((m,) + (1,) * 3) - 1
    p = (rng.random((m, *shape.weight_shape)) * limits).astype(dtype)
    s = rng.uniform(0.5, 2.0, size=p.shape).astype(dtype) if interpolation != "bilinear" else None
    g = rng.standard_normal((shape.out_channels, shape.in_per_group, *shape.sizes)).astype(dtype)
    return w, p, s, g


def _median_time(fn, repeats, min_seconds=0.2):
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 50 * repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ndcls(shape, interpolation, backend=None, repeats=5):
    import ndcls

    w, p, s, g = inputs(shape, interpolation)
    kw = dict(sigma=s, interpolation=interpolation, backend=backend)
    ndcls.construct(w, p, shape.sizes, **kw)  # warm-up: compiles
    ndcls.construct_grad(g, w, p, shape.sizes, **kw)
    forward = _median_time(lambda: ndcls.construct(w, p, shape.sizes, **kw), repeats)
    backward = _median_time(lambda: ndcls.construct_grad(g, w, p, shape.sizes, **kw), repeats)
    return dict(forward_s=forward, backward_s=backward)


def measure_fill(shape, repeats=5):
    n = shape.kernel_bytes_f32 // 4

    def fill():
        a = np.empty(n, dtype=np.float32)
        a.fill(1.0)
        return a

    return _median_time(fill, repeats)


def _reference_layer(shape: LayerShape, interpolation: str):
    """A reference ``Dcls{1,2,3}d`` layer with ndcls's inputs mapped onto its parameters."""
    import torch

    modules = reference_modules()
    n = len(shape.sizes)
    cls = {1: modules.Dcls1d, 2: modules.Dcls2d, 3: modules.Dcls3d}[n]
    groups = shape.out_channels if shape.in_per_group == 1 else 1
    in_channels = shape.in_per_group * groups
    layer = cls(
        in_channels,
        shape.out_channels,
        kernel_count=shape.count,
        dilated_kernel_size=shape.sizes if n > 1 else shape.sizes[0],
        groups=groups,
        version=REFERENCE_VERSION[interpolation],
    )
    _, _, _, g = inputs(shape, interpolation)
    return layer, torch.from_numpy(g)


def measure_reference(shape, interpolation, repeats=3):
    """Forward and backward time of the reference's kernel construction (``layer.DCK``)."""
    import torch

    layer, g = _reference_layer(shape, interpolation)
    sig = getattr(layer, "SIG", None)

    def forward():
        with torch.no_grad():
            return layer.DCK(layer.weight, layer.P, sig)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        k = layer.DCK(layer.weight, layer.P, sig)
        k.backward(g.reshape(k.shape))

    forward_backward()  # warm-up
    t_forward = _median_time(forward, repeats, min_seconds=0.0)
    t_total = _median_time(forward_backward, repeats, min_seconds=0.0)
    return dict(forward_s=t_forward, backward_s=max(t_total - t_forward, 0.0))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child_peak(impl, fields, interpolation):
    """In a fresh process: RSS high-water growth (bytes) of one forward + backward, after a warm-up."""
    shape = LayerShape(**{**fields, "sizes": tuple(fields["sizes"])})
    if impl == "ndcls":
        import ndcls

        w, p, s, g = inputs(shape, interpolation)
        kw = dict(sigma=s, interpolation=interpolation)

        def step():
            k = ndcls.construct(w, p, shape.sizes, **kw)
            return k, ndcls.construct_grad(g, w, p, shape.sizes, **kw)
    else:
        layer, g = _reference_layer(shape, interpolation)
        sig = getattr(layer, "SIG", None)

        def step():
            layer.zero_grad(set_to_none=True)
            k = layer.DCK(layer.weight, layer.P, sig)
            k.backward(g.reshape(k.shape))
            return k

    step()  # warm-up: compilation, thread pools, lazily built index tensors
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status_kib("VmRSS")
    result = step()
    peak = _status_kib("VmHWM")
    del result
    return max(peak - before, 0) * 1024


def peak_bytes(impl, shape, interpolation):
    """Extra peak memory (bytes) of one construction forward + backward by ``impl``
    ("ndcls" or "reference"), measured in a fresh subprocess; None if it could not run."""
    code = (
        "import json, sys; from ndcls.bench.construct import _child_peak; "
        "print(_child_peak(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]))"
    )
    # a fixed mmap threshold: large buffers are returned to the OS on free, so RSS tracks allocations
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-c", code, impl, json.dumps(asdict(shape)), interpolation], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        return None
    return int(result.stdout.strip().splitlines()[-1])


def reference_available() -> bool:
    return reference_modules() is not None


def run(shapes=SHAPES, interpolations=("bilinear", "gauss"), backend=None, repeats=5, reference=True, progress=None):
    """Measure every (shape, interpolation); returns a list of dict rows (seconds, bytes)."""
    reference = reference and reference_available()
    if reference:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    rows = []
    cases = [(shape, interp) for shape in shapes for interp in interpolations]
    for shape, interp in progress(cases) if progress else cases:
        row = dict(shape=shape.name, interpolation=interp, kernel_bytes=shape.kernel_bytes_f32)
        row.update({f"ndcls_{k}": v for k, v in measure_ndcls(shape, interp, backend, repeats).items()})
        row["fill_s"] = measure_fill(shape, repeats)
        row["ndcls_peak_bytes"] = peak_bytes("ndcls", shape, interp)
        if reference:
            row.update({f"reference_{k}": v for k, v in measure_reference(shape, interp).items()})
            row["reference_peak_bytes"] = peak_bytes("reference", shape, interp)
        rows.append(row)
    return rows


def _fmt_time(s):
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def _fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:.3g} MiB"


#: Linux batches RSS counter updates per thread (every 64 page faults): growth below this is not seen
RSS_RESOLUTION = 64 * 4096


def _fmt_peak(peak, kernel_bytes):
    if peak is None:
        return "n/a"
    if peak < RSS_RESOLUTION:
        return f"< {RSS_RESOLUTION // 1024} KiB"
    return f"{peak / kernel_bytes:.2f}"


def markdown(rows) -> str:
    """The table recorded in docs/benchmarks.md."""
    has_ref = any("reference_forward_s" in r for r in rows)
    head = ["shape", "interp", "K", "ndcls fwd", "ndcls bwd", "fill K", "fwd / fill", "ndcls peak (x K)"]
    if has_ref:
        head += ["reference fwd", "reference bwd", "reference peak", "speed-up fwd+bwd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kb = r["kernel_bytes"]
        cells = [
            r["shape"],
            r["interpolation"],
            _fmt_bytes(kb),
            _fmt_time(r["ndcls_forward_s"]),
            _fmt_time(r["ndcls_backward_s"]),
            _fmt_time(r["fill_s"]),
            f"{r['ndcls_forward_s'] / r['fill_s']:.2f}",
            _fmt_peak(r["ndcls_peak_bytes"], kb),
        ]
        if has_ref:
            total = r["ndcls_forward_s"] + r["ndcls_backward_s"]
            ref_total = r["reference_forward_s"] + r["reference_backward_s"]
            cells += [
                _fmt_time(r["reference_forward_s"]),
                _fmt_time(r["reference_backward_s"]),
                _fmt_bytes(r["reference_peak_bytes"]) + ("" if r["reference_peak_bytes"] is None else f" ({r['reference_peak_bytes'] / kb:.0f}x K)"),
                f"{ref_total / total:.0f}x",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
