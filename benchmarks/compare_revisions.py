"""The direct-convolution layers at two revisions of ndcls, side by side, on a noisy machine.

On a shared machine the speed of the cores drifts by tens of percent from one minute to the
next, so times taken minutes apart compare badly. This script checks each revision out into a
temporary git worktree and alternates them, one fresh process per (round, revision), each
timing a few training steps (forward, backward with the input gradient, an SGD step, so every
forward sees new parameters) of the layers of ``ndcls bench``'s ``conv`` section with
``method="direct"``; it reports, per layer and revision, the best step of all rounds, and the
ratio. Numba compiles each revision's kernels once (its own cache, in its worktree).

    python benchmarks/compare_revisions.py OLD NEW [--rounds 4] [--cases "delays:gauss,delays:v0"]

Case names are substrings of the ``conv`` section's case names and ``v0`` (bilinear) or
``gauss``. Needs git and the packages of the project in the running interpreter.
"""

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, time, torch
from ndcls.bench import conv as bc
out = []
for spec in sys.argv[1:]:
    name, version = spec.split(":")
    case = [c for c in bc.CASES if name in c.name and c.version == version][0]
    torch.manual_seed(0)
    layer = bc._ndcls_layer(case, "direct")
    x = torch.randn(case.input_shape).requires_grad_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-6)
    times = []
    for step in range(12):
        if step:
            optimizer.step()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        y = layer(x)
        y.backward(torch.ones_like(y))
        times.append(time.perf_counter() - t0)
    out.append(f"{spec}={min(times[2:])}")
print(" ".join(out))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cases", default="delays:gauss,delays:v0,ConvNeXt:v0,ConvNeXt:gauss")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    best = {rev: {} for rev in (args.old, args.new)}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for k, rev in enumerate((args.old, args.new)):
            trees[rev] = os.path.join(tmp, f"rev{k}")
            subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "-q", trees[rev], rev], check=True)
        try:
            for r in range(args.rounds):
                for rev, tree in trees.items():
                    env = dict(os.environ, PYTHONPATH=tree)
                    line = subprocess.run([sys.executable, "-c", CHILD, *cases], cwd=tree, env=env, capture_output=True,
                                          text=True, check=True).stdout.strip().splitlines()[-1]
                    for item in line.split():
                        case, seconds = item.rsplit("=", 1)
                        best[rev][case] = min(best[rev].get(case, float("inf")), float(seconds))
                    print(f"round {r + 1}, {rev}: " + ", ".join(f"{c} {best[rev][c] * 1e3:.1f} ms" for c in cases), flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", root, "worktree", "remove", "--force", tree], check=False)
    print()
    print(f"| layer (direct, fwd + bwd, best of {args.rounds} x 10 training steps) | {args.old} ms | {args.new} ms | {args.old} / {args.new} |")
    print("|---|---:|---:|---:|")
    for case in cases:
        a, b = best[args.old][case], best[args.new][case]
        print(f"| {case} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
