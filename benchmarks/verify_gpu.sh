#!/usr/bin/env bash
# The whole GPU verification of docs/gpu-verification.md, in order, with a log per step.
#   bash benchmarks/verify_gpu.sh [LOGDIR]        (from the repository root; no network needed)
# Exit status: the number of failed steps (0: everything passed).
set -u
cd "$(dirname "$0")/.."
LOG=${1:-gpu-verification-logs}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
failed=0
step() {  # step NAME COMMAND...
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit status $rc after $((SECONDS - t0)) s (log: $LOG/$name.log)"
    tail -n 30 "$LOG/$name.log"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}
step 0-environment $PY -c "import sys, numpy, numba, torch, cupy, ndcls; print(sys.version); print('numpy', numpy.__version__, 'numba', numba.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__); print(torch.cuda.get_device_name(0)); from numba import cuda; cuda.detect()"
step 1-check $PY -m ndcls check
step 2-gpu-tests $PY -m pytest -m gpu -q -p no:cacheprovider
step 3-sanitizer $PY benchmarks/sanitize.py
step 4-benchmark $PY benchmarks/bench_gpu.py --docs docs/benchmarks.md
step 5-overhead $PY benchmarks/bench_overhead.py
step 6-conv-stages $PY benchmarks/profile_conv_gpu.py
echo "== $failed step(s) failed; logs in $LOG/"
exit $failed
