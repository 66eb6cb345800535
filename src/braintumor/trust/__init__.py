"""What makes a prediction trustworthy: the OOD detector, the temperature, and fitting both.

``from braintumor.trust import fit_trust, store_trust`` (the 0.1 module path) keeps working: those names resolve
lazily to :mod:`braintumor.trust.fitting`.
"""

from __future__ import annotations

import importlib

_FITTING = ("fit_trust", "store_trust", "describe_trust", "fit_trust_for_checkpoint", "logits_and_features")


def __getattr__(name: str):
    if name in _FITTING:
        return getattr(importlib.import_module("braintumor.trust.fitting"), name)
    raise AttributeError(f"module 'braintumor.trust' has no attribute {name!r}")
