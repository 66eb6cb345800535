"""The Classifier API: one model file, one preprocessing, used by the CLI, evaluate, explain and serve.

A Classifier is a :class:`~braintumor.models.checkpoint.ModelSpec`'s preprocessing, a runtime
(:mod:`braintumor.inference.runtimes`: PyTorch, TorchScript or ONNX Runtime, chosen from the file's content), its
temperature, trust tiers and TTA setting, and the lock that lets an explanation (which hooks the shared network)
run alone while plain forward passes run side by side. ``predict`` and ``explain`` are the Python API of
:mod:`braintumor.inference.service`, the one path from inputs to results.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from braintumor.inference.runtimes import BACKENDS, TorchBackend, open_model
from braintumor.models.checkpoint import ModelSpec
from braintumor.data.transforms import eval_transform
from braintumor.errors import UserError
from braintumor.visualize.explain import Explanation
from braintumor.utils.fingerprint import file_fingerprint
from braintumor.data.inputs import ImageInput, describe_source, expand_inputs, to_image
from braintumor.utils.locking import ReadWriteLock
from braintumor.models.network import build_model
from braintumor.inference import service
from braintumor.inference.results import Prediction

__all__ = ["BACKENDS", "Classifier", "ImageInput", "Prediction", "check_min_confidence", "describe_source",
           "expand_inputs"]  # Prediction: defined in inference/results.py (the one results schema)


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
        self.trust_tiers = _trust_tiers(backend, spec)
        self.min_confidence = check_min_confidence(min_confidence)
        self._transform = eval_transform(spec.image_size, list(spec.mean), list(spec.std))
        # Grad-CAM hooks the shared model and changes its grad state: it holds this lock for writing, while
        # plain forward passes (any number at once) hold it for reading.
        self.lock = ReadWriteLock()

    @classmethod
    def from_model(cls, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device = "cpu",
                   **options: Any) -> "Classifier":
        """A Classifier over a PyTorch network in memory (with the spec's OOD detector, when fitted)."""
        return cls(TorchBackend(model, device, spec.trust), spec, **options)

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
        # One loader decides the file's format (read once), the runtime and validates the file (runtimes.open_model).
        opened = open_model(path, device, backend, model_factory=model_factory)
        return cls(opened.runtime, opened.spec, fingerprint=file_fingerprint(opened.path),
                   source_path=str(opened.path), tta=tta)

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
                "trust_tiers": list(self.trust_tiers),
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
        """Any supported input (path, bytes, PIL image, numpy array, tensor) as an RGB image."""
        return to_image(item)[0]

    def infer(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits (B, C) and trust scores (B, 2) (None without trust tiers) for a preprocessed batch."""
        with self.lock.read():
            return self.runtime.run(batch)

    def calibrated(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Softmax of logits divided by the fitted temperature (or ``temperature``), (B, C)."""
        return service.calibrate([logits], self.temperature if temperature is None else temperature)

    def infer_views(self, batch: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Logits of each test-time view (the batch, and its mirror when ``tta``) and the batch's trust scores."""
        return service.tta_views(self.infer, batch, self.tta)

    def probabilities(self, views: list[np.ndarray], temperature: float | None = None) -> np.ndarray:
        """Mean over the views of the calibrated softmax."""
        return service.calibrate(views, self.temperature if temperature is None else temperature)

    def predict_proba(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities (B, C) for a preprocessed batch (B, 3, S, S), mirrored too with TTA."""
        return service.run_batch(self, batch).probabilities

    def predict(self, x: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> Prediction | list[Prediction]:
        """Predict one input (returns a Prediction) or a list of inputs (a list, same order). Inputs: paths, bytes,
        PIL images, numpy arrays (H×W or H×W×C, uint8 or float) and torch tensors (also C×H×W); see
        :func:`braintumor.data.inputs.to_image` for how arrays become pixels."""
        single = _is_single(x)
        items = [x] if single else list(x)
        results = list(service.iter_predictions(self, items, batch_size=batch_size))
        return results[0] if single else results

    def predict_batch(self, batch: torch.Tensor, sources: list[str]) -> list[Prediction]:
        """Predictions for a preprocessed batch (B, 3, S, S), one per source name."""
        return service.predict_batch(self, batch, sources)

    def explain(self, x: ImageInput | Sequence[ImageInput], target: str | None = None, batch_size: int = 16,
                method: str | None = None, layer: str | None = None,
                mirror: bool | None = None) -> Explanation | list[Explanation]:
        """Explanation for one input (an Explanation) or a list (a list, same order): the heat map of ``target``
        (a class name; None: each image's predicted class) by ``method`` (None: the default), with the
        calibrated probabilities and ``explanation.prediction`` (status included); ``layer`` for the CAM methods
        (None: the method's default, ``visualize.explain.DEFAULT_LAYERS``); ``mirror`` averages each map with the
        mirrored slice's (None: ``visualize.explain.DEFAULT_MIRROR``, on). Needs the PyTorch backend."""
        single = _is_single(x)
        items = [x] if single else list(x)
        results = service.explain_items(self, items, target=target, method=method, layer=layer, mirror=mirror,
                                        batch_size=batch_size)
        return results[0] if single else results


def _is_single(x: Any) -> bool:
    """One input, not a list of them (an array or tensor is one image; a list or tuple holds several)."""
    return not isinstance(x, (list, tuple))


def _trust_tiers(backend, spec: ModelSpec) -> tuple[str, ...]:
    """Which trust tiers the model's scores carry: the runtime's own answer, else the checkpoint's trust state."""
    tiers = getattr(backend, "tiers", None)
    if tiers is not None:
        return tuple(tiers)
    if not backend.has_ood:
        return ()
    try:
        from braintumor.trust.ood import trust_tiers
    except ImportError:  # before the two-tier trust module
        return ("atypical",)
    try:
        return tuple(trust_tiers(spec.trust or {}))
    except Exception:  # noqa: BLE001 - an export's metadata may not hold the detector's state
        return ("not_mri", "atypical")


def check_min_confidence(value: float) -> float:
    """--min-confidence must be a probability."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--min-confidence must be between 0 and 1, got {value}")
    return value
