"""Forward + backward of a ConvNeXt-T stage-1 block with DCLS (ndcls and the reference) vs dense
depthwise convolutions. Prints a markdown table.

    PYTHONPATH=. python benchmarks/bench_layer.py [--batch 8] [--repeats 5] [--threads N]
"""

import argparse
import os
import platform
import shlex
import sys

import torch

from ndcls.torch_bridge.benchmark import markdown_table, run_cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=96)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--dilated", type=int, default=17)
    ap.add_argument("--count", type=int, default=34)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_cases(batch=args.batch, channels=args.channels, size=args.size, dilated=args.dilated,
                     count=args.count, warmup=args.warmup, repeats=args.repeats, device=args.device)
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}, input "
          f"({args.batch}, {args.channels}, {args.size}, {args.size}), median of {args.repeats} after {args.warmup} warm-up, "
          f"cases interleaved, load average before {os.getloadavg()[0]:.1f}\n")
    print(markdown_table(rows, args.dilated))


if __name__ == "__main__":
    main()
