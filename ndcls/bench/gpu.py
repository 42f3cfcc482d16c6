"""GPU benchmarks: construction bandwidth against the device's peak, and the layer on the GPU.

* :func:`construction`: ``construct`` and ``construct_grad`` on CuPy arrays, per backend
  ("cupy", "numba-cuda"), shape and interpolation, timed with CUDA events on the current
  stream (median of repeats after a warm-up that compiles). Achieved bandwidth counts the bytes
  a kernel must move at least: the forward writes ``K`` and reads the element arrays, the
  backward reads ``dL/dK`` and the element arrays and writes the gradients. The peak is the
  device's DRAM bandwidth from its memory clock and bus width.
* :func:`run`: that table plus the ConvNeXt block (ndcls vs the reference vs cuDNN dense
  depthwise convolution, ``ndcls.bench.layer``) on ``cuda``, as markdown with the
  device and date; :func:`write_docs` puts it into ``docs/benchmarks.md``.

Used by ``ndcls bench --device cuda`` and ``benchmarks/bench_gpu.py``.
"""

from __future__ import annotations

import math
import re
import statistics
import time

import numpy as np

from ndcls.bench import construct as construct_bench

INTERPOLATIONS = ("bilinear", "triangle", "gauss")
BACKENDS = ("cupy", "numba-cuda")


def device_description(device_id: int = 0) -> dict:
    """Name, SM count, memory and peak DRAM bandwidth (GB/s) of a CUDA device."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    # memoryClockRate is in kHz; DDR: two transfers per clock; memoryBusWidth in bits
    clock_khz = props.get("memoryClockRate", 0)
    bus_bits = props.get("memoryBusWidth", 0)
    peak = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else float("nan")
    return dict(
        name=name,
        sms=int(props["multiProcessorCount"]),
        memory_gib=props["totalGlobalMem"] / 2**30,
        peak_gbs=peak,
        capability=f"{props['major']}.{props['minor']}",
        cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
        driver=cupy.cuda.runtime.driverGetVersion(),
    )


def _event_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` between two CUDA events on the current stream."""
    import cupy

    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def _bytes(shape, interpolation: str, itemsize: int) -> tuple[int, int]:
    """Least bytes moved by the forward and by the backward."""
    n_elem = math.prod(shape.weight_shape)
    m = len(shape.sizes)
    rows = m * (2 if interpolation != "bilinear" else 1)  # positions (and sigma)
    elements = (1 + rows) * n_elem * itemsize
    k = shape.kernel_bytes_f32 // 4 * itemsize
    return k + elements, k + 2 * elements


def construction(shapes=construct_bench.SHAPES, interpolations=INTERPOLATIONS, backends=BACKENDS, repeats=20,
                 dtype="float32", progress=None) -> list[dict]:
    import cupy

    import ndcls

    rows = []
    todo = [(b, s, i) for b in backends for s in shapes for i in interpolations]
    for backend, shape, interp in progress(todo) if progress else todo:
        w, p, s, g = (None if x is None else cupy.asarray(x.astype(dtype)) for x in construct_bench.inputs(shape, interp))
        kw = dict(sigma=s, interpolation=interp, backend=backend)
        row = dict(backend=backend, shape=shape.name, interpolation=interp, kernel_bytes=shape.kernel_bytes_f32)
        try:
            ndcls.construct(w, p, shape.sizes, **kw)  # warm-up: compiles
            ndcls.construct_grad(g, w, p, shape.sizes, **kw)
            row["forward_s"] = _event_time(lambda: ndcls.construct(w, p, shape.sizes, **kw), repeats)
            row["backward_s"] = _event_time(lambda: ndcls.construct_grad(g, w, p, shape.sizes, **kw), repeats)
        except Exception as exc:  # recorded in the table, not hidden
            row["error"] = f"{type(exc).__name__}: {exc}"
        fwd_bytes, bwd_bytes = _bytes(shape, interp, np.dtype(dtype).itemsize)
        row["forward_bytes"], row["backward_bytes"] = fwd_bytes, bwd_bytes
        rows.append(row)
    return rows


def _us(s) -> str:
    return "n/a" if s is None else f"{s * 1e6:.1f}"


