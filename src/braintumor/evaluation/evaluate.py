"""Evaluate a model on labelled images: the one evaluation loop (validation during training, the final report
and ``braintumor evaluate`` all run :func:`infer_batches`), then metrics and reports (full and leak-free subsets)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from braintumor.data.cache import choose_cache
from braintumor.data.index import discover, keep_readable, report_unsupported
from braintumor.data.pipeline import CachedBatches, ImageFolderDataset
from braintumor.data.scan import scan_files
from braintumor.evaluation.metrics import compute_metrics
from braintumor.evaluation.per_image import image_losses, plot_worst_mistakes
from braintumor.evaluation.report import plot_roc_curves, write_report
from braintumor.inference.classifier import Classifier, check_min_confidence
from braintumor.inference.results import EvaluatedPrediction
from braintumor.inference.service import calibrate, infer_batches, predictions_from, run_batches, tta_views
from braintumor.inference.writers import write_predictions_csv
from braintumor.trust.status import OK, STATUSES

__all__ = ["evaluate_checkpoint", "evaluate_classifier", "file_batches", "infer_batches", "loss_and_correct",
           "trust_metrics", "view_logits"]


def view_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                tta: bool) -> list[torch.Tensor]:
    """Float logits of each test-time view of a training network (:func:`~braintumor.inference.service.tta_views`,
    the one TTA)."""
    return [view.float() for view in tta_views(forward, images, tta)[0]]


def loss_and_correct(views: list[np.ndarray], labels: np.ndarray) -> tuple[float, int]:
    """Summed cross-entropy and the number of correct predictions; with several views (TTA), of the mean of their
    softmax probabilities."""
    logits = [torch.from_numpy(np.asarray(view, dtype=np.float32)) for view in views]
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if len(logits) == 1:
        scores = logits[0]
        loss = torch.nn.functional.cross_entropy(scores, target, reduction="sum")
    else:
        scores = torch.stack([torch.softmax(view, dim=1) for view in logits]).mean(0)
        loss = torch.nn.functional.nll_loss(scores.clamp_min(1e-12).log(), target, reduction="sum")
    return float(loss), int((scores.argmax(1) == target).sum())


def file_batches(classifier: Classifier, paths: list[Path], batch_size: int = 64, workers: int = 0) -> DataLoader:
    """Image files decoded and preprocessed in DataLoader workers, as (images, index) batches."""
    dataset = ImageFolderDataset(paths, list(range(len(paths))), classifier.preprocess)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)


def trust_metrics(predictions: list[EvaluatedPrediction], classes: list[str]) -> dict[str, Any]:
    """Slices per status, accuracy per status (accepted ``ok`` vs ``atypical``, ...), and per true class the rate
    of each flagged status (``not_mri``, ``atypical``, ``uncertain``)."""
    counts = {status: sum(p.status == status for p in predictions) for status in STATUSES}
    accuracy = {status: (float(np.mean([bool(p.correct) for p in predictions if p.status == status]))
                         if counts[status] else None) for status in STATUSES}
    rates = {}
    for name in classes:
        members = [p for p in predictions if p.true_class == name]
        rates[name] = {status: (sum(p.status == status for p in members) / len(members) if members else None)
                       for status in STATUSES if status != OK}
    return {"statuses": counts, "accuracy_by_status": accuracy, "flag_rate_by_class": rates}


def _trust_notes(trust: dict[str, Any], tiers: tuple[str, ...]) -> dict[str, str]:
    """The trust tiers and the flag rate per class for the report's notes (its summary already gives the slices
    and the accuracy per status)."""
    lines = {"trust tiers": ", ".join(tiers) if tiers else "none (fit them with braintumor calibrate)"}
    lines["flag rate per class"] = "; ".join(
        f"{name}: " + (", ".join(f"{status} {rate:.1%}" for status, rate in rates.items() if rate is not None)
                       or "no slices")
        for name, rates in trust["flag_rate_by_class"].items())
    return lines


def evaluate_classifier(classifier: Classifier, paths: list[Path], labels: list[int], out_dir: str | Path, *,
                        batch_size: int = 64, title: str = "Evaluation report",
                        extra: dict[str, Any] | None = None, leak_free: list[bool] | None = None,
                        workers: int = 0, groups: list | None = None,
                        duplicate_of_train: list[bool] | None = None,
                        images: torch.Tensor | None = None, progress: bool = False) -> dict[str, Any]:
    """Metrics of a classifier on labelled files, written as a report with predictions.csv (the results schema,
    docs/schema.md), ROC curves and the worst mistakes; ``leak_free`` adds a subset column; ``duplicate_of_train``
    and ``groups`` fill those predictions.csv columns. ``images``: the files already decoded at the model's size
    (uint8 (N, 3, S, S)). ``progress``: a tqdm bar on stderr (on a terminal)."""
    from tqdm import tqdm

    if images is None:
        batches = file_batches(classifier, paths, batch_size, workers)
    else:
        batches = CachedBatches(images, list(range(len(paths))), batch_size, shuffle=False, mean=classifier.mean,
                                std=classifier.std)
    with tqdm(total=len(paths), unit="slice", file=sys.stderr, disable=None if progress else True,
              leave=False) as bar:
        outputs, _ = run_batches(classifier, batches, progress=bar.update)
    classes = list(classifier.classes)
    probabilities = outputs.probabilities
    y_true = np.asarray(labels, dtype=np.int64)
    finite = np.isfinite(probabilities).all(axis=1)
    safe = np.where(finite[:, None], probabilities, 1.0 / len(classes))  # metrics need numbers; status says why
    y_pred = safe.argmax(axis=1)
    losses = image_losses(safe, y_true) if len(y_true) else np.zeros(0)
    rows = [{"true_class": classes[y_true[i]], "correct": bool(finite[i] and y_pred[i] == y_true[i]),
             "loss": float(losses[i]) if finite[i] else float("nan"),
             "duplicate_of_train": None if duplicate_of_train is None else bool(duplicate_of_train[i]),
             "group": None if groups is None or groups[i] is None else str(groups[i])} for i in range(len(paths))]
    predictions = predictions_from(classifier, outputs, [os.fspath(p) for p in paths], cls=EvaluatedPrediction,
                                   extra=rows)
    uncalibrated = calibrate(outputs.views, 1.0) if classifier.temperature != 1.0 else None
    if uncalibrated is not None:
        uncalibrated = np.where(np.isfinite(uncalibrated).all(axis=1)[:, None], uncalibrated, 1.0 / len(classes))
    metrics = compute_metrics(y_true, y_pred, safe, classes, uncalibrated_probabilities=uncalibrated)
    metrics["temperature"] = classifier.temperature
    tiers = tuple(classifier.trust_tiers)
    trust = trust_metrics(predictions, classes)
    metrics["trust"] = {"tiers": list(tiers), **trust}
    extra = {"checkpoint": f"{classifier.source_path} (sha256 {classifier.fingerprint})", **(extra or {}),
             **_trust_notes(trust, tiers)}
    subsets = None
    if leak_free is not None:
        mask = np.asarray(leak_free, dtype=bool)
        subsets = {"full set": metrics}
        if mask.any():
            subsets["leak-free subset"] = compute_metrics(y_true[mask], y_pred[mask], safe[mask], classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "predictions.csv", predictions, classes, volumes=False, evaluation=True)
    figures = []
    if plot_roc_curves(y_true, safe, classes, out / "roc_curves.png"):
        figures.append("roc_curves.png")
    if plot_worst_mistakes(classifier, paths, y_true, safe, out / "worst_mistakes.png"):
        figures.append("worst_mistakes.png")
    write_report(metrics, out, title=title, extra=extra, subsets=subsets, figures=figures)
    return {"metrics": metrics, "subsets": subsets or {}, "out_dir": str(out_dir), "predictions": predictions}


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, *,
                        device: str = "auto", batch_size: int = 64, exclude_duplicates_of: str | None = None,
                        skip_bad: bool = False, workers: int = 0, tta: bool | None = None,
                        groups: str | None = None, backend: str = "torch", min_confidence: float = 0.0,
                        progress: bool = False) -> dict[str, Any]:
    """``braintumor evaluate``: every metric on a labelled folder, optionally beside its leak-free subset;
    ``tta`` overrides the model's stored test-time augmentation setting.

    With ``exclude_duplicates_of`` (the training folder), an image is left out of the leak-free subset when it
    duplicates a training image or, with patient groups (``groups`` CSV or per-patient sub-folders), when its
    group also has images in the training folder.
    """
    from braintumor.data.groups import find_groups

    classifier = Classifier.from_checkpoint(checkpoint, device=device, tta=tta, backend=backend)
    classifier.min_confidence = check_min_confidence(min_confidence)
    index = discover(data_dir, classes=classifier.classes)
    # One decode per file checks it, hashes it for the leak check and, where memory allows, feeds the model.
    size = classifier.image_size
    decoded = choose_cache("auto", len(index.paths), size, "cpu") == "memory"
    scan = scan_files(index.paths, hashes=bool(exclude_duplicates_of), sizes=(size,) if decoded else ())
    kept, skipped = keep_readable(index.paths, scan.errors, str(data_dir), skip_bad)
    paths, labels = [index.paths[i] for i in kept], [index.labels[i] for i in kept]
    skipped += report_unsupported(data_dir)
    extra: dict[str, Any] = {"data": str(data_dir), "test-time augmentation": "mirror" if classifier.tta else "off"}
    if skipped:
        extra["skipped unreadable files"] = [f"{path} ({reason})" for path, reason in skipped]
    test_groups, group_source = find_groups(paths, data_dir, groups)
    if group_source:
        extra["groups"] = group_source
    leak_free = duplicates = None
    if exclude_duplicates_of:
        from braintumor.data.dedup import leak_free_mask

        train_paths = discover(exclude_duplicates_of).paths
        leak_free = leak_free_mask(paths, train_paths)
        duplicates = [not free for free in leak_free]
        extra["leak check"] = (f"{len(leak_free) - sum(leak_free)} of {len(leak_free)} images are exact or near "
                               f"duplicates of images in {exclude_duplicates_of}")
        if group_source:
            train_groups = set(find_groups(train_paths, exclude_duplicates_of, groups)[0]) - {None}
            shared = [group is not None and group in train_groups for group in test_groups]
            leak_free = [free and not share for free, share in zip(leak_free, shared)]
            extra["group leak check"] = (f"{sum(shared)} of {len(shared)} images belong to a group that also has "
                                         f"images in {exclude_duplicates_of}; left out of the leak-free subset")
    return evaluate_classifier(classifier, paths, labels, out_dir, batch_size=batch_size, workers=workers,
                               title=f"Evaluation of {Path(checkpoint).name} on {data_dir}", extra=extra,
                               leak_free=leak_free, groups=test_groups if group_source else None,
                               duplicate_of_train=duplicates, images=scan.keep(kept, size) if decoded else None,
                               progress=progress)
