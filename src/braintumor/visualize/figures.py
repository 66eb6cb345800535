"""The figures people read: confusion matrix, reliability diagram, training curves, Grad-CAM panels and montages.

All are bare matplotlib ``Figure`` objects (no pyplot state to leak in a server or a training loop), written
atomically. Grad-CAM panels have a fixed pixel size whatever the caption, so a folder of them lines up.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from braintumor.utils.atomic import atomic_write

GRADCAM_SIZE_PX = (900, 460)  # width, height of every Grad-CAM panel
_DPI = 100


def save_figure(fig: Figure, path: str | os.PathLike, *, tight: bool = True, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically; ``tight=False`` keeps the figure's exact pixel size."""
    options = {"bbox_inches": "tight"} if tight else {}
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, **options))
    return Path(path)


def figure_to_image(fig: Figure, dpi: int = _DPI) -> Image.Image:
    """Render a figure at its exact size (figsize × dpi) to an RGB PIL image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def confusion_cell_text(count: int, row_total: int) -> str:
    """A confusion-matrix cell's label: its count over its share of the true class ("–" for a class with no
    slices, whose row has no share)."""
    return f"{count}\n{100 * count / row_total:.1f} %" if row_total else f"{count}\n–"


def plot_confusion_matrix(counts, class_names: Sequence[str], path) -> Path:
    """Confusion matrix PNG: each cell its count and its share of the true class (row %), coloured by that share."""
    counts = np.asarray(counts, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = max(4.5, 1.0 * len(class_names) + 2.2)  # cells stay legible from 2 to 10+ classes
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class (row)")
    tilt = len(class_names) > 3  # long names side by side would overlap
    ax.set_xticks(range(len(class_names)), labels=class_names, rotation=45 if tilt else 0,
                  ha="right" if tilt else "center")
    ax.set_yticks(range(len(class_names)), labels=[f"{name}\n(n={int(n)})" for name, n in
                                                   zip(class_names, totals[:, 0])])
    small = len(class_names) > 6
    for (row, col), count in np.ndenumerate(counts):
        share = fraction[row, col]
        ax.text(col, row, confusion_cell_text(count, int(totals[row, 0])), ha="center", va="center",
                fontsize=8 if small else 11,
                color="white" if share > 0.5 else "black", fontweight="bold" if row == col else "normal")
    ax.set(xlabel="Predicted class", ylabel="True class",
           title=f"Confusion matrix: counts and row % (n={int(counts.sum())})")
    return save_figure(fig, path)


def plot_reliability(bins: dict, ece: float, path) -> Path:
    """Reliability diagram PNG: accuracy per confidence bin with its image count and its gap to the diagonal.

    Empty bins are left out, each bar is labelled with its count (a 2-image bin shows as such), the red part of a
    bar is the gap between the bin's accuracy and its mean confidence, and the title gives the ECE.
    """
    edges = np.asarray(bins["bin_edges"], dtype=float)
    count = np.asarray(bins["count"], dtype=int)
    used = count > 0
    accuracy = np.array([a if a is not None else np.nan for a in bins["accuracy"]], dtype=float)
    confidence = np.array([c if c is not None else np.nan for c in bins["confidence"]], dtype=float)
    left, width = edges[:-1][used], np.diff(edges)[used]
    fig = Figure(figsize=(6.4, 7.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(left, accuracy[used], width=width, align="edge", color="#4878a8", edgecolor="black",
            label="accuracy in the bin")
    gap_low = np.minimum(accuracy[used], confidence[used])
    top.bar(left, np.abs(confidence[used] - accuracy[used]), bottom=gap_low, width=width, align="edge",
            facecolor="none", edgecolor="#d62728", linewidth=1.2, hatch="////",
            label="gap: bin accuracy vs its mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", zorder=3, label="perfect calibration")
    for x, w, a, c, n in zip(left, width, accuracy[used], confidence[used], count[used]):
        top.text(x + w / 2, max(a, c) + 0.015, str(n), ha="center", va="bottom", fontsize=7)
    total = int(count.sum())
    top.set(ylim=(0, 1.08), ylabel="Accuracy (number above a bar: its images)",
            title=f"Reliability diagram: ECE = {ece:.4f} ({len(count)} bins, n={total})")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    bottom.bar(left, count[used], width=width, align="edge", edgecolor="black", color="gray")
    # A log count axis: with an accurate model one bar near confidence 1 holds almost every image and would
    # flatten the others to nothing on a linear axis.
    bottom.set_yscale("log")
    bottom.set(xlim=(0, 1), xlabel="Confidence (top-label probability)", ylabel="Images per bin (log)")
    return save_figure(fig, path)


def plot_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path) -> Path:
    """One-vs-rest ROC curves, {class: (false positive rates, true positive rates, AUC)}, AUC with 4 decimals.

    When every AUC is at least 0.98 the curves hug the axes, so an inset zooms into the top-left corner
    (false positive rate 0-0.05, true positive rate from just below the lowest curve's value there to 1).
    """
    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    ax = fig.add_subplot()
    lines = []
    for name, (fpr, tpr, auc) in curves.items():
        lines.append(ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.4f})")[0])
    ax.plot([0, 1], [0, 1], "--", color="gray", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title="ROC curves, one class vs the rest")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if curves and min(auc for _, _, auc in curves.values()) >= 0.98:
        zoom_x = 0.05
        lowest = min(float(np.interp(zoom_x, fpr, tpr)) for fpr, tpr, _ in curves.values())
        low = max(0.0, min(0.99, lowest - 0.2 * (1 - lowest) - 0.002))
        inset = ax.inset_axes([0.3, 0.3, 0.45, 0.45])
        for line, (fpr, tpr, _) in zip(lines, curves.values()):
            inset.plot(fpr, tpr, color=line.get_color(), drawstyle="steps-post")
        inset.set(xlim=(-0.001, zoom_x), ylim=(low, 1.001), title=f"zoom: FPR ≤ {zoom_x}, TPR ≥ {low:.3f}")
        inset.title.set_fontsize(8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
        ax.indicate_inset_zoom(inset, edgecolor="gray")
    return save_figure(fig, path)


def plot_training_curves(rows: Sequence[dict], path, loss_title: str = "Cross-entropy loss") -> Path:
    """Loss, accuracy and learning rate per epoch; the best epoch (highest validation accuracy) is marked.
    ``loss_title`` names the loss the run optimised (training.trainer.loss_title)."""
    epochs = [row["epoch"] for row in rows]
    fig = Figure(figsize=(13, 4), layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    for key, label in (("train", "train"), ("val", "validation")):
        loss_ax.plot(epochs, [row[f"{key}_loss"] for row in rows], marker="o", label=label)
        acc_ax.plot(epochs, [100 * row[f"{key}_accuracy"] for row in rows], marker="o", label=label)
    best = max(rows, key=lambda row: row["val_accuracy"]) if rows else None
    if best is not None:
        for ax in (loss_ax, acc_ax, lr_ax):
            ax.axvline(best["epoch"], color="green", linestyle=":", linewidth=1.5)
        acc_ax.plot([best["epoch"]], [100 * best["val_accuracy"]], marker="*", markersize=16, color="green",
                    linestyle="none", label=f"best: epoch {best['epoch']} ({100 * best['val_accuracy']:.1f} %)")
    lrs = [row.get("lr", math.nan) for row in rows]
    lr_ax.plot(epochs, lrs, marker="o", color="purple")
    positive = [v for v in lrs if v and v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 20:
        lr_ax.set_yscale("log")
    loss_ax.set(title=loss_title, xlabel="epoch", ylabel="loss")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    lr_ax.set(title="Learning rate (at the start of the epoch)", xlabel="epoch", ylabel="lr")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    loss_ax.legend()
    acc_ax.legend(fontsize=8)
    return save_figure(fig, path, tight=False, dpi=110)


def _heat_colorbar(fig: Figure, axes, colormap: str, label: str = "Grad-CAM") -> None:
    mappable = ScalarMappable(norm=Normalize(0, 1), cmap=colormaps[colormap])
    bar = fig.colorbar(mappable, ax=axes, fraction=0.035, pad=0.02)
    bar.set_label(f"{label} (0 none, 1 strongest evidence)")


def _method_label(explanation) -> str:
    return getattr(explanation, "method_label", "Grad-CAM")


def _setting(explanation) -> str:
    return getattr(explanation, "setting", _method_label(explanation))


def _show(ax, image, title: str | None = None) -> None:
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def gradcam_panel(explanation, *, alpha: float = 0.45, colormap: str = "jet") -> Image.Image:
    """The slice | the explanation overlay, side by side with a colour bar and a caption; always GRADCAM_SIZE_PX."""
    width, height = GRADCAM_SIZE_PX
    fig = Figure(figsize=(width / _DPI, height / _DPI))
    left, right = fig.subplots(1, 2, gridspec_kw={"wspace": 0.04})
    fig.subplots_adjust(left=0.02, right=0.86, top=0.80, bottom=0.03)
    _show(left, explanation.image.convert("L").convert("RGB"), "slice")
    label = _method_label(explanation)
    _show(right, explanation.overlay(alpha=alpha, colormap=colormap), f"{label} for: {_fit(explanation.target, 28)}")
    _heat_colorbar(fig, [left, right], colormap, label)
    fig.suptitle(_fit(f"predicted {explanation.predicted} (p = {explanation.probability:.2f})   ·   "
                      f"{explanation.target}: p = {explanation.target_probability:.2f}", 95), fontsize=12, y=0.985)
    fig.text(0.5, 0.905, _fit(_setting(explanation), 110), ha="center", va="center", fontsize=9, color="0.3")
    image = figure_to_image(fig)
    return image if image.size == GRADCAM_SIZE_PX else image.resize(GRADCAM_SIZE_PX, Image.BILINEAR)


def gradcam_montage(explanations: Sequence, titles: Sequence[str], title: str, *, alpha: float = 0.45,
                    colormap: str = "jet") -> Image.Image:
    """Slices (top row) above their explanation overlays (bottom row, each labelled with the method and the class
    it explains), one column each, a colour bar and a title."""
    columns = max(1, len(explanations))
    fig = Figure(figsize=(2.3 * columns + 1.2, 5.6))
    axes = np.asarray(fig.subplots(2, columns, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.12}))
    fig.subplots_adjust(left=0.01, right=0.88, top=0.83, bottom=0.02)
    for column, (explanation, caption) in enumerate(zip(explanations, titles)):
        _show(axes[0, column], explanation.image.convert("L").convert("RGB"), caption)
        _show(axes[1, column], explanation.overlay(alpha=alpha, colormap=colormap))
        axes[1, column].set_title(_fit(f"{_method_label(explanation)} for: {explanation.target}", 30), fontsize=9)
    for column in range(len(explanations), columns):
        axes[0, column].set_axis_off()
        axes[1, column].set_axis_off()
    label = _method_label(explanations[0]) if explanations else "Grad-CAM"
    _heat_colorbar(fig, axes.ravel().tolist(), colormap, label)
    fig.suptitle(f"{title}\n{_setting(explanations[0])}" if explanations else title, fontsize=11)
    return figure_to_image(fig)


def box_overlay_montage(images: Sequence[Image.Image], heatmaps: Sequence[np.ndarray],
                        boxes: Sequence[tuple[float, float, float, float]], captions: Sequence[str], title: str,
                        method_label: str, *, grow: float = 0.0, alpha: float = 0.45,
                        colormap: str = "jet") -> Image.Image:
    """Slices with their expert box (top row) above the explanation overlay with the same box and a cross on the
    map's maximum (bottom row). ``boxes`` are (x0, y0, x1, y1) in fractions of the side; ``grow`` draws the
    pointing-game tolerance as a dashed box around each."""
    from matplotlib.patches import Rectangle

    columns = max(1, len(images))
    fig = Figure(figsize=(2.3 * columns + 1.2, 5.9))
    axes = np.asarray(fig.subplots(2, columns, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.16}))
    fig.subplots_adjust(left=0.01, right=0.88, top=0.84, bottom=0.02)
    for column, (image, heatmap, box, caption) in enumerate(zip(images, heatmaps, boxes, captions)):
        size = heatmap.shape[0]
        gray = image.convert("L").resize((size, size), Image.BILINEAR)
        colours = colormaps[colormap](heatmap)[..., :3]
        overlay = (1 - alpha) * (np.asarray(gray, dtype=np.float32)[..., None] / 255.0) + alpha * colours
        _show(axes[0, column], gray.convert("RGB"), _fit(caption, 30))
        _show(axes[1, column], np.clip(overlay, 0, 1))
        top = float(heatmap.max())
        for row in (0, 1):
            x0, y0, x1, y1 = (value * size - 0.5 for value in box)
            axes[row, column].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime",
                                                  linewidth=1.5))
            if grow and row == 1:
                axes[row, column].add_patch(Rectangle((x0 - grow * size, y0 - grow * size),
                                                      x1 - x0 + 2 * grow * size, y1 - y0 + 2 * grow * size,
                                                      fill=False, edgecolor="lime", linewidth=0.8, linestyle="--"))
        if top > 0:
            rows, cols = np.nonzero(heatmap >= top - 1e-6 * top)
            axes[1, column].plot(cols.mean(), rows.mean(), marker="x", color="white", markersize=9, mew=2.5)
            axes[1, column].plot(cols.mean(), rows.mean(), marker="x", color="black", markersize=7, mew=1.2)
    for column in range(len(images), columns):
        axes[0, column].set_axis_off()
        axes[1, column].set_axis_off()
    _heat_colorbar(fig, axes.ravel().tolist(), colormap, method_label)
    fig.suptitle(title, fontsize=11)
    return figure_to_image(fig)


def mean_maps_figure(rows: dict[str, dict[str, np.ndarray]], references: dict[str, np.ndarray], title: str,
                     reference_label: str = "box frequency") -> Image.Image:
    """A grid of per-class mean maps: one row per explanation ({row: {class: mean map}}) and a last row of
    ``references`` ({class: map}, e.g. how often each pixel lies in a box), each panel scaled to its own maximum."""
    classes = list(references)
    names = list(rows) + [reference_label]
    height = 2.25 * len(names) + 0.9
    fig = Figure(figsize=(2.2 * len(classes) + 1.6, height))
    axes = np.asarray(fig.subplots(len(names), len(classes), squeeze=False,
                                   gridspec_kw={"wspace": 0.04, "hspace": 0.08}))
    fig.subplots_adjust(left=0.2, right=0.98, top=1 - 0.8 / height, bottom=0.01)
    for r, name in enumerate(names):
        panels = rows[name] if name in rows else references
        for c, label in enumerate(classes):
            ax = axes[r, c]
            panel = np.asarray(panels[label], dtype=np.float32)
            ax.imshow(panel / panel.max() if panel.max() > 0 else panel, cmap="magma", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=10)
            if c == 0:
                ax.set_ylabel(_fit(name, 22), fontsize=9)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    return figure_to_image(fig)
