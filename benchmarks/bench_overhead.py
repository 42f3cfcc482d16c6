"""Host overhead per call (array API and torch op) for a 3-cell kernel; see ndcls/bench/overhead.py.

    PYTHONPATH=. python benchmarks/bench_overhead.py
    # before/after on a busy machine: both checkouts back to back, in one command
    for d in /path/to/main /path/to/branch; do PYTHONPATH=$d python benchmarks/bench_overhead.py; done
"""

import sys

from ndcls.bench.overhead import main

if __name__ == "__main__":
    sys.exit(main())
