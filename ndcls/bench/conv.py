"""Direct convolution against construct + dense convolution, in the layers (issue 10, item 5).

For each case, in one process and one run, forward + backward (input gradient included, as in
a hidden layer) of:

* the ndcls layer with ``method="direct"`` (:func:`ndcls.torch_bridge.conv`),
* the ndcls layer with ``method="construct"`` (build ``K``, then torch's convolution),
* the reference implementation's layer (``dcls`` on PyPI), when installed,
* for the ConvNeXt case, torch's dense depthwise 17x17 and 7x7 convolutions (the issue's targets),

timed round-robin (one call of each per round), median over the rounds; the forward alone is
timed inside the same calls. Peak memory is the growth of the resident-set high-water mark
during one more forward + backward of each, after the timing. The route ``method="auto"``
picks is reported with its ratio to the faster route; :func:`calibrate` turns the measured
times into the rates of the cost model (:mod:`ndcls.torch_bridge.cost`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from ndcls.bench._util import fmt_mib, fmt_ms, median, peak_growth, reference_modules, time_round_robin


@dataclass(frozen=True)
class ConvCase:
    name: str
    ndim: int
    in_channels: int
    out_channels: int
    groups: int
    count: int
    dilated: int
    padding: int
    input_shape: tuple  # (batch, in_channels, *spatial)
    version: str  # the layers' version: "v0" (bilinear) or "gauss" (width abs(SIG) + 0.27 = 0.5 at init)
    dense_baselines: tuple = ()  # kernel sizes of torch depthwise convolutions timed alongside

    @property
    def interpolation(self):
        return {"v0": "bilinear", "gauss": "gauss (sigma 0.5)"}[self.version]


def _pair(name, ndim, cin, cout, groups, count, dilated, padding, shape, dense=()):
    return tuple(ConvCase(name, ndim, cin, cout, groups, count, dilated, padding, shape, v, dense)
                 for v in ("v0", "gauss"))


#: the issue's shapes; batch sizes scaled down so that the run stays within minutes on 2 cores
CASES = (
    *_pair("1-D DiffWave 64->64 c3 1025", 1, 64, 64, 1, 3, 1025, 512, (1, 64, 8000)),
    *_pair("1-D delays 700->256 c1 250", 1, 700, 256, 1, 1, 250, 125, (2, 700, 100)),
    *_pair("ConvNeXt dw96 56x56 c34 17x17", 2, 96, 96, 96, 34, 17, 8, (2, 96, 56, 56), (17, 7)),
    ConvCase("3-D dw32 16x32x32 c10 9x9x9", 3, 32, 32, 32, 10, 9, 4, (1, 32, 16, 32, 32), "v0"),
)
QUICK_CASES = (
    *_pair("1-D DiffWave 16->16 c3 257", 1, 16, 16, 1, 3, 257, 128, (1, 16, 1000)),
    *_pair("1-D delays 64->32 c1 50", 1, 64, 32, 1, 1, 50, 25, (2, 64, 100)),
    *_pair("ConvNeXt dw16 20x20 c34 17x17", 2, 16, 16, 16, 34, 17, 8, (2, 16, 20, 20), (17, 7)),
    ConvCase("3-D dw8 8x8x8 c10 9x9x9", 3, 8, 8, 8, 10, 9, 4, (1, 8, 8, 8, 8), "v0"),
)
#: the same shapes at GPU-sized batches (``ndcls bench --device cuda``, benchmarks/bench_gpu.py)
GPU_CASES = (
    *_pair("1-D DiffWave 64->64 c3 1025", 1, 64, 64, 1, 3, 1025, 512, (8, 64, 8000)),
    *_pair("1-D delays 700->256 c1 250", 1, 700, 256, 1, 1, 250, 125, (64, 700, 100)),
    *_pair("ConvNeXt dw96 56x56 c34 17x17", 2, 96, 96, 96, 34, 17, 8, (32, 96, 56, 56), (17, 7)),
    ConvCase("3-D dw32 16x32x32 c10 9x9x9", 3, 32, 32, 32, 10, 9, 4, (8, 32, 16, 32, 32), "v0"),
)
#: tiny layer whose time is the fixed cost of a call (calibrates the cost model's call overheads)
TINY_CASE = ConvCase("tiny 4->4 c2 9", 1, 4, 4, 1, 2, 9, 4, (1, 4, 32), "v0")


def case_arrays(case: ConvCase, rng):
    """NumPy float32 arrays of one case for the array API (the profile scripts): input, weight,
    positions uniform over the kernel, sigma (0.5, gauss) or None, the kernel sizes, and the
    keywords of ``ndcls.conv`` other than ``backend``."""
    import numpy as np

    n, interp = case.ndim, "bilinear" if case.version == "v0" else "gauss"
    cin, cout, g = case.in_channels, case.out_channels, case.groups
    x = rng.standard_normal(case.input_shape, dtype=np.float32)
    w = rng.standard_normal((cout, cin // g, case.count), dtype=np.float32)
    p = rng.uniform(0, case.dilated - 1, size=(n, cout, cin // g, case.count)).astype(np.float32)
    s = None if interp == "bilinear" else np.full(p.shape, 0.5, dtype=np.float32)
    return x, w, p, s, (case.dilated,) * n, dict(interpolation=interp, padding=case.padding, groups=g)


def _ndcls_layer(case: ConvCase, method: str):
    from ndcls.torch_bridge import Dcls1d, Dcls2d, Dcls3d

    cls = {1: Dcls1d, 2: Dcls2d, 3: Dcls3d}[case.ndim]
    return cls(case.in_channels, case.out_channels, case.count, dilated_kernel_size=case.dilated,
               padding=case.padding, groups=case.groups, version=case.version, method=method)


def _reference_layer(case: ConvCase):
    modules = reference_modules()
    if modules is None:
        return None
    cls = {1: modules.Dcls1d, 2: modules.Dcls2d, 3: modules.Dcls3d}[case.ndim]
    extra = dict(use_implicit_gemm=False) if case.ndim == 2 else {}
    return cls(case.in_channels, case.out_channels, kernel_count=case.count, dilated_kernel_size=case.dilated,
               padding=case.padding, groups=case.groups, version=case.version, **extra)


def _dense_layer(case: ConvCase, size: int):
    from torch import nn

    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[case.ndim]
    return conv(case.in_channels, case.out_channels, size, padding=size // 2, groups=case.groups)


def work(case: ConvCase, device: str = "cpu") -> dict:
    """The cost model's estimate for the case on ``device`` (work in multiply-adds, taps, predicted seconds)."""
    from ndcls.torch_bridge import cost
    from ndcls.torch_bridge._ops import output_spatial

    n = case.ndim
    out = output_spatial(case.input_shape[2:], [case.dilated] * n, [1] * n, [case.padding] * n, "")
    return cost.estimate(
        batch=case.input_shape[0], out_channels=case.out_channels, in_per_group=case.in_channels // case.groups,
        out_spatial=out, sizes=[case.dilated] * n, learned_dims=list(range(n)), count=case.count,
        interpolation="bilinear" if case.version == "v0" else "gauss", width=0.5 if case.version == "gauss" else None,
        device=device,
    )


