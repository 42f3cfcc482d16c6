"""Construction benchmark (issue: foundation): ndcls vs the reference implementation vs filling K.

    python benchmarks/bench_construct.py [--quick] [--backend numba] [--repeats 5] [--json out.json]

Prints a markdown table (the one in docs/benchmarks.md). Needs the bench extra for the
reference columns: pip install -e '.[bench]'.
"""

import argparse
import json
import platform
import time

import numba

from ndcls.bench import construct as bench


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes (CI-sized)")
    parser.add_argument("--backend", default=None, help="ndcls backend (default: the one for host arrays)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interpolations", default="bilinear,gauss")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args()
    shapes = bench.QUICK_SHAPES if args.quick else bench.SHAPES
    rows = bench.run(
        shapes,
        tuple(args.interpolations.split(",")),
        backend=args.backend,
        repeats=args.repeats,
        reference=not args.no_reference,
        progress=None,
    )
    print(f"<!-- {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{numba.get_num_threads()} threads, float32 -->")
    print(bench.markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
