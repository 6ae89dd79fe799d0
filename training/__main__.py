"""``python -m training`` (and ``accelerate launch -m training``, ``torchrun -m training``)."""

import sys

from .cli import main

sys.exit(main())
