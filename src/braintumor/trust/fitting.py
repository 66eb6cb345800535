"""Fit what makes a model's predictions trustworthy, after training: the OOD detector and the temperature.

``fit_trust`` takes a trained checkpoint (or Classifier) and the training and validation images; it returns the
statistics ``store_trust`` writes into the checkpoint under ``"trust"``. Training calls both at the end; for a
checkpoint trained earlier, ``fit_trust_for_checkpoint`` (``braintumor calibrate``) rebuilds the run's own split
from the configuration stored in the checkpoint and does the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from braintumor.trust.temperature import fit_temperature, softmax
from braintumor.models.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from braintumor.data.pipeline import ImageFolderDataset
from braintumor.errors import UserError
from braintumor.evaluation.metrics import expected_calibration_error
from braintumor.trust.ood import DEFAULT_ACCEPT_RATE, acceptance_threshold, fit_mahalanobis, pooled_features


@torch.inference_mode()
def logits_and_features(classifier, paths, batch_size: int = 64, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits (N, C) and pooled features (N, D) of image files, evaluation preprocessing, torch backend."""
    if classifier.model is None:
        raise UserError("fitting the OOD detector needs the PyTorch checkpoint (.pt), not an ONNX export")
    loader = DataLoader(ImageFolderDataset(paths, [0] * len(paths), classifier.preprocess), batch_size=batch_size,
                        num_workers=workers, shuffle=False)
    logits, features = [], []
    model = classifier.model
    with classifier.lock.read():
        for images, _ in loader:
            pooled = pooled_features(model, images.to(classifier.device))
            features.append(pooled.float().cpu().numpy())
            logits.append(model.fc(pooled).float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(features)


def fit_trust(checkpoint_or_classifier, train_paths, train_labels, val_paths, val_labels, *,
              accept_rate: float = DEFAULT_ACCEPT_RATE, batch_size: int = 64, workers: int = 0,
              device: str = "cpu") -> dict[str, Any]:
    """Fit the Mahalanobis OOD detector (training features; threshold on validation) and the temperature
    (validation logits); returns the ``"trust"`` entry of a checkpoint.
    """
    from braintumor.inference.classifier import Classifier

    classifier = checkpoint_or_classifier
    if not isinstance(classifier, Classifier):
        classifier = Classifier.from_checkpoint(checkpoint_or_classifier, device=device)
    if not 0.0 < accept_rate < 1.0:
        raise UserError(f"the OOD acceptance rate must be between 0 and 1 (exclusive), got {accept_rate}")
    if len(train_paths) == 0 or len(val_paths) == 0:
        raise UserError("fitting the OOD detector and temperature needs training and validation images")
    _, train_features = logits_and_features(classifier, train_paths, batch_size, workers)
    val_logits, val_features = logits_and_features(classifier, val_paths, batch_size, workers)
    detector = fit_mahalanobis(train_features, np.asarray(train_labels))
    val_distance = detector.distance(torch.from_numpy(val_features)).numpy()
    threshold = acceptance_threshold(val_distance, accept_rate)
    detector.threshold.fill_(threshold)
    temperature = fit_temperature(val_logits, val_labels)
    val_labels = np.asarray(val_labels)
    return {
        "ood": detector.state(),
        "temperature": temperature,
        "accept_rate": float(accept_rate),
        "val_accepted": float(np.mean(val_distance <= threshold)),
        "val_ece_before": expected_calibration_error(softmax(val_logits), val_labels),
        "val_ece_after": expected_calibration_error(softmax(val_logits, temperature), val_labels),
        "n_train": len(train_paths), "n_val": len(val_paths),
    }


def store_trust(checkpoint_path: str | os.PathLike, trust: dict[str, Any]) -> Path:
    """Write ``trust`` into a checkpoint file (atomically; the file's other contents are kept as they are)."""
    path = Path(checkpoint_path)
    ckpt = load_checkpoint(path)
    ckpt["trust"] = trust
    ckpt.pop("format_version", None)
    return save_checkpoint(ckpt, path)


def describe_trust(trust: dict[str, Any]) -> str:
    """One line for the terminal: temperature, ECE before/after, validation acceptance."""
    return (f"temperature {trust['temperature']:.3f} (validation ECE {trust['val_ece_before']:.4f} -> "
            f"{trust['val_ece_after']:.4f}); OOD threshold accepts {trust['val_accepted']:.1%} of "
            f"{trust['n_val']} validation slices")


def fit_trust_for_checkpoint(checkpoint: str | os.PathLike, *, data: str | None = None, val: str | None = None,
                             accept_rate: float = DEFAULT_ACCEPT_RATE, device: str = "cpu", batch_size: int = 64,
                             workers: int = 0, write: bool = True) -> dict[str, Any]:
    """Fit onto a finished checkpoint, using the training/validation split of its own run (from its stored
    configuration; ``data``/``val`` override the folders when they have moved); writes it in unless ``write`` is
    False. Returns the trust entry.
    """
    from braintumor.training.config import from_saved
    from braintumor.data.index import prepare_split

    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    values = dict(ckpt.get("config") or {})
    if data:
        values["data"] = str(data)
    if val:
        values["val"] = str(val)
    if not values.get("data"):
        raise UserError(f"{path} does not name its training data; pass --data TRAIN_DIR")
    cfg = from_saved(values, str(path), progress=False, skip_bad=True).validate()
    split = prepare_split(cfg, progress=False)
    if split.classes != list(ckpt["classes"]):
        raise UserError(f"the data's classes {split.classes} differ from the checkpoint's {ckpt['classes']}")
    trust = fit_trust(path, split.train_paths, split.train_labels, split.val_paths, split.val_labels,
                      accept_rate=accept_rate, device=device, batch_size=batch_size, workers=workers)
    if write:
        store_trust(path, trust)
    return trust
