"""Run the GPU kernels under NVIDIA compute-sanitizer: memcheck, racecheck, synccheck.

    PYTHONPATH=. python benchmarks/sanitize.py [--tools memcheck,racecheck,synccheck] [--sanitizer PATH]

Each tool runs ``ndcls check --quick`` on the GPU backends (cupy, numba-cuda; every launch path
of the small cases, forward and backward) in a child process, with CuPy's memory pool and
torch's caching allocator turned off so that each result is its own allocation (an overrun of
a pooled block would go unseen). memcheck runs every dtype; racecheck and synccheck, which are
much slower, float32 and bfloat16. Exits non-zero if any tool reports an error or the check
itself fails. Needs a GPU and compute-sanitizer (part of the CUDA toolkit: /usr/local/cuda/bin).
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

CHILD = (
    "import sys, cupy; cupy.cuda.set_allocator(None); cupy.cuda.set_pinned_memory_allocator(None); "
    "from ndcls.cli import main; sys.exit(main(sys.argv[1:]))"
)
DTYPES = {"memcheck": ("float64", "float32", "float16", "bfloat16"), "racecheck": ("float32", "bfloat16"),
          "synccheck": ("float32", "bfloat16")}


def find_sanitizer(given=None):
    for candidate in (given, shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", default="memcheck,racecheck,synccheck")
    parser.add_argument("--sanitizer", help="path of compute-sanitizer (default: PATH, then /usr/local/cuda/bin)")
    parser.add_argument("--backend", action="append", help="default: cupy and numba-cuda")
    args = parser.parse_args(argv)
    sanitizer = find_sanitizer(args.sanitizer)
    if sanitizer is None:
        print("compute-sanitizer not found: install the CUDA toolkit or pass --sanitizer PATH", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    failed = []
    for tool in args.tools.split(","):
        check_args = ["check", "--quick", "--no-huge"]
        for backend in args.backend or ("cupy", "numba-cuda"):
            check_args += ["--backend", backend]
        for dtype in DTYPES[tool]:
            check_args += ["--dtype", dtype]
        # API errors are off: the CUDA bindings probe the driver (cuGetProcAddress) and are told
        # "invalid argument" by design; the kernels' memory errors are what this run looks for.
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "97", "--print-limit", "20", "--report-api-errors", "no"]
        if tool == "racecheck":
            cmd += ["--racecheck-report", "all"]
        cmd += [sys.executable, "-c", CHILD, *check_args]
        print(f"== {tool}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        print(f"== {tool}: exit status {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(f"{tool} (exit status {rc}{': sanitizer errors' if rc == 97 else ''})")
    if failed:
        print("FAILED: " + ", ".join(failed))
        return 1
    print("compute-sanitizer: no errors (" + args.tools + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
