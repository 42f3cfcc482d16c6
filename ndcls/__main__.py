"""``python -m ndcls``: the ``ndcls`` command (see :mod:`ndcls.cli`)."""

import sys

from ndcls.cli import main

sys.exit(main())
