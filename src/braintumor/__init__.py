"""braintumor: train, evaluate, explain and serve classifiers of 2-D brain MRI slices.

Research use only. Not a medical device; no clinical validity is claimed.

The public Python API (imported lazily, so ``import braintumor`` and the CLI start fast)::

    from braintumor import Classifier, train, evaluate, audit

The package is laid out by concern (see docs/layout.md); the module paths of earlier releases
(``braintumor.predict``, ``braintumor.train``, ...) still import for one release, with a DeprecationWarning.
"""

from __future__ import annotations

import importlib
import sys
import types

from braintumor import _compat

__version__ = "0.1.0"

RESEARCH_NOTE = "Research use only: not a medical device, no clinical validity is claimed."

# Public name -> "module:attribute"; resolved on first use.
_PUBLIC = {
    "Classifier": "braintumor.inference.classifier:Classifier",
    "Prediction": "braintumor.inference.classifier:Prediction",
    "TrainConfig": "braintumor.training.config:TrainConfig",
    "train": "braintumor.training.trainer:train",
    "evaluate": "braintumor.evaluation.evaluate:evaluate_checkpoint",
    "audit": "braintumor.data.audit:audit",
}

__all__ = ["RESEARCH_NOTE", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name].split(":")
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'braintumor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """Keeps the public functions ``train``, ``evaluate`` and ``audit`` when an old module path of the same name
    (``braintumor.train``, ...) is imported: the import system would otherwise set the module over the function."""

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_compat.install()
