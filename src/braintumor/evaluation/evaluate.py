"""Evaluate a model on labelled images: the one evaluation loop (validation during training, the final report
and ``braintumor evaluate`` all run :func:`infer_batches`), then metrics and reports (full and leak-free subsets)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
from braintumor.inference.classifier import Classifier
from braintumor.evaluation.report import plot_roc_curves, write_report


InferViews = Callable[[torch.Tensor], tuple[list[np.ndarray], "np.ndarray | None"]]


def view_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                tta: bool) -> list[torch.Tensor]:
    """Float logits of each test-time view: the batch, and with ``tta`` its mirror too (one forward pass over
    both, as :meth:`braintumor.inference.classifier.Classifier.infer_views` runs them)."""
    if not tta:
        return [forward(images).float()]
    logits = forward(torch.cat([images, images.flip(-1)])).float()
    return [logits[: len(images)], logits[len(images):]]


@torch.inference_mode()
def infer_batches(infer_views: InferViews, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_classes: int,
                  ) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray]:
    """Run a model over preprocessed (images, labels) batches: each test-time view's logits (N, C), the OOD
    scores (N,) (None without a detector) and the labels (N,).

    ``infer_views`` maps a batch to (logits of each view, scores): ``Classifier.infer_views`` for a saved model,
    the training network for validation; the batches come from either data path with the same preprocessing.
    """
    outputs, labels = [], []
    for images, batch_labels in batches:
        outputs.append(infer_views(images))
        labels.append(np.asarray(batch_labels, dtype=np.int64).reshape(-1))
    if not outputs:
        return [np.zeros((0, n_classes), dtype=np.float32)], None, np.zeros(0, dtype=np.int64)
    views = [np.concatenate([batch_views[v] for batch_views, _ in outputs]) for v in range(len(outputs[0][0]))]
    scores = None if outputs[0][1] is None else np.concatenate([score for _, score in outputs])
    return views, scores, np.concatenate(labels)


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


def infer_paths(classifier: Classifier, paths: list[Path], batch_size: int = 64,
                workers: int = 0) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Raw logits (N, C) of each test-time view (one, or two with TTA) and OOD scores (N,) (None without a
    detector) for image files, decoded and preprocessed in DataLoader workers."""
    dataset = ImageFolderDataset(paths, [0] * len(paths), classifier.preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    views, scores, _ = infer_batches(classifier.infer_views, loader, len(classifier.classes))
    return views, scores


def predict_paths(classifier: Classifier, paths: list[Path], batch_size: int = 64,
                  workers: int = 0) -> np.ndarray:
    """Calibrated probabilities (N, C) for image files (mirror-averaged with TTA)."""
    return classifier.probabilities(infer_paths(classifier, paths, batch_size, workers)[0])


def evaluate_paths(checkpoint: str | Path, paths: list[Path], labels: list[int], out_dir: str | Path, *,
                   device: str = "auto", **options) -> dict[str, Any]:
    """Load ``checkpoint`` and evaluate it on labelled files (see :func:`evaluate_classifier`)."""
    return evaluate_classifier(Classifier.from_checkpoint(checkpoint, device=device), paths, labels, out_dir,
                               **options)


def evaluate_classifier(classifier: Classifier, paths: list[Path], labels: list[int], out_dir: str | Path, *,
                        batch_size: int = 64, title: str = "Evaluation report",
                        extra: dict[str, Any] | None = None, leak_free: list[bool] | None = None,
                        workers: int = 0, groups: list | None = None,
                        duplicate_of_train: list[bool] | None = None,
                        images: torch.Tensor | None = None) -> dict[str, Any]:
    """Metrics of a classifier on labelled files, written as a report with predictions.csv, ROC curves and the
    worst mistakes; ``leak_free`` adds a subset column; ``duplicate_of_train`` and ``groups`` add
    predictions.csv columns. ``images``: the files already decoded at the model's size (uint8 (N, 3, S, S))."""
    if images is None:
        views, ood_scores = infer_paths(classifier, paths, batch_size, workers)
    else:
        batches = CachedBatches(images, list(labels), batch_size, shuffle=False, mean=classifier.mean,
                                std=classifier.std)
        views, ood_scores, _ = infer_batches(classifier.infer_views, batches, len(classifier.classes))
    probabilities = classifier.probabilities(views)
    y_true = np.asarray(labels)
    y_pred = probabilities.argmax(axis=1)
    uncalibrated = classifier.probabilities(views, temperature=1.0) if classifier.temperature != 1.0 else None
    metrics = compute_metrics(y_true, y_pred, probabilities, classifier.classes, uncalibrated_probabilities=uncalibrated)
    metrics["temperature"] = classifier.temperature
    metrics["ood"] = {"detector": ood_scores is not None}
    if ood_scores is not None:
        flagged = ood_scores > 1.0
        metrics["ood"].update(n_flagged=int(flagged.sum()), fraction_flagged=float(flagged.mean()),
                              accept_rate=classifier.trust.get("accept_rate"))
    extra = {"checkpoint": f"{classifier.source_path} (sha256 {classifier.fingerprint})", **(extra or {})}
    subsets = None
    if leak_free is not None:
        mask = np.asarray(leak_free, dtype=bool)
        subsets = {"full set": metrics}
        if mask.any():
            subsets["leak-free subset"] = compute_metrics(y_true[mask], y_pred[mask], probabilities[mask],
                                                          classifier.classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from braintumor.evaluation.per_image import plot_worst_mistakes, write_predictions_csv

    write_predictions_csv(out / "predictions.csv", paths, y_true, probabilities, classifier.classes,
                          ood_scores=ood_scores,
                          duplicate_of_train=duplicate_of_train, groups=groups)
    figures = []
    if plot_roc_curves(y_true, probabilities, classifier.classes, out / "roc_curves.png"):
        figures.append("roc_curves.png")
    if plot_worst_mistakes(classifier, paths, y_true, probabilities, out / "worst_mistakes.png"):
        figures.append("worst_mistakes.png")
    write_report(metrics, out, title=title, extra=extra, subsets=subsets, figures=figures)
    return {"metrics": metrics, "subsets": subsets or {}, "out_dir": str(out_dir)}


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path, *,
                        device: str = "auto", batch_size: int = 64, exclude_duplicates_of: str | None = None,
                        skip_bad: bool = False, workers: int = 0, tta: bool | None = None,
                        groups: str | None = None, backend: str = "torch") -> dict[str, Any]:
    """``braintumor evaluate``: every metric on a labelled folder, optionally beside its leak-free subset;
    ``tta`` overrides the model's stored test-time augmentation setting.

    With ``exclude_duplicates_of`` (the training folder), an image is left out of the leak-free subset when it
    duplicates a training image or, with patient groups (``groups`` CSV or per-patient sub-folders), when its
    group also has images in the training folder.
    """
    from braintumor.data.groups import find_groups

    classifier = Classifier.from_checkpoint(checkpoint, device=device, tta=tta, backend=backend)
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
                               duplicate_of_train=duplicates, images=scan.keep(kept, size) if decoded else None)