def _step(module, x, record: Optional[list] = None, sync: Callable[[], None] = lambda: None):
    """One training step: forward, backward and a small SGD step, so that every call sees new
    parameters (as in training: no route may reuse what an earlier call built from the same
    parameters); appends the forward's seconds to ``record`` (``sync`` waits for the device)."""
    import time

    import torch

    params = list(module.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-6) if params else None

    def run():
        if optimizer is not None and any(p.grad is not None for p in params):
            optimizer.step()
        module.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        y = module(x)
        sync()
        if record is not None:
            record.append(time.perf_counter() - t0)
        y.backward(_ones_like(y))
        return y

    return run


def _ones_like(y):
    import torch

    return torch.ones_like(y)


def _cuda_peak_growth(fn) -> int:
    """Bytes by which torch's CUDA allocation high-water mark exceeds the current use during ``fn()``."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(case: ConvCase, *, warmup: int = 1, repeats: int = 3, reference: bool = True, memory: bool = True,
            device: str = "cpu") -> dict:
    """One row: median forward and forward + backward seconds, and peak bytes, per implementation.

    On ``device="cuda"`` every call ends with a device synchronisation (wall times are device
    times) and peaks are torch's CUDA allocations; torch's default TF32 settings are kept (what
    a user's dense convolution runs with).
    """
    import torch

    from ndcls.torch_bridge import cost

    torch.manual_seed(0)
    x = torch.randn(case.input_shape, device=device).requires_grad_()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    modules = {}
    if cost.direct_available(device):
        modules["direct"] = _ndcls_layer(case, "direct")
    modules["construct"] = _ndcls_layer(case, "construct")
    if "direct" in modules:
        modules["direct"].load_state_dict(modules["construct"].state_dict())
    ref = _reference_layer(case) if reference else None
    if ref is not None:
        modules["reference"] = ref
    for size in case.dense_baselines:
        modules[f"dense {size}x{size}" if case.ndim == 2 else f"dense {size}"] = _dense_layer(case, size)
    modules = {name: m.to(device) for name, m in modules.items()}
    forward = {name: [] for name in modules}
    fns = {name: _step(m, x, forward[name], sync) for name, m in modules.items()}
    total = time_round_robin(fns, warmup=warmup, repeats=repeats, sync=sync)
    row = dict(case=case.name, version=case.version, interpolation=case.interpolation,
               input_shape=list(case.input_shape), repeats=repeats, impls=list(modules))
    for name in modules:
        row[f"{name}_fwd_s"] = median(forward[name][warmup:])
        row[f"{name}_s"] = median(total[name])
        row[f"{name}_min_s"] = min(total[name])
        if memory:
            row[f"{name}_peak_bytes"] = _cuda_peak_growth(fns[name]) if device == "cuda" else peak_growth(fns[name])
    row["auto_route"] = _ndcls_layer(case, "auto").to(device).route(x)
    est = work(case, device)
    row.update(work_dense=est["work_dense"], work_direct=est["work_direct"], taps=est["taps"],
               model_direct_s=est["direct_s"], model_construct_s=est["construct_s"],
               mixing=case.in_channels // case.groups > 1)
    if "direct" in modules:
        best = min(row["direct_s"], row["construct_s"])
        row["auto_vs_best"] = row[f"{row['auto_route']}_s"] / best
    return row


def run(cases=CASES, *, warmup: int = 1, repeats: int = 3, reference: bool = True, memory: bool = True,
        progress: Optional[Callable] = None, device: str = "cpu") -> list[dict]:
    return [measure(c, warmup=warmup, repeats=repeats, reference=reference, memory=memory, device=device)
            for c in (progress(list(cases)) if progress else cases)]


def markdown(rows: list[dict]) -> str:
    """Times and peaks per implementation, then the ratios the issue asks about."""
    impls = []
    for r in rows:
        impls += [i for i in r["impls"] if i not in impls]
    head = ["case", "interp"] + [f"{i} fwd / fwd+bwd ms" for i in impls] + [f"{i} peak MiB" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (2 * len(impls))]
    for r in rows:
        cells = [r["case"], r["interpolation"]]
        cells += [f"{fmt_ms(r.get(f'{i}_fwd_s'))} / {fmt_ms(r.get(f'{i}_s'))}" if f"{i}_s" in r else "-" for i in impls]
        cells += [fmt_mib(r.get(f"{i}_peak_bytes")) if f"{i}_s" in r else "-" for i in impls]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ratio_markdown(rows)]
    return "\n".join(lines)


def ratio_markdown(rows: list[dict]) -> str:
    head = ["case", "interp", "construct / direct", "reference / direct", "auto picks", "auto / faster route"]
    has_dense = any("dense 17x17_s" in r for r in rows)
    if has_dense:
        head += ["dense 17x17 / direct", "direct / dense 7x7"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b else "n/a"

    for r in rows:
        d = r.get("direct_s")
        cells = [r["case"], r["interpolation"], ratio(r.get("construct_s"), d), ratio(r.get("reference_s"), d),
                 r["auto_route"], f"{r['auto_vs_best']:.2f}" if "auto_vs_best" in r else "n/a"]
        if has_dense:
            cells += [ratio(r.get("dense 17x17_s"), d), ratio(d, r.get("dense 7x7_s"))] if "dense 17x17_s" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """A few lines for stdout: speed-ups of direct over construct, auto's worst pick, the targets."""
    if not any("direct_s" in r for r in rows):
        return ["conv: direct route not measured (the default CPU backend has no conv yet)"]
    parts = [f"{r['case'].split(' ')[0]} {r['case'].split(' ')[1]} {r['version']} {r['construct_s'] / r['direct_s']:.1f}x"
             for r in rows]
    out = ["conv: construct / direct, fwd+bwd: " + ", ".join(parts)]
    worst = max(rows, key=lambda r: r["auto_vs_best"])
    out.append(f"conv: auto within {worst['auto_vs_best']:.2f}x of the faster route on every case "
               f"(worst: {worst['case']} {worst['version']}, picked {worst['auto_route']})")
    for r in rows:
        if "dense 17x17_s" in r and r["version"] == "v0":
            out.append(f"conv: {r['case']} bilinear: dense 17x17 / direct {r['dense 17x17_s'] / r['direct_s']:.1f}x "
                       f"(target >= 10), direct / dense 7x7 {r['direct_s'] / r['dense 7x7_s']:.2f}x (target <= 1.5)")
    return out


# -- calibration of the cost model ---------------------------------------------------------------
def calibrate(rows: list[dict], tiny: Optional[dict] = None, device: str = "cpu"):
    """Rates of the cost model from measured rows (:func:`measure`), one regime at a time.

    For each route and regime (depthwise: ``in_channels // groups == 1``; mixing: more), the rate
    is the median over the rows of ``work / (measured seconds - fixed call cost)``; the fixed
    call costs are the times of the tiny layer ``tiny`` (a :func:`measure` row of
    :data:`TINY_CASE`) when given, else the current constants. Regimes without measurements keep
    the current constants. Returns the new :class:`~ndcls.torch_bridge.cost.Rates`.
    """
    from ndcls.torch_bridge import cost

    rates = cost.GPU_RATES if device == "cuda" else cost.RATES
    call_c = tiny["construct_s"] if tiny else rates.call_construct
    call_d = tiny.get("direct_s", rates.call_direct) if tiny else rates.call_direct
    new = dict(call_construct=call_c, call_direct=call_d)
    for regime, mixing in (("depthwise", False), ("mixing", True)):
        sel = [r for r in rows if r["mixing"] == mixing and "direct_s" in r]
        if sel:
            new[f"dense_{regime}"] = median([r["work_dense"] / max(r["construct_s"] - call_c, 1e-9) for r in sel])
            new[f"direct_{regime}"] = median([r["work_direct"] / max(r["direct_s"] - call_d, 1e-9) for r in sel])
    return dataclasses.replace(rates, **new)


def calibration_markdown(rows: list[dict], rates) -> str:
    """Achieved rates per row, and the route the given rates would pick against the measurement."""
    lines = ["| case | interp | regime | dense GMAC/s | direct GMAC/s | construct / direct, model | "
             "construct / direct, measured | pick with these rates | pick / faster |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "direct_s" not in r:
            continue
        mixing = r["mixing"]
        t_c = rates.call_construct + r["work_dense"] / (rates.dense_mixing if mixing else rates.dense_depthwise)
        t_d = rates.call_direct + r["work_direct"] / (rates.direct_mixing if mixing else rates.direct_depthwise)
        pick = "direct" if t_d < t_c else "construct"
        lines.append(f"| {r['case']} | {r['interpolation']} | {'mixing' if mixing else 'depthwise'} | "
                     f"{r['work_dense'] / r['construct_s'] / 1e9:.3g} | {r['work_direct'] / r['direct_s'] / 1e9:.3g} | "
                     f"{t_c / t_d:.2f} | {r['construct_s'] / r['direct_s']:.2f} | {pick} | {r[f'{pick}_s'] / min(r['direct_s'], r['construct_s']):.2f} |")
    lines += ["", "Rates (multiply-adds per second of forward + backward; seconds per call):", "",
              "```python", repr(rates), "```"]
    return "\n".join(lines)

