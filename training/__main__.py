"""``python -m training`` (and ``accelerate launch -m training``, ``torchrun -m training``), and its
subcommand ``python -m training ablate`` (``training/ablate.py``); ``training/cli.py`` reads the arguments."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process imports the main module again
    sys.exit(main())
