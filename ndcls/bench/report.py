"""``ndcls bench``: every benchmark in one run, written as markdown and a PNG.

Three parts, each reusing its own module:

* kernel construction, ndcls vs the reference implementation (:mod:`ndcls.bench.construct`);
* a ConvNeXt block with a DCLS or dense depthwise convolution (``ndcls.torch_bridge.benchmark``);
* a sweep over the dilated kernel size at a fixed count (:func:`size_sweep`): forward + backward
  of the depthwise layer alone (ndcls ``Dcls2d``, the reference's ``Dcls2d``, a dense depthwise
  ``nn.Conv2d`` of the same size) and of the kernel construction alone, to show how each cost
  grows with the size.

torch, matplotlib and the reference implementation are imported when :func:`run_all` runs.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from typing import Callable, Optional

from ndcls.bench import construct as construct_bench

#: sizes and settings of the sweep; QUICK_* for ``--quick``
SWEEP_SIZES = (7, 11, 15, 19, 23, 27, 31)
SWEEP = dict(count=34, channels=96, batch=8, input_size=56, repeats=5)
QUICK_SWEEP_SIZES = (7, 15)
QUICK_SWEEP = dict(count=34, channels=8, batch=1, input_size=16, repeats=2)
LAYER = dict(batch=8, channels=96, size=56, dilated=17, count=34, warmup=2, repeats=5)
QUICK_LAYER = dict(batch=1, channels=8, size=16, dilated=17, count=34, warmup=1, repeats=3)


def _time_fwd_bwd(module, x, warmup: int, repeats: int) -> float:
    """Median seconds of ``module(x).sum().backward()`` (CUDA synchronised)."""
    import torch

    times = []
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        module(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def size_sweep(sizes=SWEEP_SIZES, *, count=34, channels=96, batch=8, input_size=56, repeats=5, device="cpu",
               backend=None, reference=True, progress: Optional[Callable] = None) -> list[dict]:
    """For each dilated size ``s``: one row of median seconds (forward + backward).

    ``layer_*``: a depthwise ``channels``-channel layer on a ``(batch, channels, input_size,
    input_size)`` input, "same" padding: ndcls ``Dcls2d`` (gauss), the reference ``Dcls2d``
    (gauss, when installed) and a dense ``s x s`` depthwise ``nn.Conv2d``. ``construct_*``: the
    kernel construction alone (gauss), ndcls (``construct`` + ``construct_grad``) and reference.
    """
    import torch
    from torch import nn

    from ndcls.torch_bridge import Dcls2d

    reference = reference and construct_bench.reference_available()
    if reference:
        logging.getLogger().setLevel(logging.ERROR)  # the reference logs about its CUDA-only kernel
        from DCLS.construct.modules import Dcls2d as RefDcls2d
    torch.manual_seed(0)
    x = torch.randn(batch, channels, input_size, input_size, device=device)
    rows = []
    for s in progress(list(sizes)) if progress else sizes:
        common = dict(dilated_kernel_size=s, padding=s // 2, groups=channels)
        row = dict(size=s, count=count)
        row["layer_ndcls_s"] = _time_fwd_bwd(Dcls2d(channels, channels, count, version="gauss", **common).to(device), x, 1, repeats)
        if reference:
            ref = RefDcls2d(channels, channels, count, version="gauss", use_implicit_gemm=False, **common).to(device)
            row["layer_reference_s"] = _time_fwd_bwd(ref, x, 1, repeats)
        dense = nn.Conv2d(channels, channels, s, padding=s // 2, groups=channels).to(device)
        row["layer_dense_s"] = _time_fwd_bwd(dense, x, 1, repeats)
        shape = construct_bench.LayerShape(f"dw{channels} {s}x{s} c{count}", channels, 1, count, (s, s))
        nd = construct_bench.measure_ndcls(shape, "gauss", backend, repeats)
        row["construct_ndcls_s"] = nd["forward_s"] + nd["backward_s"]
        if reference:
            rf = construct_bench.measure_reference(shape, "gauss", repeats)
            row["construct_reference_s"] = rf["forward_s"] + rf["backward_s"]
        rows.append(row)
    return rows


def _ms(s: Optional[float]) -> str:
    return "n/a" if s is None else f"{1e3 * s:.3g}"


def sweep_markdown(rows: list[dict]) -> str:
    head = ["dilated size", "layer ndcls ms", "layer reference ms", "layer dense ms", "construct ndcls ms",
            "construct reference ms"]
    keys = ["layer_ndcls_s", "layer_reference_s", "layer_dense_s", "construct_ndcls_s", "construct_reference_s"]
    lines = ["| " + " | ".join(head) + " |", "|---:" * len(head) + "|"]
    for r in rows:
        lines.append(f"| {r['size']} | " + " | ".join(_ms(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path, title: str = "") -> None:
    """Two panels against the dilated size: the depthwise layer and the construction alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in rows]
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    panels = (
        (axs[0], "depthwise layer, forward + backward",
         (("layer_ndcls_s", "ndcls Dcls2d (gauss)", "C0"), ("layer_reference_s", "reference Dcls2d (gauss)", "C3"),
          ("layer_dense_s", "dense depthwise nn.Conv2d s x s", "0.4"))),
        (axs[1], "kernel construction alone, forward + backward",
         (("construct_ndcls_s", "ndcls construct + construct_grad", "C0"),
          ("construct_reference_s", "reference construction (autograd)", "C3"))),
    )
    for ax, name, series in panels:
        for key, label, color in series:
            if all(key in r for r in rows):
                ax.plot(sizes, [1e3 * r[key] for r in rows], "o-", color=color, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("dilated kernel size s (s x s)")
        ax.set_ylabel("median time (ms)")
        ax.set_xticks(sizes)
        ax.set_title(name, fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_description(device: str) -> str:
    import numba
    import torch

    cpu = platform.processor() or platform.machine()
    parts = [f"{platform.system()} {platform.release()}", cpu, f"{os.cpu_count()} logical CPUs",
             f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
             f"numba {numba.__version__} ({numba.get_num_threads()} threads)"]
    if device.startswith("cuda"):
        parts.append(f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    return ", ".join(parts)


def run_all(out: str, *, quick: bool = False, device: str = "cpu", backend: Optional[str] = None,
            reference: bool = True, command: str = "ndcls bench", progress: Optional[Callable] = None) -> list[str]:
    """Run the three benchmarks, print their tables, write ``out/benchmarks.md`` and
    ``out/bench.png``; returns the two paths."""
    import ndcls

    os.makedirs(out, exist_ok=True)
    has_reference = reference and construct_bench.reference_available()
    date = time.strftime("%Y-%m-%d %H:%M")
    machine = machine_description(device)
    sections = [
        "# ndcls benchmarks",
        "",
        f"* date: {date}",
        f"* machine: {machine}",
        f"* device of the layer benchmarks: {device}; ndcls construction backend: "
        f"{backend or ndcls.default_backend('cpu').name}",
        f"* reference implementation (dcls): {'yes' if has_reference else 'not installed or disabled'}",
        f"* command: `{command}`",
        "",
    ]

    print("kernel construction (ndcls vs reference)")
    rows = construct_bench.run(
        construct_bench.QUICK_SHAPES if quick else construct_bench.SHAPES, ("gauss",) if quick else ("bilinear", "gauss"),
        backend=backend, repeats=3 if quick else 5, reference=has_reference, progress=progress,
    )
    table = construct_bench.markdown(rows)
    print(table, "\n")
    sections += ["## Kernel construction", "",
                 "ndcls `construct` / `construct_grad` against the reference's kernel construction (float32, "
                 "median times; peak = extra resident memory of one forward + backward).", "", table, ""]

    print("ConvNeXt block (forward + backward)")
    try:
        from ndcls.torch_bridge.benchmark import default_cases, markdown_table, run_cases
    except ImportError as exc:  # the layer benchmark module is part of the torch bridge
        table = f"not available: {exc}"
    else:
        settings = QUICK_LAYER if quick else LAYER
        cases = default_cases(settings["channels"], settings["dilated"], settings["count"])
        if not has_reference:
            cases = {k: v for k, v in cases.items() if not k.startswith("reference")}
        layer_rows = run_cases(device=device, cases=cases, **settings)  # cases timed round-robin
        table = markdown_table(layer_rows, settings["dilated"])
        b, c, s = settings["batch"], settings["channels"], settings["size"]
        sections += ["## ConvNeXt block", "", f"Input ({b}, {c}, {s}, {s}); the block's depthwise convolution is "
                     "DCLS or dense; median of forward + backward.", ""]
    print(table, "\n")
    sections += [table, ""]

    print("cost vs dilated kernel size")
    sweep_settings = QUICK_SWEEP if quick else SWEEP
    sizes = QUICK_SWEEP_SIZES if quick else SWEEP_SIZES
    sweep_rows = size_sweep(sizes, device=device, backend=backend, reference=has_reference, progress=progress,
                            **sweep_settings)
    table = sweep_markdown(sweep_rows)
    print(table, "\n")
    png = os.path.join(out, "bench.png")
    c, b, n = sweep_settings["channels"], sweep_settings["batch"], sweep_settings["input_size"]
    plot_sweep(sweep_rows, png, f"count {sweep_settings['count']}, {c} channels, input ({b}, {c}, {n}, {n}), "
               f"{device}; {date}")
    sections += ["## Cost against the dilated kernel size", "",
                 f"Count {sweep_settings['count']} at every size; depthwise layer on a ({b}, {c}, {n}, {n}) input "
                 "with \"same\" padding, and the kernel construction alone (gauss).", "", table, "",
                 "![time against dilated kernel size](bench.png)", ""]
    if device.startswith("cuda"):  # construction bandwidth on the GPU and the block at a GPU batch size
        from ndcls.bench import gpu

        print("GPU")
        section = gpu.run(quick=quick, progress=progress, command=command)
        print(section, "\n")
        sections += [section, ""]
    md = os.path.join(out, "benchmarks.md")
    with open(md, "w") as f:
        f.write("\n".join(sections))
    return [md, png]
