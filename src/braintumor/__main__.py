"""``python -m braintumor`` (and ``torchrun -m braintumor train ...``)."""

import sys

from .cli import main

sys.exit(main())
