"""Layer benchmark: forward + backward of a ConvNeXt block whose depthwise conv is DCLS or dense.

:func:`run_cases` returns one row per case; :func:`markdown_table` formats them; ``ndcls bench
--sections layer`` runs it. The ndcls layers use their default ``method="auto"``.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from ndcls.bench._util import reference_modules
from ndcls.torch_bridge.layers import Dcls2d


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise conv, LayerNorm, 4x MLP with GELU, layer scale, residual."""

    def __init__(self, dwconv: nn.Module, channels: int) -> None:
        super().__init__()
        self.dwconv = dwconv
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(1e-6 * torch.ones(channels))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def _reference_dcls2d() -> Optional[type]:
    modules = reference_modules()
    return None if modules is None else modules.Dcls2d


def default_cases(channels: int = 96, dilated: int = 17, count: int = 34) -> dict[str, Callable[[], nn.Module]]:
    """Case name -> factory of the depthwise convolution the block uses."""
    dcls = dict(dilated_kernel_size=dilated, padding=dilated // 2, groups=channels)
    cases = {
        f"ndcls Dcls2d gauss {dilated}x{dilated} count {count}": lambda: Dcls2d(channels, channels, count, version="gauss", **dcls),
        f"ndcls Dcls2d v0 {dilated}x{dilated} count {count}": lambda: Dcls2d(channels, channels, count, version="v0", **dcls),
    }
    ref = _reference_dcls2d()
    if ref is not None:
        cases[f"reference Dcls2d gauss {dilated}x{dilated} count {count}"] = lambda: ref(
            channels, channels, count, version="gauss", use_implicit_gemm=False, **dcls)
        cases[f"reference Dcls2d v0 {dilated}x{dilated} count {count}"] = lambda: ref(
            channels, channels, count, version="v0", use_implicit_gemm=False, **dcls)
    cases["dense depthwise 7x7 nn.Conv2d"] = lambda: nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
    cases[f"dense depthwise {dilated}x{dilated} nn.Conv2d"] = lambda: nn.Conv2d(
        channels, channels, dilated, padding=dilated // 2, groups=channels)
    return cases


def _time_once(block: nn.Module, x: torch.Tensor) -> float:
    block.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    block(x).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_cases(
    *,
    batch: int = 8,
    channels: int = 96,
    size: int = 56,
    dilated: int = 17,
    count: int = 34,
    warmup: int = 2,
    repeats: int = 5,
    device: str = "cpu",
    cases: Optional[dict[str, Callable[[], nn.Module]]] = None,
) -> list[dict]:
    """Forward + backward time of the block with each depthwise conv.

    Cases are timed round-robin (one run of each case per round, after ``warmup`` rounds that
    also absorb JIT compilation), so a change of machine load affects every case alike. Rows
    hold the median and minimum seconds and their ratios to the dense 7x7 block and to the
    dense ``dilated`` x ``dilated`` block (the minimum is the better estimate on a busy machine).
    """
    cases = cases if cases is not None else default_cases(channels, dilated, count)
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device)
    blocks = {name: ConvNeXtBlock(factory(), channels).to(device) for name, factory in cases.items()}
    times = {name: [] for name in blocks}
    for r in range(warmup + repeats):
        for name, block in blocks.items():
            t = _time_once(block, x)
            if r >= warmup:
                times[name].append(t)
    rows = [dict(case=name, median_s=statistics.median(t), min_s=min(t), runs=len(t)) for name, t in times.items()]
    for stat in ("median", "min"):
        base7 = next((r[f"{stat}_s"] for r in rows if "7x7" in r["case"]), None)
        base_d = next((r[f"{stat}_s"] for r in rows if r["case"].startswith("dense") and "7x7" not in r["case"]), None)
        for r in rows:
            r[f"{stat}_vs_dense7"] = r[f"{stat}_s"] / base7 if base7 else float("nan")
            r[f"{stat}_vs_dense_dilated"] = r[f"{stat}_s"] / base_d if base_d else float("nan")
    return rows


def markdown_table(rows: list[dict], dilated: int = 17) -> str:
    d = f"{dilated}x{dilated}"
    lines = [
        f"| case (ConvNeXt block, fwd+bwd) | median ms | min ms | median / dense 7x7 | median / dense {d} "
        f"| min / dense 7x7 | min / dense {d} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f} | "
            f"{r['median_vs_dense7']:.2f} | {r['median_vs_dense_dilated']:.2f} | "
            f"{r['min_vs_dense7']:.2f} | {r['min_vs_dense_dilated']:.2f} |"
        )
    return "\n".join(lines)
