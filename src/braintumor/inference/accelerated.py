"""Accelerated CPU backends (ONNX Runtime int8, OpenVINO) and the accuracy check that decides whether one is used.

An accelerated export is only as good as its agreement with the float32 network. :func:`compare_predictions`
measures it on labelled slices, :func:`judge` applies the rule (accuracy within :data:`MAX_ACCURACY_GAP_POINTS`
of float32 and the same class on at least :data:`MIN_AGREEMENT` of the slices), and :func:`write_verdict` stores the
result beside the export as ``<export>.<backend>.verdict.json``, tied to the checkpoint it was made from.
``Classifier.from_checkpoint(..., backend="auto")`` then loads the fastest export whose verdict passed, and
otherwise stays on PyTorch and prints the measured gap in one line (:func:`resolve_auto_backend`).
``benchmarks/cpu_inference.py`` produces the exports, the measurements and the verdicts.

OpenVINO (``pip install braintumor[openvino]``) runs the same ONNX files, the int8 QDQ one included; its
compiled model is wrapped in the small part of onnxruntime's session interface that ``Classifier`` uses.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.utils.atomic import atomic_write
from braintumor.inference.runtimes import decode_onnx_metadata
from braintumor.utils.devices import available_cores
from braintumor.errors import UserError
from braintumor.utils.fingerprint import file_fingerprint
from braintumor.utils.optional import require

MAX_ACCURACY_GAP_POINTS = 0.3
MIN_AGREEMENT = 0.99
VERDICT_SUFFIX = ".verdict.json"


def compare_predictions(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy of both predicted-class arrays on ``labels`` and the share of slices where they agree."""
    reference, candidate, labels = map(np.asarray, (reference, candidate, labels))
    if not len(labels) or reference.shape != labels.shape or candidate.shape != labels.shape:
        raise ValueError("need equal-length, non-empty reference, candidate and label arrays")
    return {"n": int(len(labels)), "reference_accuracy": float((reference == labels).mean()),
            "accuracy": float((candidate == labels).mean()), "agreement": float((candidate == reference).mean())}


def judge(comparison: dict[str, Any]) -> dict[str, Any]:
    """The comparison plus the accuracy gap in points and whether the backend may be the default."""
    gap = 100.0 * (comparison["reference_accuracy"] - comparison["accuracy"])
    # Rounded: 100 * (0.950 - 0.947) is 0.30000000000000027 in floating point, and exactly 0.3 points is allowed.
    default_ok = round(gap, 9) <= MAX_ACCURACY_GAP_POINTS and round(comparison["agreement"], 9) >= MIN_AGREEMENT
    return {**comparison, "accuracy_gap_points": gap, "default_ok": bool(default_ok),
            "rule": f"accuracy gap <= {MAX_ACCURACY_GAP_POINTS} points and agreement >= {MIN_AGREEMENT:.0%}"}


def describe_verdict(name: str, verdict: dict[str, Any]) -> str:
    """One line: what was measured and whether the backend is used by default."""
    measured = (f"accuracy {100 * verdict['accuracy']:.2f} % vs {100 * verdict['reference_accuracy']:.2f} % in "
                f"float32 ({-verdict['accuracy_gap_points']:+.2f} points), same class on "
                f"{100 * verdict['agreement']:.1f} % of {verdict['n']} slices")
    if verdict["default_ok"]:
        return f"{name}: {measured}: used by default (--backend auto)"
    return f"note: {name} stays opt-in: {measured} (default needs {verdict['rule']})"


def write_verdict(export_path: str | os.PathLike, backend: str, verdict: dict[str, Any]) -> Path:
    """Store ``verdict`` (with latency_ms and source_fingerprint filled in by the caller) beside the export;
    ``backend`` is "onnxruntime" or "openvino" followed by a precision, e.g. "openvino-int8"."""
    path = Path(f"{export_path}.{backend}{VERDICT_SUFFIX}")
    text = json.dumps({**verdict, "backend": backend, "export": Path(export_path).name}, indent=2)
    return atomic_write(path, lambda handle: handle.write(text), "w")


def read_verdicts(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every verdict stored in ``folder`` whose export file is still there."""
    verdicts = []
    for path in sorted(Path(folder).glob(f"*{VERDICT_SUFFIX}")):
        try:
            verdict = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(verdict, dict) and (path.parent / str(verdict.get("export", ""))).is_file():
            verdicts.append({**verdict, "export_path": str(path.parent / verdict["export"])})
    return verdicts


def resolve_auto_backend(checkpoint: Path) -> tuple[Path, str] | None:
    """(export, backend) of the fastest verified export made from this checkpoint file, or None (stay on PyTorch).

    Verdicts of other checkpoints (another fingerprint) are ignored; failed ones print their gap in one line.
    """
    verdicts = read_verdicts(checkpoint.parent)
    if not verdicts:  # the usual case: no hashing of a large checkpoint just to find nothing
        return None
    fingerprint = file_fingerprint(checkpoint)
    mine = [v for v in verdicts if v.get("source_fingerprint") == fingerprint]
    passed = [v for v in mine if v.get("default_ok")]
    if not passed:
        for verdict in mine:
            print(describe_verdict(verdict.get("backend", verdict["export"]), verdict), file=sys.stderr)
        return None
    best = min(passed, key=lambda v: v.get("latency_ms", float("inf")))
    return Path(best["export_path"]), "openvino" if best.get("backend", "").startswith("openvino") else "onnx"


class OpenVinoSession:
    """An OpenVINO compiled model behind the part of onnxruntime's InferenceSession that Classifier uses."""

    class _Input:
        def __init__(self, name: str):
            self.name = name

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        try:
            import openvino
        except ImportError as err:
            raise UserError("the OpenVINO backend needs the openvino package: pip install 'braintumor[openvino]'") \
                from err
        core = openvino.Core()
        model = core.read_model(str(onnx_path))
        config = {"INFERENCE_NUM_THREADS": int(threads or available_cores()), "PERFORMANCE_HINT": "LATENCY"}
        self._compiled = core.compile_model(model, "CPU", config)
        self._name = model.inputs[0].get_any_name()

    def get_inputs(self) -> list["OpenVinoSession._Input"]:
        return [self._Input(self._name)]

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # A fresh infer request per call: several server threads may predict at once.
        result = self._compiled.create_infer_request().infer({self._name: feed[self._name]})
        return [np.asarray(result[self._compiled.outputs[0]])]


def load_openvino(path: str | os.PathLike, threads: int | None = None) -> tuple[OpenVinoSession, dict[str, Any]]:
    """An OpenVINO session for a braintumor ONNX export and its metadata (as backends.load_onnx_session)."""
    onnx = require("onnx", "onnx", "the OpenVINO backend")

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    proto = onnx.load(str(path), load_external_data=False)
    meta = decode_onnx_metadata({entry.key: entry.value for entry in proto.metadata_props}, path)
    return OpenVinoSession(path, threads), meta
