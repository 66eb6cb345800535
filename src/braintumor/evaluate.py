"""Evaluate a checkpoint on a folder: run the model, then metrics and reports (full and leak-free subsets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import ImageFolderDataset, discover, report_unsupported
from .loaders import drop_bad_files
from .metrics import compute_metrics
from .predict import Classifier
from .report import write_report


@torch.inference_mode()
def predict_paths(classifier: Classifier, paths: list[Path], batch_size: int = 64,
                  workers: int = 0) -> np.ndarray:
    """Probabilities (N, C) for image files, decoded and preprocessed in DataLoader workers."""
    dataset = ImageFolderDataset(paths, [0] * len(paths), classifier.preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    rows = [classifier.predict_proba(images) for images, _ in loader]
    return np.concatenate(rows) if rows else np.zeros((0, len(classifier.classes)))


def evaluate_paths(checkpoint: str | Path, paths: list[Path], labels: list[int], out_dir: str | Path, *,
                   device: str = "auto", **options) -> dict[str, Any]:
    """Load ``checkpoint`` and evaluate it on labelled files (see :func:`evaluate_classifier`)."""
    return evaluate_classifier(Classifier.from_checkpoint(checkpoint, device=device), paths, labels, out_dir,
                               **options)


def evaluate_classifier(classifier: Classifier, paths: list[Path], labels: list[int], out_dir: str | Path, *,
                        batch_size: int = 64, title: str = "Evaluation report",
                        extra: dict[str, Any] | None = None, leak_free: list[bool] | None = None,
                        workers: int = 0) -> dict[str, Any]:
    """Metrics of a classifier on labelled files, written as a report; ``leak_free`` adds a subset column."""
    probabilities = predict_paths(classifier, paths, batch_size, workers)
    y_true = np.asarray(labels)
    y_pred = probabilities.argmax(axis=1)
    metrics = compute_metrics(y_true, y_pred, probabilities, classifier.classes)
    extra = {"checkpoint": f"{classifier.source_path} (sha256 {classifier.fingerprint})", **(extra or {})}
    subsets = None
    if leak_free is not None:
        mask = np.asarray(leak_free, dtype=bool)
        subsets = {"full set": metrics}
        if mask.any():
            subsets["leak-free subset"] = compute_metrics(y_true[mask], y_pred[mask], probabilities[mask],
                                                          classifier.classes)
    write_report(metrics, out_dir, title=title, extra=extra, subsets=subsets)
    return {"metrics": metrics, "subsets": subsets or {}, "out_dir": str(out_dir)}


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, *,
                        device: str = "auto", batch_size: int = 64, exclude_duplicates_of: str | None = None,
                        skip_bad: bool = False, workers: int = 0, tta: bool | None = None) -> dict[str, Any]:
    """``braintumor evaluate``: every metric on a labelled folder, optionally beside its leak-free subset;
    ``tta`` overrides the model's stored test-time augmentation setting."""
    classifier = Classifier.from_checkpoint(checkpoint, device=device, tta=tta)
    index = discover(data_dir, classes=classifier.classes)
    paths, labels, skipped = drop_bad_files(index.paths, index.labels, str(data_dir), skip_bad, progress=False)
    skipped += report_unsupported(data_dir)
    extra: dict[str, Any] = {"data": str(data_dir), "test-time augmentation": "mirror" if classifier.tta else "off"}
    if skipped:
        extra["skipped unreadable files"] = [f"{path} ({reason})" for path, reason in skipped]
    leak_free = None
    if exclude_duplicates_of:
        from .dedup import leak_free_mask

        train_paths = discover(exclude_duplicates_of).paths
        leak_free = leak_free_mask(paths, train_paths)
        extra["leak check"] = (f"{len(leak_free) - sum(leak_free)} of {len(leak_free)} images are exact or near "
                               f"duplicates of images in {exclude_duplicates_of}")
    return evaluate_classifier(classifier, paths, labels, out_dir, batch_size=batch_size, workers=workers,
                               title=f"Evaluation of {Path(checkpoint).name} on {data_dir}", extra=extra,
                               leak_free=leak_free)