def construction_markdown(rows, peak_gbs: float) -> str:
    head = ["backend", "shape", "interp", "K", "fwd µs", "fwd GB/s", "fwd % peak", "bwd µs", "bwd GB/s", "bwd % peak"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [r["backend"], r["shape"], r["interpolation"], f"{r['kernel_bytes'] / 2**20:.3g} MiB"]
        if "error" in r:
            cells += [r["error"]] + [""] * 5
        else:
            for t, b in ((r["forward_s"], r["forward_bytes"]), (r["backward_s"], r["backward_bytes"])):
                gbs = b / t / 1e9
                cells += [_us(t), f"{gbs:.0f}", f"{100 * gbs / peak_gbs:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(quick: bool = False, progress=None, command: str = "python benchmarks/bench_gpu.py") -> str:
    """The GPU section of docs/benchmarks.md: device, date, construction bandwidth and layer times."""
    import torch

    dev = device_description()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    shapes = construct_bench.QUICK_SHAPES if quick else construct_bench.SHAPES
    rows = construction(shapes, ("gauss",) if quick else INTERPOLATIONS, repeats=5 if quick else 20, progress=progress)
    out = [
        f"## GPU: {dev['name']} ({date})",
        "",
        f"* device: {dev['name']}, compute capability {dev['capability']}, {dev['sms']} SMs, "
        f"{dev['memory_gib']:.0f} GiB, peak DRAM bandwidth {dev['peak_gbs']:.0f} GB/s (memory clock x bus width)",
        f"* CUDA runtime {dev['cuda_runtime']}, driver {dev['driver']}, torch {torch.__version__}",
        f"* command: `{command}`",
        "",
        "### Construction on the GPU (float32, CuPy arrays, CUDA-event times, median)",
        "",
        "GB/s counts the least bytes each direction must move (forward: write K, read the elements; "
        "backward: read dL/dK and the elements, write the gradients).",
        "",
        construction_markdown(rows, dev["peak_gbs"]),
        "",
    ]
    from ndcls.bench.report import LAYER, QUICK_LAYER
    from ndcls.bench.layer import default_cases, markdown_table, run_cases

    settings = dict(QUICK_LAYER if quick else LAYER)
    if not quick:
        settings["batch"] = 32  # a GPU-sized batch
    layer_rows = run_cases(device="cuda", cases=default_cases(settings["channels"], settings["dilated"], settings["count"]), **settings)
    b, c, s = settings["batch"], settings["channels"], settings["size"]
    out += [
        "### ConvNeXt block on the GPU (forward + backward)",
        "",
        f"Input ({b}, {c}, {s}, {s}) float32; the depthwise convolution is ndcls `Dcls2d`, the reference's "
        "`Dcls2d` (when installed) or a dense cuDNN `nn.Conv2d`.",
        "",
        markdown_table(layer_rows, settings["dilated"]),
        "",
    ]
    out += direct_conv_section(quick=quick, progress=progress)
    return "\n".join(out)


def direct_conv_section(quick: bool = False, progress=None) -> list[str]:
    """Markdown lines: the direct convolution against construct + cuDNN (and the reference layer,
    the dense ConvNeXt convolutions), forward + backward in the layers, on the issue's shapes at
    GPU-sized batches (``ndcls.bench.conv.GPU_CASES``); then the cost-model rates they give."""
    from ndcls.bench import conv as conv_bench

    cases = conv_bench.QUICK_CASES if quick else conv_bench.GPU_CASES
    rows = conv_bench.run(cases, warmup=2, repeats=5 if quick else 10, device="cuda", progress=progress)
    tiny = conv_bench.measure(conv_bench.TINY_CASE, warmup=2, repeats=10, reference=False, memory=False, device="cuda")
    rates = conv_bench.calibrate(rows, tiny, device="cuda")
    return [
        "### Direct convolution on the GPU (layers, forward + backward, float32)",
        "",
        "Each call ends with a device synchronisation; medians of round-robin repeats; peaks are torch's "
        "CUDA allocations during one call. Dense convolutions run with torch's defaults (cuDNN, TF32 allowed); "
        "the direct route computes in float32. Batches: " + ", ".join(f"{c.name} {c.input_shape}" for c in cases[::2]) + ".",
        "",
        conv_bench.markdown(rows),
        "",
        "Cost-model rates these times give (`ndcls.bench.conv.calibrate`, tiny layer for the call costs):",
        "",
        conv_bench.calibration_markdown(rows, rates),
        "",
    ]


_SECTION = re.compile(r"^## GPU: .*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)


def write_docs(path: str, section: str) -> None:
    """Append ``section`` to the markdown file ``path`` (an earlier GPU section for the same
    device name is replaced)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# ndcls benchmarks\n"
    name = section.splitlines()[0].split(" (")[0]
    kept = [m for m in _SECTION.finditer(text) if m.group(0).startswith(name + " (")]
    for m in reversed(kept):
        text = text[: m.start()] + text[m.end() :]
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
