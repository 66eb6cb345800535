"""Optional dependencies: a missing one is one line naming the extra that installs it.

The core install (``pip install braintumor``) trains, evaluates, predicts and explains slices; each runtime
beyond that is an extra (pyproject.toml ``[project.optional-dependencies]``)::

    from braintumor.utils.optional import require
    ort = require("onnxruntime", "onnx", "ONNX models")   # the module, or MissingExtra

``MissingExtra`` is a UserError (one line, exit 2) and an ImportError, so code that already falls back on
ImportError (e.g. TensorBoard logging) keeps doing so.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from braintumor.errors import UserError

# module imported -> the extra of pyproject.toml that installs it (the one place naming them)
EXTRA_OF = {
    "fastapi": "serve", "uvicorn": "serve", "python_multipart": "serve",
    "onnx": "onnx", "onnxruntime": "onnx",
    "nibabel": "volumes",
    "tensorboard": "tensorboard",
    "openvino": "openvino",
}


class MissingExtra(UserError, ImportError):
    """An optional package is not installed; the message says which extra to install."""


def install_hint(extra: str) -> str:
    return f"pip install 'braintumor[{extra}]'"


def require(module: str, extra: str | None = None, feature: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"onnxruntime"``) or raise MissingExtra naming ``feature`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = extra or EXTRA_OF.get(top, "all")
        raise MissingExtra(f"{feature or 'this command'} needs the {top} package, which is not installed: "
                           f"{install_hint(extra)}") from err
