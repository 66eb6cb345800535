"""Per-image evaluation outputs: each slice's loss and the worst-mistakes gallery (``predictions.csv`` is written by
the one CSV writer, :func:`braintumor.inference.writers.write_predictions_csv`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from braintumor.utils.atomic import atomic_write

GALLERY_SIZE = 8


def image_losses(probabilities: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """Cross-entropy of each image's true class, -log p(true), clipped at p = 1e-12."""
    return -np.log(np.clip(probabilities[np.arange(len(y_true)), y_true], 1e-12, 1.0))


def _shown_name(path) -> str:
    """A file's name for a figure: bytes that are not valid UTF-8 shown as U+FFFD, control characters escaped."""
    name = Path(path).name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name)


def worst_mistakes(y_true, probabilities, limit: int = GALLERY_SIZE) -> list[int]:
    """Indices of misclassified images, highest loss first, at most ``limit``."""
    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y_true)
    losses = image_losses(probabilities, y_true)
    return [int(i) for i in wrong[np.argsort(-losses[wrong], kind="stable")][:limit]]


def plot_worst_mistakes(classifier, paths: Sequence, y_true, probabilities, path, limit: int = GALLERY_SIZE,
                        ) -> Path | None:
    """A PNG of the worst mistakes: each slice beside its Grad-CAM for the predicted class (slice only for an
    ONNX model), captioned with the true and predicted class. None when nothing was misclassified."""
    indices = worst_mistakes(y_true, probabilities, limit)
    if not indices:
        return None
    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities)
    images = [classifier.load(paths[i]).resize((classifier.image_size,) * 2) for i in indices]
    explanations = classifier.explain([str(paths[i]) for i in indices]) if classifier.model is not None else None
    per_item = 2 if explanations else 1  # the slice, and its Grad-CAM beside it
    per_row = 2 if len(indices) > 3 else 1
    rows = -(-len(indices) // per_row)
    fig = Figure(figsize=(3.0 * per_item * per_row + (1.0 if explanations else 0), 3.1 * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, per_item * per_row, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (i, image) in enumerate(zip(indices, images)):
        row, column = divmod(k, per_row)
        slice_ax = axes[row, column * per_item]
        predicted = int(probabilities[i].argmax())
        slice_ax.imshow(image)
        slice_ax.set_title(f"{_shown_name(paths[i])}\ntrue {classifier.classes[y_true[i]]} · predicted "
                           f"{classifier.classes[predicted]} ({probabilities[i, predicted]:.0%})", fontsize=8)
        if explanations:
            cam_ax = axes[row, column * per_item + 1]
            cam_ax.imshow(explanations[k].overlay(alpha=0.0))
            cam_ax.imshow(explanations[k].heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            cam_ax.set_title(f"{explanations[k].method_label} for {explanations[k].target}", fontsize=8)
    if explanations:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=axes, shrink=min(0.8, 1.5 / rows),
                     label="Grad-CAM (0 none, 1 strongest)")
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    return Path(path)
