"""Run a script or module with ndcls in place of the reference implementation, without editing it.

Usage::

    python -m ndcls.torch_bridge.as_dcls script.py [args ...]
    python -m ndcls.torch_bridge.as_dcls -m package.module [args ...]

registers ndcls as ``DCLS`` (:func:`ndcls.torch_bridge.install_as_dcls`), then runs the script
(or module) as ``__main__`` with ``sys.argv`` set as if it had been started directly.
"""

from __future__ import annotations

import os
import runpy
import sys

from ndcls.torch_bridge._install import install_as_dcls

USAGE = "usage: python -m ndcls.torch_bridge.as_dcls (script.py | -m module) [args ...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(USAGE, file=sys.stderr if not argv or argv[0] == "-m" else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    install_as_dcls()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script.py` does
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
