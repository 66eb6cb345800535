"""One-release import shims: the module paths of the flat layout (``braintumor.predict``, ...) import the new ones.

An old path imports as a thin module that forwards attribute access to the new module and warns once
(DeprecationWarning) naming the new path. Remove in the release after 0.1.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# Old module path -> new module path (the flat layout of 0.1.0 -> packages by concern).
MOVED = {
    "atomic": "utils.atomic", "locking": "utils.locking", "devices": "utils.devices",
    "fingerprint": "utils.fingerprint", "seeding": "utils.seeding", "outputs": "utils.outputs",
    "augment": "data.augment", "groups": "data.groups", "audit": "data.audit", "volumes": "data.volumes",
    "inputs": "data.inputs", "phantom": "synthetic.phantom", "phantom_volumes": "synthetic.volumes",
    "model": "models.network", "checkpoint": "models.checkpoint", "formats": "models.formats",
    "config": "training.config", "train": "training.trainer", "train_step": "training.step",
    "runstate": "training.runstate", "ema": "training.ema", "distill": "training.distill",
    "tensorboard_log": "training.tensorboard", "distributed": "training.distributed",
    "metrics": "evaluation.metrics", "report": "evaluation.report", "per_image": "evaluation.per_image",
    "evaluate": "evaluation.evaluate", "ood": "trust.ood", "calibration": "trust.temperature",
    "explain": "visualize.explain", "figures": "visualize.figures", "predict": "inference.classifier",
    "backends": "inference.runtimes", "cpu_backends": "inference.accelerated", "export": "inference.export",
    "streaming": "inference.writers", "volume_verdict": "inference.volume_verdict",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``braintumor.<old>`` and loads it as a forwarder to ``braintumor.<new>``."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix == "braintumor" and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        new_name = "braintumor." + MOVED[module.__name__.partition(".")[2]]
        warnings.warn(f"{module.__name__} has moved to {new_name}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=3)
        target = importlib.import_module(new_name)
        module.__doc__ = target.__doc__
        module.__getattr__ = lambda name: getattr(target, name)
        module.__dir__ = lambda: dir(target)
        module.__all__ = getattr(target, "__all__", [n for n in dir(target) if not n.startswith("_")])


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
