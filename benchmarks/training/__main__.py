"""``python -m benchmarks.training``: the command line of ``run.main``."""

from .run import main

main()
