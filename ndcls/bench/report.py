"""``ndcls bench``: the benchmarks of ndcls, run as sections of one report.

Every benchmark of the project lives in this package, one module per subject, and
:data:`SECTIONS` lists them in the order ``ndcls bench`` runs them:

* ``construct``: kernel construction, ndcls vs the reference implementation (:mod:`ndcls.bench.construct`);
* ``layer``: a ConvNeXt block with a DCLS or dense depthwise convolution (:mod:`ndcls.bench.layer`);
* ``sweep``: the dilated kernel size at a fixed count (:func:`size_sweep`): forward + backward of
  the depthwise layer alone (ndcls ``Dcls2d``, the reference's ``Dcls2d``, a dense depthwise
  ``nn.Conv2d`` of the same size) and of the kernel construction alone;
* ``conv``: the direct convolution against construct + dense convolution in the layers, with the
  cost model's calibration (:mod:`ndcls.bench.conv`);
* ``threads``: CPU threading of the kernels, idle and busy machine, Python threads (:mod:`ndcls.bench.threads`);
* ``overhead``: host time per call for a tiny kernel (:mod:`ndcls.bench.overhead`);
* ``gpu``: construction bandwidth and the ConvNeXt block on a CUDA device (:mod:`ndcls.bench.gpu`;
  by default only with ``--device cuda``).

A section is a function ``(settings) -> Section``; adding a benchmark is one module and one
entry in :data:`SECTIONS`. :func:`run_all` writes every table to ``OUT/benchmarks.md``, the raw
measurements to ``OUT/results.json`` and the sweep's plot to ``OUT/bench.png``, and returns a
few summary lines (what ``ndcls bench`` prints).

torch, matplotlib and the reference implementation are imported when a section runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ndcls.bench import construct as construct_bench
from ndcls.bench._util import reference_modules, silence_reference_logs

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
        RefDcls2d = reference_modules().Dcls2d
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


@dataclass
class Settings:
    out: str
    quick: bool = False
    device: str = "cpu"
    backend: Optional[str] = None
    reference: bool = True
    progress: Optional[Callable] = None
    command: str = "ndcls bench"


@dataclass
class Section:
    title: str
    text: str  # markdown: what was measured, then the tables
    rows: object  # raw measurements, written to results.json
    summary: list = field(default_factory=list)  # lines for stdout
    files: list = field(default_factory=list)  # extra files written (figures)


def _construct_section(st: Settings) -> Section:
    rows = construct_bench.run(
        construct_bench.QUICK_SHAPES if st.quick else construct_bench.SHAPES,
        ("gauss",) if st.quick else ("bilinear", "gauss"),
        backend=st.backend, repeats=3 if st.quick else 5, reference=st.reference, progress=st.progress,
    )
    text = ("ndcls `construct` / `construct_grad` against the reference's kernel construction (float32, "
            "median times; peak = extra resident memory of one forward + backward).\n\n" + construct_bench.markdown(rows))
    summary = []
    if rows and "reference_forward_s" in rows[0]:
        speed = [(r["reference_forward_s"] + r["reference_backward_s"]) / (r["ndcls_forward_s"] + r["ndcls_backward_s"])
                 for r in rows]
        summary.append(f"construct: reference / ndcls, fwd+bwd: {min(speed):.0f}x to {max(speed):.0f}x over {len(rows)} cases")
    return Section("Kernel construction", text, rows, summary)


def _layer_section(st: Settings) -> Section:
    from ndcls.bench.layer import default_cases, markdown_table, run_cases

    settings = QUICK_LAYER if st.quick else LAYER
    cases = default_cases(settings["channels"], settings["dilated"], settings["count"])
    if not st.reference:
        cases = {k: v for k, v in cases.items() if not k.startswith("reference")}
    rows = run_cases(device=st.device, cases=cases, **settings)  # cases timed round-robin
    b, c, n = settings["batch"], settings["channels"], settings["size"]
    text = (f"Input ({b}, {c}, {n}, {n}); the block's depthwise convolution is DCLS (ndcls layers with their "
            "default `method=\"auto\"`) or dense; forward + backward.\n\n" + markdown_table(rows, settings["dilated"]))
    summary = [f"layer: ConvNeXt block, {r['case']}: {r['median_vs_dense_dilated']:.2f}x the dense "
               f"{settings['dilated']}x{settings['dilated']} block" for r in rows if r["case"].startswith("ndcls")]
    return Section("ConvNeXt block", text, rows, summary)


def _sweep_section(st: Settings) -> Section:
    sweep_settings = QUICK_SWEEP if st.quick else SWEEP
    sizes = QUICK_SWEEP_SIZES if st.quick else SWEEP_SIZES
    rows = size_sweep(sizes, device=st.device, backend=st.backend, reference=st.reference, progress=st.progress,
                      **sweep_settings)
    png = os.path.join(st.out, "bench.png")
    c, b, n = sweep_settings["channels"], sweep_settings["batch"], sweep_settings["input_size"]
    plot_sweep(rows, png, f"count {sweep_settings['count']}, {c} channels, input ({b}, {c}, {n}, {n}), "
               f"{st.device}; {time.strftime('%Y-%m-%d %H:%M')}")
    text = (f"Count {sweep_settings['count']} at every size; depthwise layer on a ({b}, {c}, {n}, {n}) input "
            "with \"same\" padding, and the kernel construction alone (gauss).\n\n" + sweep_markdown(rows)
            + "\n\n![time against dilated kernel size](bench.png)")
    return Section("Cost against the dilated kernel size", text, rows, [], [png])


def _conv_section(st: Settings) -> Section:
    from ndcls.bench import conv as conv_bench

    cases = conv_bench.QUICK_CASES if st.quick else conv_bench.CASES
    warmup, repeats = (1, 2) if st.quick else (1, 3)
    rows = conv_bench.run(cases, warmup=warmup, repeats=repeats, reference=st.reference, progress=st.progress)
    tiny = conv_bench.measure(conv_bench.TINY_CASE, warmup=2, repeats=5 if st.quick else 20, reference=False,
                              memory=False)
    rates = conv_bench.calibrate(rows, tiny)
    batches = ", ".join(f"{c.name}: batch {c.input_shape[0]}" for c in cases if c.version != "gauss")
    text = ("Forward + backward (input gradient included) of one layer, CPU, float32: ndcls with "
            "`method=\"direct\"` and `method=\"construct\"`, the reference implementation's layer, and "
            "torch's dense depthwise convolutions for the ConvNeXt shape; cases timed round-robin, median of "
            f"{repeats} rounds after {warmup} warm-up; peak = growth of the resident set during one more "
            f"forward + backward (MiB). Batches: {batches}. Gauss layers have width abs(SIG) + 0.27 = 0.5.\n\n"
            + conv_bench.markdown(rows)
            + "\n\n### Cost model\n\nRates each route achieved (work of the cost model / measured time), and "
            "the route the cost model would pick with the rates calibrated from this run (median per regime; "
            f"fixed call costs from a tiny layer: construct {1e3 * tiny['construct_s']:.2f} ms"
            + (f", direct {1e3 * tiny['direct_s']:.2f} ms" if "direct_s" in tiny else "") + ").\n\n"
            + conv_bench.calibration_markdown(rows, rates))
    return Section("Direct convolution", text, dict(rows=rows, tiny=tiny, calibrated_rates=dataclasses.asdict(rates)),
                   conv_bench.summary(rows))


def _threads_section(st: Settings) -> Section:
    from ndcls.bench import threads

    result = threads.run(quick=st.quick, progress=st.progress)
    text = (threads.__doc__.split("\n\n", 1)[1].strip() + "\n\n" + threads.markdown(result))
    return Section("CPU threads", text, result, threads.summary(result))


def _overhead_section(st: Settings) -> Section:
    from ndcls.bench import overhead

    figures = overhead.measure(number=500 if st.quick else 2000, rounds=3 if st.quick else 7)
    table = ["| call | median (us) | min (us) |", "|---|---:|---:|"]
    table += [f"| {name} | {median:.1f} | {best:.1f} |" for name, (median, best) in figures.items()]
    text = ("Host time per call for a 3-cell kernel (one element, float64, NumPy arrays and CPU tensors): "
            "argument checks, dispatch, array exchange, the torch op and autograd; median and minimum over "
            "rounds of many calls, compilation excluded.\n\n" + "\n".join(table))
    summary = [f"host overhead: construct {figures['construct'][0]:.0f} us"
               + (f", torch fwd+bwd {figures['torch fwd+bwd'][0]:.0f} us" if "torch fwd+bwd" in figures else "")]
    return Section("Host overhead per call", text, figures, summary)


def _gpu_section(st: Settings) -> Section:
    from ndcls.bench import gpu

    title, _, body = gpu.run(quick=st.quick, progress=st.progress, command=st.command).partition("\n")
    return Section(title.removeprefix("## "), body.strip(), None, [title.removeprefix("## ")])


#: name -> section, in the order ``ndcls bench`` runs them ("gpu" only by default with a CUDA device)
SECTIONS: dict[str, Callable[[Settings], Section]] = {
    "construct": _construct_section,
    "layer": _layer_section,
    "sweep": _sweep_section,
    "conv": _conv_section,
    "threads": _threads_section,
    "overhead": _overhead_section,
    "gpu": _gpu_section,
}


def run_all(out: str, *, quick: bool = False, device: str = "cpu", backend: Optional[str] = None,
            reference: bool = True, command: str = "ndcls bench", progress: Optional[Callable] = None,
            sections=None) -> tuple[list[str], list[str]]:
    """Run the named sections (default: all), write ``out/benchmarks.md``, ``out/results.json``
    (and the sweep's ``out/bench.png``); returns (summary lines, paths written)."""
    import ndcls

    if sections is None:
        names = [n for n in SECTIONS if n != "gpu" or device.startswith("cuda")]
    else:
        names = list(sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    silence_reference_logs()
    os.makedirs(out, exist_ok=True)
    has_reference = reference and construct_bench.reference_available()
    st = Settings(out=out, quick=quick, device=device, backend=backend, reference=has_reference, progress=progress,
                  command=command)
    date = time.strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# ndcls benchmarks",
        "",
        f"* date: {date}",
        f"* machine: {machine_description(device)}",
        f"* load average (1 min) at the start: {load:.1f}",
        f"* device of the layer benchmarks: {device} (the conv and threads sections run on the CPU); "
        f"ndcls construction backend: {backend or ndcls.default_backend('cpu').name}",
        f"* reference implementation (dcls): {'yes' if has_reference else 'not installed or disabled'}",
        f"* command: `{command}`",
        "",
    ]
    summary, raw, files = [], {}, []
    for name in names:
        section = SECTIONS[name](st)
        lines += [f"## {section.title}", "", section.text, ""]
        raw[name] = section.rows
        summary += section.summary
        files += section.files
    md = os.path.join(out, "benchmarks.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    js = os.path.join(out, "results.json")
    with open(js, "w") as f:
        json.dump(dict(date=date, command=command, load_average=load, sections=raw), f, indent=1, default=str)
    return summary, [md, js, *files]
