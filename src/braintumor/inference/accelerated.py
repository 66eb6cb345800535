"""Accelerated CPU backends (ONNX Runtime int8, OpenVINO) and the accuracy check that decides whether one is used.

An accelerated export is only as good as its agreement with the float32 network. :func:`compare_predictions`
measures it on labelled slices, :func:`judge` applies the rule (accuracy within :data:`MAX_ACCURACY_GAP_POINTS`
of float32 and the same class on at least :data:`MIN_AGREEMENT` of the slices), and :func:`write_verdict` stores the
result beside the export as ``<export>.<backend>.verdict.json``, tied to the checkpoint it was made from.
``Classifier.from_checkpoint(..., backend="auto")`` then loads the fastest export whose verdict passed and that
was measured faster than PyTorch, and otherwise stays on PyTorch and prints the measured gap in one line
(:func:`resolve_auto_backend`). The product writes verdicts itself: ``braintumor export --format onnx`` measures
each ONNX file it writes against the checkpoint (:func:`measure_export`: same classes and statuses, latency) on
the int8 calibration slices or generated phantoms; ``benchmarks/cpu_inference.py`` measures on labelled real
slices and writes the same files.

OpenVINO (``pip install braintumor[openvino]``) runs the same ONNX files, the int8 QDQ one included; its
compiled model is wrapped in the small part of onnxruntime's session interface that ``Classifier`` uses.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.utils.jsonfiles import write_json
from braintumor.inference.runtimes import read_onnx
from braintumor.utils.devices import available_cores
from braintumor.errors import UserError
from braintumor.utils.fingerprint import file_fingerprint
from braintumor.models.checkpoint import REFERENCE_MODEL
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
    """The comparison plus the accuracy gap in points and whether the backend may be the default (when the
    comparison has a ``status_agreement``, the statuses must agree as often as the classes)."""
    gap = 100.0 * (comparison["reference_accuracy"] - comparison["accuracy"])
    # Rounded: 100 * (0.950 - 0.947) is 0.30000000000000027 in floating point, and exactly 0.3 points is allowed.
    default_ok = round(gap, 9) <= MAX_ACCURACY_GAP_POINTS and round(comparison["agreement"], 9) >= MIN_AGREEMENT
    rule = f"accuracy gap <= {MAX_ACCURACY_GAP_POINTS} points and agreement >= {MIN_AGREEMENT:.0%}"
    if "status_agreement" in comparison:
        default_ok = default_ok and round(comparison["status_agreement"], 9) >= MIN_AGREEMENT
        rule = f"accuracy gap <= {MAX_ACCURACY_GAP_POINTS} points, class and status agreement >= {MIN_AGREEMENT:.0%}"
    return {**comparison, "accuracy_gap_points": gap, "default_ok": bool(default_ok), "rule": rule}


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
    return write_json(path, {**verdict, "backend": backend, "export": Path(export_path).name})


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

    Verdicts of other checkpoints (another fingerprint) are ignored; failed ones print their gap in one line; an
    export measured slower than PyTorch on the same machine (``reference_latency_ms``) is not used. The shipped
    reference model's exports live in the current folder (``braintumor export reference`` never writes into the
    installation), so they are looked for there too.
    """
    verdicts = read_verdicts(checkpoint.parent)
    if Path(checkpoint).resolve() == REFERENCE_MODEL.resolve() and Path.cwd().resolve() != checkpoint.parent.resolve():
        verdicts += read_verdicts(Path.cwd())
    if not verdicts:  # the usual case: no hashing of a large checkpoint just to find nothing
        return None
    fingerprint = file_fingerprint(checkpoint)
    mine = [v for v in verdicts if v.get("source_fingerprint") == fingerprint]
    passed = [v for v in mine if v.get("default_ok") and _faster_than_pytorch(v)]
    if mine and not passed and all(v.get("default_ok") for v in mine):
        return None  # all agree but none is faster than PyTorch here: nothing to say
    if not passed:
        for verdict in mine:
            print(describe_verdict(verdict.get("backend", verdict["export"]), verdict), file=sys.stderr)
        return None
    best = min(passed, key=lambda v: v.get("latency_ms", float("inf")))
    return Path(best["export_path"]), "openvino" if best.get("backend", "").startswith("openvino") else "onnx"


def _faster_than_pytorch(verdict: dict[str, Any]) -> bool:
    latency, reference = verdict.get("latency_ms"), verdict.get("reference_latency_ms")
    return not (isinstance(latency, (int, float)) and isinstance(reference, (int, float))) or latency < reference


