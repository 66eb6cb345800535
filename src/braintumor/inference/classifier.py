"""The Classifier API: one model file, one preprocessing, used by the CLI, evaluate, explain and serve.

A Classifier runs a :class:`~braintumor.models.checkpoint.ModelSpec`'s preprocessing and a backend
(:mod:`braintumor.inference.runtimes`: PyTorch, TorchScript or ONNX Runtime, chosen from the file's content). It owns reading
the inputs and the lock that lets Grad-CAM (which hooks the shared network) run alone while plain forward passes
run side by side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from braintumor.inference.runtimes import OnnxBackend, TorchBackend, open_model_file
from braintumor.models.checkpoint import ModelSpec, resolve_checkpoint
from braintumor.inference.accelerated import load_openvino, resolve_auto_backend
from braintumor.data.io import read_image
from braintumor.data.transforms import eval_transform
from braintumor.utils.devices import resolve_device
from braintumor.errors import UserError
from braintumor.visualize.explain import Explanation, grad_cam
from braintumor.utils.fingerprint import file_fingerprint
from braintumor.models.formats import ONNX, model_format
from braintumor.data.inputs import ImageInput, describe_source, expand_inputs
from braintumor.utils.locking import ReadWriteLock
from braintumor.models.network import build_model, gradcam_layer

# What --backend picks among: the file's own runtime ("torch": as before the CPU exports existed), a verified
# CPU export beside a checkpoint ("auto"), or a runtime for an ONNX file ("onnx", "openvino").
BACKENDS = ("torch", "onnx", "openvino", "auto")
__all__ = ["BACKENDS", "Classifier", "ImageInput", "Prediction", "check_min_confidence", "describe_source",
           "expand_inputs"]


@dataclass
class Prediction:
    """The predicted class of one image, every class's probability, and whether to trust it.

    ``label`` is always the most probable class. ``out_of_distribution`` is True when the slice does not look like
    the training data (``ood_score`` > 1; both None when the model has no fitted detector); ``abstained`` is True
    when the confidence is below the ``min_confidence`` asked for. ``status`` sums this up for display.
    """

    source: str
    label: str
    index: int
    probabilities: dict[str, float]
    ood_score: float | None = None
    out_of_distribution: bool | None = None
    abstained: bool = False

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]

    @property
    def status(self) -> str:
        """"out_of_distribution", "low_confidence" or "ok"."""
        if self.out_of_distribution:
            return "out_of_distribution"
        return "low_confidence" if self.abstained else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.label, "confidence": self.confidence,
                "probabilities": self.probabilities, "status": self.status,
                "out_of_distribution": self.out_of_distribution, "ood_score": self.ood_score,
                "abstained": self.abstained}


class Classifier:
    """A model with its own preprocessing on a backend; thread-safe for concurrent ``predict`` calls."""

    def __init__(self, backend, spec: ModelSpec, *, fingerprint: str = "", source_path: str = "",
                 tta: bool | None = None, min_confidence: float = 0.0):
        self.runtime = backend  # TorchBackend, TorchScriptBackend or OnnxBackend
        self.backend = backend.name
        self.spec = spec
        self.fingerprint = fingerprint
        self.source_path = source_path
        self.tta = spec.tta if tta is None else bool(tta)  # the mean of the slice's and its mirror's probabilities
        self.temperature = spec.temperature
        self.has_ood = backend.has_ood
        self.min_confidence = check_min_confidence(min_confidence)
        self._transform = eval_transform(spec.image_size, list(spec.mean), list(spec.std))
        # Grad-CAM hooks the shared model and changes its grad state: it holds this lock for writing, while
        # plain forward passes (any number at once) hold it for reading.
        self.lock = ReadWriteLock()

    @classmethod
    def from_model(cls, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device = "cpu",
                   **options: Any) -> "Classifier":
        """A Classifier over a PyTorch network in memory (with the spec's OOD detector, when fitted)."""
        return cls(TorchBackend(model, device, spec.ood_state), spec, **options)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", backend: str = "torch",
                        tta: bool | None = None, model_factory: Callable[..., torch.nn.Module] = build_model
                        ) -> "Classifier":
        """Load a checkpoint, a TorchScript or ONNX export (told apart by content), a run folder, or "reference"
        (the model shipped with braintumor). ``tta`` overrides the model's stored TTA setting.

        ``backend``: "torch" runs the file on its own runtime; "auto" also looks beside a checkpoint for the fastest
        CPU export that passed its accuracy check (see ``braintumor.inference.accelerated``); "onnx" and "openvino" need an
        ONNX export and run it on ONNX Runtime or OpenVINO. ``model_factory`` rebuilds a checkpoint's network (a
        run trained with ``train(..., model_factory=...)`` is read back with the same factory).
        """
        path, runtime = resolve_checkpoint(path), backend
        if runtime not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {runtime!r}")
        device = resolve_device(device)
        if runtime == "auto" and device.type == "cpu" and model_format(path) != ONNX:
            path, runtime = resolve_auto_backend(path) or (path, "torch")
        if runtime in ("onnx", "openvino") and model_format(path) != ONNX:
            raise UserError(f"--backend {runtime} runs ONNX exports, and {path} is not one; export it with "
                            f"`braintumor export {path} --format onnx`, or use --backend torch")
        if runtime == "openvino":
            session, meta = load_openvino(path)
            opened = OnnxBackend(session, name="openvino"), ModelSpec.from_dict(meta)
        else:
            opened = open_model_file(path, device, model_factory=model_factory)
        return cls(*opened, fingerprint=file_fingerprint(path), source_path=str(path), tta=tta)

    @property
    def model(self) -> torch.nn.Module | None:
        """The PyTorch network (None for exports: they have no Grad-CAM and no feature access)."""
        return self.runtime.model

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def detector(self):
        """The fitted OOD detector in PyTorch (None without one, or on an export)."""
        return getattr(self.runtime, "detector", None)

    @property
    def trust(self) -> dict[str, Any]:
        """What ``braintumor calibrate`` fitted (temperature, OOD statistics, fit summary); empty when nothing."""
        return self.spec.trust or {}

    classes = property(lambda self: list(self.spec.classes), doc="The class names, in output order.")
    image_size = property(lambda self: self.spec.image_size, doc="The network's input size in pixels.")
    mean = property(lambda self: list(self.spec.mean), doc="Normalisation mean per channel.")
    std = property(lambda self: list(self.spec.std), doc="Normalisation standard deviation per channel.")
    arch = property(lambda self: self.spec.arch, doc="The network's architecture name.")

    def describe(self) -> dict[str, Any]:
        """What the model is, for reports and the web page."""
        return {"classes": self.classes, "arch": self.arch, "image_size": self.image_size,
                "mean": self.mean, "std": self.std, "backend": self.backend, "fingerprint": self.fingerprint,
                "tta": self.tta, "temperature": self.temperature, "ood_detector": self.has_ood,
                "min_confidence": self.min_confidence}

    def set_image_size(self, size: int) -> None:
        """Run the network at another input size (ResNets pool globally; for measuring, e.g. larger than trained)."""
        if self.runtime.fixed_size and size != self.image_size:
            raise UserError("an ONNX export runs at its exported size; use the .pt checkpoint to change it")
        self.spec = self.spec.replace(image_size=int(size))
        self._transform = eval_transform(self.image_size, self.mean, self.std)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image → normalized (3, S, S) float tensor, exactly as in evaluation."""
        return self._transform(image.convert("RGB"))

    def load(self, item: ImageInput) -> Image.Image:
        """Any supported input (path, bytes, PIL image) as an RGB image."""
        return read_image(item)

    def infer(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits (B, C) and OOD scores (B,) (None without a detector) for a preprocessed batch (B, 3, S, S)."""
        with self.lock.read():
            return self.runtime.run(batch)

    def calibrated(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Softmax of logits divided by the fitted temperature (or ``temperature``), (B, C)."""
        temperature = self.temperature if temperature is None else temperature
        return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)) / temperature, dim=1).numpy()

    def infer_views(self, batch: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Logits of each test-time view (the batch, and its mirror when ``tta``) and the batch's OOD scores."""
        if not self.tta:
            logits, scores = self.infer(batch)
            return [logits], scores
        # One pass over the batch and its mirror (as model.forward_probabilities): far cheaper on a CPU than two.
        logits, scores = self.infer(torch.cat([batch, batch.flip(-1)]))
        n = len(batch)
        return [logits[:n], logits[n:]], None if scores is None else scores[:n]

    def probabilities(self, views: list[np.ndarray], temperature: float | None = None) -> np.ndarray:
        """Mean over the views of the calibrated softmax (as ``model.forward_probabilities`` does for TTA)."""
        return np.mean([self.calibrated(view, temperature) for view in views], axis=0)

    def predict_proba(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated softmax probabilities (B, C) for a preprocessed batch (B, 3, S, S), mirrored too with TTA."""
        return self.probabilities(self.infer_views(batch)[0])

    def predict(self, x: ImageInput | list[ImageInput], batch_size: int = 32) -> Prediction | list[Prediction]:
        """Predict one input (returns a Prediction) or a list of inputs (returns a list, same order)."""
        single = not isinstance(x, (list, tuple))
        items = [x] if single else list(x)
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = torch.stack([self.preprocess(self.load(item)) for item in chunk])
            results.extend(self.predict_batch(batch, [describe_source(item) for item in chunk]))
        return results[0] if single else results

    def predict_batch(self, batch: torch.Tensor, sources: list[str]) -> list[Prediction]:
        """Predictions for a preprocessed batch (B, 3, S, S), one per source name."""
        views, scores = self.infer_views(batch)
        return [self.prediction(source, row, None if scores is None else scores[k])
                for k, (source, row) in enumerate(zip(sources, self.probabilities(views)))]

    def prediction(self, source: str, row: np.ndarray, ood_score: float | None = None) -> Prediction:
        """The Prediction for one row of probabilities (C,) and its OOD score."""
        index = int(np.argmax(row))
        return Prediction(source=source, label=self.classes[index], index=index,
                          probabilities={name: float(p) for name, p in zip(self.classes, row)},
                          ood_score=None if ood_score is None else float(ood_score),
                          out_of_distribution=None if ood_score is None else bool(ood_score > 1.0),
                          abstained=bool(row[index] < self.min_confidence))

    def explain(self, x: ImageInput | list[ImageInput], target: str | None = None,
                batch_size: int = 16) -> Explanation | list[Explanation]:
        """Grad-CAM for one input (an Explanation) or a list (a list, same order); ``target`` is a class name, or
        None to explain each image's predicted class. Needs the PyTorch backend."""
        if self.model is None:
            raise UserError("Grad-CAM needs gradients: load the PyTorch checkpoint (.pt), not an ONNX or "
                            "TorchScript export")
        if target is not None and target not in self.classes:
            raise UserError(f"unknown class {target!r} for --class; this model's classes are: "
                            f"{', '.join(self.classes)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = not isinstance(x, (list, tuple))
        items = [x] if single else list(x)
        results: list[Explanation] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = [self.load(item).convert("RGB") for item in chunk]
            batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
            targets = None if target is None else [self.classes.index(target)] * len(chunk)
            with self.lock.write():
                probabilities, heatmaps = grad_cam(self.model, gradcam_layer(self.model), batch, targets)
            size = (self.image_size, self.image_size)
            results.extend(Explanation.of(describe_source(item), self.classes, row, heatmap,
                                          image.resize(size, Image.BILINEAR), None if target is None else targets[0])
                           for item, image, row, heatmap in zip(chunk, images, probabilities, heatmaps))
        return results[0] if single else results


def check_min_confidence(value: float) -> float:
    """--min-confidence must be a probability."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--min-confidence must be between 0 and 1, got {value}")
    return value
