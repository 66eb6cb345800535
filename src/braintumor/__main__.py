"""``python -m braintumor`` (and ``torchrun -m braintumor train ...``)."""

import sys

from braintumor.cli import main

sys.exit(main())
