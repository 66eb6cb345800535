"""The Classifier API: one trained model, one preprocessing, used by the CLI, export, explain and serve."""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from .data.io import IMAGE_EXTENSIONS, read_image
from .data.transforms import eval_transform
from .errors import UserError

ImageInput = Union[str, os.PathLike, bytes, Image.Image]
BACKENDS = ("torch", "onnx", "openvino", "auto")


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


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 12 hex digits of the file's SHA-256: tells two checkpoints apart at a glance."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted, hidden entries skipped) to their images."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not images:
                raise UserError(f"no images found in folder {path}")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"file or folder not found: {path}")
    return found


class ReadWriteLock:
    """Many readers (plain forward passes) or one writer (Grad-CAM); waiting writers go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Classifier:
    """A trained classifier with its own preprocessing; thread-safe for concurrent ``predict`` calls."""

    def __init__(self, model: torch.nn.Module | None, *, classes: list[str], image_size: int,
                 mean: list[float], std: list[float], arch: str, device: str | torch.device = "cpu",
                 fingerprint: str = "", onnx_session: Any = None, source_path: str = "", tta: bool = False,
                 trust: dict[str, Any] | None = None, min_confidence: float = 0.0):
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.arch = arch
        self.device = torch.device(device)
        self.fingerprint = fingerprint
        self.source_path = source_path
        self.backend = "onnx" if onnx_session is not None else "torch"
        self.tta = bool(tta)  # test-time augmentation: mean of the slice's and its mirror's probabilities
        self.model = model.to(self.device).eval() if model is not None else None
        self._onnx = onnx_session
        self._transform = eval_transform(self.image_size, self.mean, self.std)
        # Temperature scaling and the OOD detector (braintumor.trust), when fitted; absent: T = 1, no OOD check.
        self.trust = trust or {}
        self.temperature = float(self.trust.get("temperature", 1.0))
        self.detector = None
        self._scoring_net = None
        if self.trust.get("ood") is not None and self.model is not None:
            from .ood import MahalanobisDetector, ScoringNet

            self.detector = MahalanobisDetector.from_state(self.trust["ood"]).to(self.device)
            self._scoring_net = ScoringNet(self.model, self.detector).eval()
        # An exported detector is the ONNX graph's second output; other runtimes' sessions may not list outputs.
        outputs = getattr(onnx_session, "get_outputs", lambda: [])()
        self.has_ood = self.detector is not None or len(outputs) > 1
        self.min_confidence = check_min_confidence(min_confidence)
        # Grad-CAM hooks the shared model and changes its grad state: it holds this lock for writing, while
        # plain forward passes (any number at once) hold it for reading.
        self.lock = ReadWriteLock()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", backend: str = "torch",
                        tta: bool | None = None) -> "Classifier":
        """Load a ``.pt`` checkpoint (torch backend), an exported ``.onnx`` file (onnx or openvino backend), a run
        folder, or "reference" (the model shipped with braintumor). ``tta`` overrides the model's stored TTA setting.

        ``auto``: an ``.onnx`` file runs on onnxruntime; a checkpoint runs on the fastest CPU export beside it that
        passed its accuracy check (see ``braintumor.cpu_backends``), else on PyTorch.
        """
        if backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        path = resolve_checkpoint(path)
        device = resolve_device(device)
        if backend == "auto":
            backend = "onnx" if path.suffix.lower() == ".onnx" else "torch"
            if backend == "torch" and device.type == "cpu" and path.is_file():
                from .cpu_backends import resolve_auto_backend

                found = resolve_auto_backend(path)
                if found is not None:
                    path, backend = found
        if backend == "openvino":
            from .cpu_backends import load_openvino

            session, meta = load_openvino(path)
            classifier = cls(None, classes=meta["classes"], image_size=meta["image_size"], mean=meta["mean"],
                             std=meta["std"], arch=meta["arch"], fingerprint=file_fingerprint(path),
                             onnx_session=session, source_path=str(path),
                             tta=meta.get("tta", False) if tta is None else tta)
            classifier.backend = "openvino"
            return classifier
        if backend == "onnx" or path.suffix.lower() == ".onnx":
            from .export import load_onnx_session

            session, meta = load_onnx_session(path)
            return cls(None, classes=meta["classes"], image_size=meta["image_size"], mean=meta["mean"],
                       std=meta["std"], arch=meta["arch"], fingerprint=file_fingerprint(path),
                       onnx_session=session, source_path=str(path),
                       tta=meta.get("tta", False) if tta is None else tta, trust=meta.get("trust"))
        ckpt = load_checkpoint(path)
        return cls(model_from_checkpoint(ckpt, path), classes=ckpt["classes"], image_size=ckpt["image_size"],
                   mean=ckpt["mean"], std=ckpt["std"], arch=ckpt["arch"], device=device,
                   fingerprint=file_fingerprint(path), source_path=str(path),
                   tta=bool(ckpt.get("tta", False)) if tta is None else tta, trust=ckpt.get("trust"))

    def describe(self) -> dict[str, Any]:
        """What the model is, for reports and the web page."""
        return {"classes": self.classes, "arch": self.arch, "image_size": self.image_size,
                "mean": self.mean, "std": self.std, "backend": self.backend, "fingerprint": self.fingerprint,
                "tta": self.tta, "temperature": self.temperature, "ood_detector": self.has_ood,
                "min_confidence": self.min_confidence}

    def set_image_size(self, size: int) -> None:
        """Run the network at another input size (ResNets pool globally; for measuring, e.g. larger than trained)."""
        if self._onnx is not None and size != self.image_size:
            raise UserError("an ONNX export runs at its exported size; use the .pt checkpoint to change it")
        self.image_size = int(size)
        self._transform = eval_transform(self.image_size, self.mean, self.std)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image → normalized (3, S, S) float tensor, exactly as in evaluation."""
        return self._transform(image.convert("RGB"))

    def load(self, item: ImageInput) -> Image.Image:
        """Any supported input (path, bytes, PIL image) as an RGB image."""
        return read_image(item)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits (B, C) and OOD scores (B,) (None without a detector) for a preprocessed batch (B, 3, S, S)."""
        if self._onnx is not None:
            outputs = self._onnx.run(None, {self._onnx.get_inputs()[0].name: batch.numpy().astype(np.float32)})
            return outputs[0], (outputs[1] if len(outputs) > 1 else None)
        with self.lock.read():
            if self._scoring_net is not None:
                logits, scores = self._scoring_net(batch.to(self.device))
                return logits.float().cpu().numpy(), scores.float().cpu().numpy()
            return self.model(batch.to(self.device)).float().cpu().numpy(), None

    def calibrated(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Softmax of logits divided by the fitted temperature (or ``temperature``), (B, C)."""
        temperature = self.temperature if temperature is None else temperature
        return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)) / temperature, dim=1).numpy()

    @torch.inference_mode()
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
        return [self._prediction(source, row, None if scores is None else scores[k])
                for k, (source, row) in enumerate(zip(sources, self.probabilities(views)))]

    def _prediction(self, source: str, row: np.ndarray, ood_score: float | None = None) -> Prediction:
        index = int(np.argmax(row))
        return Prediction(source=source, label=self.classes[index], index=index,
                          probabilities={name: float(p) for name, p in zip(self.classes, row)},
                          ood_score=None if ood_score is None else float(ood_score),
                          out_of_distribution=None if ood_score is None else bool(ood_score > 1.0),
                          abstained=bool(row[index] < self.min_confidence))

    def explain(self, x: ImageInput | list[ImageInput], target: str | None = None):
        """Grad-CAM heat maps for one input or a list (see ``braintumor.explain``)."""
        from .explain import explain

        return explain(self, x, target=target)


def check_min_confidence(value: float) -> float:
    """--min-confidence must be a probability."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--min-confidence must be between 0 and 1, got {value}")
    return value


def describe_source(item: ImageInput) -> str:
    """A short printable name for an input."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, bytes):
        return f"<{len(item)} bytes>"
    return "<image>"


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when available else CPU; asking for CUDA without one is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda") from err
