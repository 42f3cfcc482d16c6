"""The ``ndcls`` command: ``ndcls demo`` (positions learned end to end), ``ndcls bench`` and
``ndcls check`` (every backend on this machine against the NumPy reference).

Only argparse runs at import; torch, matplotlib and tqdm are imported inside the commands, so
``ndcls --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, dynamic_ncols=True, **kw)


# -- ndcls demo ----------------------------------------------------------------------------
def _demo(args) -> int:
    import torch

    from ndcls import demo

    device = args.device or _default_device()
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    config = demo.DemoConfig(
        ndim=args.ndim, count=args.count, interpolation=args.interpolation, steps=args.steps,
        seed=args.seed, candidates=args.candidates, device=device,
    )
    resolved = config.resolved()
    print(f"ndcls demo: {resolved.ndim}-D kernel {'x'.join([str(resolved.size)] * resolved.ndim)}, "
          f"{resolved.count} hidden elements, interpolation {resolved.interpolation}, "
          f"{resolved.steps} steps, {resolved.candidates} students, seed {resolved.seed}, device {device}")
    print("preparing the kernels (compiled on the first run, cached for the next ones) ...", end=" ", flush=True)
    print(f"{demo.warm_up(config):.1f} s", flush=True)
    result = demo.run(config, progress=_tqdm(desc="training", unit="step"))
    print(demo.report(result))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"demo-{resolved.ndim}d-{resolved.interpolation}.png")
    demo.plot(result, path)
    print(f"figure written to {path}")
    return 0


# -- ndcls bench ---------------------------------------------------------------------------
def _bench(args) -> int:
    from ndcls.bench import report

    device = args.device or _default_device()
    command = "ndcls " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    sections = args.sections.split(",") if args.sections else None
    summary, paths = report.run_all(
        out=args.out, quick=args.quick, device=device, backend=args.backend, reference=not args.no_reference,
        command=command, progress=_tqdm(desc="bench", unit="case", leave=False), sections=sections,
    )
    for line in summary:
        print(line)
    print("tables: " + paths[0] + "; raw measurements: " + paths[1]
          + "".join(f"; {os.path.basename(p)}: {p}" for p in paths[2:]))
    return 0


# -- ndcls check ---------------------------------------------------------------------------
def _check(args) -> int:
    from ndcls import check

    if not check.gpu_present() and "numba.cuda" not in sys.modules:
        # no GPU: numba-cuda runs under the simulator (small cases), as in the CPU tests
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    return check.main(
        backends=args.backend or None, dtypes=tuple(args.dtype or check.DTYPES), quick=args.quick,
        large=not args.quick, huge=not args.no_huge,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndcls", description="ndcls: Dilated Convolution with Learnable Spacings (demo, benchmarks, checks)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo", help="a DCLS layer learns the positions of a hidden sparse kernel (teacher-student)",
        description="Teacher-student demo: a hidden sparse kernel (count elements at non-grid positions) "
        "produces outputs from random inputs; a DCLS layer with the same count learns its positions and "
        "weights from the input/output pairs. Prints learned vs true elements and writes a PNG.",
    )
    d.add_argument("--ndim", type=int, default=2, choices=(1, 2, 3), help="kernel dimensionality (default 2)")
    d.add_argument("--count", type=int, default=5, help="elements in the hidden kernel and the student (default 5)")
    d.add_argument("--interpolation", default="gauss", choices=("gauss", "triangle", "bilinear"),
                   help="student layer version: gauss -> 'gauss', triangle -> 'max', bilinear -> 'v0' (default gauss)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: per ndim)")
    d.add_argument("--seed", type=int, default=0, help="random seed (teacher, inputs, initialisation)")
    d.add_argument("--candidates", type=int, default=None,
                   help="students trained side by side, the best by training loss is reported (default: per ndim)")
    d.add_argument("--out", default="ndcls-demo", help="folder for the PNG (default ./ndcls-demo)")
    d.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tensors are tiny, threads cost more than they save)")
    d.set_defaults(func=_demo)

    b = sub.add_parser(
        "bench", help="construction, layer, direct-convolution and threading benchmarks (vs the reference and dense conv)",
        description="Runs the benchmark sections (construction vs the reference dcls package, ConvNeXt block, "
        "sweep over dilated kernel sizes, direct convolution vs construct + dense convolution with the cost "
        "model's calibration, CPU threading), writes the tables to OUT/benchmarks.md, the raw measurements to "
        "OUT/results.json and the sweep's plot to OUT/bench.png, and prints a short summary.",
    )
    b.add_argument("--quick", action="store_true", help="small CI-sized run (seconds)")
    b.add_argument("--out", default="ndcls-bench", help="folder for benchmarks.md and bench.png (default ./ndcls-bench)")
    b.add_argument("--device", default=None, help="torch device of the layer benchmarks (default: cuda when available)")
    b.add_argument("--backend", default=None, help="ndcls backend of the construction benchmark (default: the host arrays' default)")
    b.add_argument("--no-reference", action="store_true", help="skip the reference implementation even if installed")
    b.add_argument("--sections", default=None,
                   help="comma-separated subset of: construct, layer, sweep, conv, threads (default: all)")
    b.set_defaults(func=_bench, argv=None)

    c = sub.add_parser(
        "check", help="verify every backend on this machine against the NumPy reference (exit 1 on disagreement)",
        description="Runs every backend usable here (numpy, numba; cupy and numba-cuda on a GPU, numba-cuda under "
        "the CUDA simulator without one) forward and backward on a fixed set of cases (every interpolation, "
        "N = 1..3, N-M-D, invalid elements, a large batch, on a GPU a kernel of more than 2**31 cells) in "
        "float64/float32/float16/bfloat16, compares with the float64 NumPy reference within the per-dtype "
        "tolerances, prints a table and exits non-zero on any disagreement.",
    )
    c.add_argument("--quick", action="store_true", help="small cases only (seconds; e.g. under compute-sanitizer)")
    c.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    c.add_argument("--dtype", action="append", choices=("float64", "float32", "float16", "bfloat16"),
                   help="check only this dtype (repeatable)")
    c.add_argument("--no-huge", action="store_true", help="skip the kernel of more than 2**31 cells (GPU)")
    c.set_defaults(func=_check)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        args.argv = list(argv) if argv is not None else None
    t0 = time.perf_counter()
    rc = args.func(args)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
