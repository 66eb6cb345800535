"""JSON as the project writes it: plain types only (NaN and infinity, which are not JSON, become null), and
files written whole or not at all.

Every JSON document the project writes goes through here: evaluate's report.json, the audit, a volume's verdict,
the accelerated backends' verdicts, the results schema's ``to_dict``, the benchmarks' ``--json`` files and a run's
metrics.jsonl (one ``to_json(row, indent=None)`` per line).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.utils.atomic import atomic_write

__all__ = ["emit_report", "json_safe", "to_json", "write_json"]


def json_safe(value: Any) -> Any:
    """``value`` in plain JSON types: dicts (keys as str), lists (tuples and arrays too), numpy and 0-d
    tensor scalars as Python numbers, non-finite floats as None, paths and any other object as str."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):  # any shape, 0-d included: nested lists of Python numbers
        return json_safe(value.tolist())
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic) or (hasattr(value, "item") and getattr(value, "shape", None) == ()):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def to_json(value: Any, *, indent: int | None = 2) -> str:
    """``value`` as JSON text ending in a newline, after ``json_safe`` (so it always parses)."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> Path:
    """Write ``value`` to ``path`` as JSON, atomically: serialised first, so nothing is written when it cannot
    be, then renamed into place (the previous file or the complete new one, never a torn one)."""
    text = to_json(value, indent=indent)
    return atomic_write(path, lambda handle: handle.write(text), "w")


def emit_report(result: Any, json_target: str | os.PathLike | None, render: Callable[[Any], str]) -> int:
    """A benchmark's output, as ``--json`` asks: ``-`` prints ``result`` as JSON on stdout instead of the
    human-readable ``render(result)``; a file name saves it as JSON besides printing ``render(result)``; None
    prints ``render(result)`` only. Returns 0, the exit status."""
    if json_target is not None and str(json_target) == "-":
        sys.stdout.write(to_json(result))
        return 0
    if json_target:
        write_json(json_target, result)
    text = render(result)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
