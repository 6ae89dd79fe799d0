"""``python -m benchmarks.gpu_check``: see the package docstring and ``run.parse_args``."""

from __future__ import annotations

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
