"""GPU benchmark: construction bandwidth against the device's peak, and the ConvNeXt block against
cuDNN dense convolution and the reference implementation, on CUDA device 0.

    PYTHONPATH=. python benchmarks/bench_gpu.py [--quick] [--docs docs/benchmarks.md]

Prints the markdown section (device and date in its title); with ``--docs`` also writes it into
that file, replacing an earlier section for the same device. See docs/gpu-verification.md.
"""

import argparse
import sys

from ndcls.bench import gpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, one interpolation, small layer (a minute)")
    parser.add_argument("--docs", help="markdown file to write the section into (e.g. docs/benchmarks.md)")
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_gpu.py" + (" --quick" if args.quick else "") + (f" --docs {args.docs}" if args.docs else "")
    section = gpu.run(quick=args.quick, command=command, progress=lambda it: _report(it))
    print(section)
    if args.docs:
        gpu.write_docs(args.docs, section)
        print(f"written into {args.docs}")
    return 0


def _report(items):
    for item in items:
        print("  ", *(getattr(x, "name", x) for x in item), file=sys.stderr, flush=True)
        yield item


if __name__ == "__main__":
    sys.exit(main())