def measure_export(checkpoint: str | os.PathLike, export_path: str | os.PathLike, backend: str,
                   images: Sequence | None = None, *, threads: int | None = None, max_images: int = 32,
                   latency_runs: int = 5) -> dict[str, Any]:
    """Measure an ONNX export against its checkpoint and write the verdict beside it; returns the verdict.

    Both run on the same slices (``images``: paths, bytes or PIL images, e.g. the int8 calibration slices; default:
    ``max_images`` generated phantoms at the model's size): the export must give PyTorch's class and status
    (labels are PyTorch's classes: this checks agreement, not accuracy, which needs labelled data —
    ``benchmarks/cpu_inference.py``). Latency is the median of ``latency_runs`` single-slice network calls on
    each runtime, with ``threads`` intra-op threads. ``backend`` names the verdict, e.g. "onnxruntime-fp32".
    """
    import torch

    from braintumor.data.io import read_image
    from braintumor.data.transforms import eval_transform
    from braintumor.inference.runtimes import open_model
    from braintumor.trust.status import status_of
    from braintumor.trust.temperature import softmax

    threads = int(threads or available_cores())
    reference = open_model(checkpoint, "cpu", "torch")
    candidate = open_model(export_path, "cpu", "openvino" if backend.startswith("openvino") else "onnx", threads)
    spec = reference.spec
    if images is None:
        from PIL import Image

        from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom

        images = [Image.fromarray(make_phantom(PHANTOM_CLASSES[k % len(PHANTOM_CLASSES)], spec.image_size, rng=k))
                  for k in range(max_images)]
        data = f"{len(images)} generated phantom slices (labels: PyTorch's classes)"
    else:
        images = list(images)[:max_images]
        data = f"{len(images)} slices (labels: PyTorch's classes)"
    if not images:
        raise UserError("measuring an export needs at least one image")
    transform = eval_transform(spec.image_size, spec.mean, spec.std)
    batch = torch.stack([transform(read_image(item).convert("RGB")) for item in images])

    def outcomes(runtime) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        logits, scores = runtime.run(batch)
        probabilities = softmax(logits, spec.temperature)
        nothing = [None] * len(batch)
        not_mri = scores[:, 0] if scores is not None and "not_mri" in runtime.tiers else nothing
        atypical = scores[:, 1] if scores is not None and "atypical" in runtime.tiers else nothing
        statuses = [status_of(float(row.max()), None if n is None else float(n), None if a is None else float(a))
                    for row, n, a in zip(probabilities, not_mri, atypical)]
        return probabilities.argmax(axis=1), statuses, scores

    def median_ms(runtime) -> float:
        single = batch[:1]
        runtime.run(single)  # warm-up
        times = []
        for _ in range(max(1, latency_runs)):
            start = time.perf_counter()
            runtime.run(single)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same number of threads for both, restored after
    try:
        ref_classes, ref_statuses, ref_scores = outcomes(reference.runtime)
        classes, statuses, scores = outcomes(candidate.runtime)
        reference_ms, latency_ms = median_ms(reference.runtime), median_ms(candidate.runtime)
    finally:
        torch.set_num_threads(previous_threads)
    comparison = compare_predictions(ref_classes, classes, ref_classes)
    comparison["status_agreement"] = float(np.mean([a == b for a, b in zip(ref_statuses, statuses)]))
    if ref_scores is not None and scores is not None and ref_scores.shape == scores.shape:
        finite = np.isfinite(ref_scores) & np.isfinite(scores)
        comparison["max_trust_score_delta"] = float(np.abs(ref_scores - scores)[finite].max(initial=0.0))
    verdict = {**judge(comparison), "latency_ms": latency_ms, "reference_latency_ms": reference_ms,
               "source_fingerprint": file_fingerprint(reference.path), "threads": threads, "data": data}
    path = write_verdict(export_path, backend, verdict)
    return {**verdict, "backend": backend, "verdict_file": str(path)}


def describe_measurement(name: str, verdict: dict[str, Any]) -> str:
    """One line: agreement with PyTorch, latency against PyTorch, and whether --backend auto will use it."""
    speed = f"{verdict['latency_ms']:.1f} ms per slice vs {verdict['reference_latency_ms']:.1f} ms in PyTorch"
    agreement = (f"same class on {100 * verdict['agreement']:.1f} % and same status on "
                 f"{100 * verdict.get('status_agreement', verdict['agreement']):.1f} % of {verdict['n']} slices")
    if not verdict["default_ok"]:
        return f"note: {name} stays opt-in: {agreement} (--backend auto needs {verdict['rule']})"
    if not _faster_than_pytorch(verdict):
        return f"{name}: {agreement}; {speed}: --backend auto stays on PyTorch on this machine"
    return f"{name}: {agreement}; {speed}: used by --backend auto"


class OpenVinoSession:
    """An OpenVINO compiled model behind the part of onnxruntime's InferenceSession that Classifier uses."""

    class _Input:
        def __init__(self, name: str):
            self.name = name

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        openvino = require("openvino", "openvino", "the OpenVINO backend")
        core = openvino.Core()
        model = core.read_model(str(onnx_path))
        # f32: on CPUs with bfloat16 units (AMX, AVX512-BF16) OpenVINO otherwise runs float32 models in bfloat16,
        # moving logits by ~1e-3 (int8 layers of a quantized model stay int8).
        config = {"INFERENCE_NUM_THREADS": int(threads or available_cores()), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        self._compiled = core.compile_model(model, "CPU", config)
        self._name = model.inputs[0].get_any_name()

    def get_inputs(self) -> list["OpenVinoSession._Input"]:
        return [self._Input(self._name)]

    def get_outputs(self) -> list["OpenVinoSession._Input"]:
        return [self._Input(output.get_any_name()) for output in self._compiled.outputs]

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # A fresh infer request per call: several server threads may predict at once. Every output: the logits
        # and, when the export has them, the trust scores.
        result = self._compiled.create_infer_request().infer({self._name: feed[self._name]})
        return [np.asarray(result[output]) for output in self._compiled.outputs]


def load_openvino(path: str | os.PathLike, threads: int | None = None) -> tuple[OpenVinoSession, dict[str, Any]]:
    """An OpenVINO session for a braintumor ONNX export and its metadata (as runtimes.load_onnx_session), the
    file validated first (:func:`braintumor.inference.runtimes.read_onnx`)."""
    _, _, meta = read_onnx(path)
    try:
        session = OpenVinoSession(path, threads)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - OpenVINO raises its own error types
        text = str(err).strip()
        raise UserError(f"OpenVINO cannot read {path}: {text.splitlines()[0] if text else type(err).__name__}") \
            from None
    return session, meta
