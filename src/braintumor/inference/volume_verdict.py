"""Classify a volume slice by slice and summarise it: per-slice results, the volume's verdict and its rule.

The rule (``VerdictRule``), stated in every output:

- A slice *has content* when at least 5 % of its pixels are brighter than 10 % of the window; empty slices
  (air above and below the head) are classified and listed but never decide the verdict.
- A slice *votes* for a tumour class when the model predicts that class with probability ≥ ``threshold``
  (default 0.5).
- The verdict is the tumour class with the most votes, if it has at least ``min_slices`` (default 2); ties go
  to the class with the highest single-slice probability. Otherwise the verdict is the model's no-tumour class
  (a class named ``notumor``, ``no_tumor``, ``normal``, ``healthy``, …), or ``no tumour class found`` for a
  model without one.

Tumour classes are all classes except the no-tumour class. The most suspicious slices (shown in the montage)
are the content slices with the highest probability of the verdict class, or of any tumour class when the
verdict is no tumour.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.utils.atomic import atomic_write
from braintumor.data.volumes import Volume

_NO_TUMOUR_NAMES = {"notumor", "notumour", "normal", "healthy", "none", "negative", "nofinding", "nolesion"}
NO_FINDING = "no tumour class found"
CONTENT_FRACTION, CONTENT_LEVEL = 0.05, 0.10 * 255


def no_tumour_class(classes) -> str | None:
    """The class meaning "no tumour" (``notumor``, ``no_tumor``, ``normal``, ...), or None."""
    for name in classes:
        if re.sub(r"[^a-z]", "", name.lower()) in _NO_TUMOUR_NAMES:
            return name
    return None


@dataclass(frozen=True)
class VerdictRule:
    """How slice predictions become one verdict (see the module docstring)."""

    threshold: float = 0.5
    min_slices: int = 2

    def __post_init__(self):
        from braintumor.errors import UserError

        if not 0.0 < self.threshold <= 1.0:
            raise UserError(f"--slice-threshold must be in (0, 1], got {self.threshold}")
        if self.min_slices < 1:
            raise UserError(f"--min-slices must be at least 1, got {self.min_slices}")

    def describe(self, normal: str | None) -> str:
        otherwise = f"'{normal}'" if normal else f"'{NO_FINDING}'"
        return (f"the tumour class predicted with p >= {self.threshold:.2f} on the most slices with content, "
                f"if on at least {self.min_slices}; otherwise {otherwise}")


@dataclass
class VolumeResult:
    """Per-slice predictions of one volume and its verdict."""

    source: str
    kind: str
    classes: list[str]
    probabilities: np.ndarray  # (Z, C)
    content: np.ndarray  # bool (Z,)
    verdict: str
    rule: str
    votes: dict[str, int]
    suspicious: list[int]  # slice indices for the montage, in slice order
    key_slice: int  # the most suspicious slice (the page shows it)
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    window: tuple[float, float]
    montage: str | None = field(default=None)

    @property
    def evidence(self) -> str:
        """One sentence: how many slices voted for the verdict (or for any tumour class)."""
        n = int(self.content.sum())
        if self.verdict in self.votes:
            return f"{self.votes[self.verdict]} of {n} slices with content vote {self.verdict}"
        counted = ", ".join(f"{name} {count}" for name, count in self.votes.items()) or "none"
        return f"{n} slices with content; tumour votes: {counted}"

    def slice_predictions(self) -> list:
        """One ``Prediction`` per slice, its source ``<volume>#slice<index>``."""
        from braintumor.inference.classifier import Prediction

        return [Prediction(source=f"{self.source}#slice{row['slice']:03d}", label=row["label"],
                           index=self.classes.index(row["label"]), probabilities=row["probabilities"])
                for row in self.slice_rows()]

    def slice_rows(self) -> list[dict[str, Any]]:
        rows = []
        for index, row in enumerate(self.probabilities):
            best = int(np.argmax(row))
            rows.append({"slice": index, "content": bool(self.content[index]), "label": self.classes[best],
                         "confidence": float(row[best]),
                         "probabilities": {c: float(p) for c, p in zip(self.classes, row)}})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "verdict": self.verdict, "rule": self.rule,
                "evidence": self.evidence, "votes": self.votes, "slices_total": int(len(self.probabilities)),
                "slices_with_content": int(self.content.sum()), "suspicious_slices": self.suspicious,
                "key_slice": self.key_slice,
                "shape_zyx": list(self.shape), "spacing_mm": list(self.spacing),
                "window": list(self.window), "montage": self.montage, "slices": self.slice_rows()}

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["slice", "content", "label", "confidence", *self.classes])
        for row in self.slice_rows():
            writer.writerow([row["slice"], int(row["content"]), row["label"], f"{row['confidence']:.6f}",
                             *(f"{row['probabilities'][c]:.6f}" for c in self.classes)])
        return buffer.getvalue()


def content_mask(slices: np.ndarray) -> np.ndarray:
    """True for slices where at least 5 % of the pixels are above 10 % of the window."""
    return (slices > CONTENT_LEVEL).mean(axis=(1, 2)) >= CONTENT_FRACTION


def decide(probabilities: np.ndarray, classes, content: np.ndarray, rule: VerdictRule
           ) -> tuple[str, dict[str, int]]:
    """The verdict and the vote count per tumour class (classes with no vote are left out)."""
    normal = no_tumour_class(classes)
    tumour = [k for k, name in enumerate(classes) if name != normal]
    predicted = probabilities.argmax(axis=1)
    confident = probabilities.max(axis=1) >= rule.threshold
    votes = {classes[k]: int(np.sum(content & confident & (predicted == k))) for k in tumour}
    votes = {name: count for name, count in votes.items() if count}
    if not votes or max(votes.values()) < rule.min_slices:
        return (normal or NO_FINDING), votes

    def strength(name: str) -> tuple[int, float]:
        k = classes.index(name)
        return votes[name], float(probabilities[content, k].max())

    return max(votes, key=strength), votes


def most_suspicious(probabilities: np.ndarray, classes, content: np.ndarray, verdict: str, count: int
                    ) -> tuple[list[int], int]:
    """Up to ``count`` content slices with the highest probability of the verdict (or of any tumour class), in
    slice order, and the single most suspicious one."""
    normal = no_tumour_class(classes)
    if verdict in classes and verdict != normal:
        score = probabilities[:, classes.index(verdict)]
    else:
        tumour = [k for k, name in enumerate(classes) if name != normal]
        score = probabilities[:, tumour].max(axis=1) if tumour else probabilities.max(axis=1)
    candidates = np.flatnonzero(content) if content.any() else np.arange(len(score))
    ranked = candidates[np.argsort(-score[candidates], kind="stable")][:count]
    return sorted(int(i) for i in ranked), int(ranked[0])


def classify_volume(classifier, volume: Volume, rule: VerdictRule | None = None, *, batch_size: int = 32,
                    montage_slices: int = 6) -> VolumeResult:
    """Classify every axial slice of ``volume`` with the 2-D model and decide the volume's verdict."""
    rule = rule or VerdictRule()
    images = volume.images()
    rows = []
    for start in range(0, len(images), batch_size):
        import torch

        batch = torch.stack([classifier.preprocess(image) for image in images[start:start + batch_size]])
        rows.append(classifier.predict_proba(batch))
    probabilities = np.concatenate(rows) if rows else np.zeros((0, len(classifier.classes)))
    content = content_mask(volume.slices)
    classes = list(classifier.classes)
    verdict, votes = decide(probabilities, classes, content, rule)
    suspicious, key_slice = most_suspicious(probabilities, classes, content, verdict, montage_slices)
    return VolumeResult(
        source=volume.source, kind=volume.kind, classes=classes, probabilities=probabilities, content=content,
        verdict=verdict, rule=rule.describe(no_tumour_class(classes)), votes=votes,
        suspicious=suspicious, key_slice=key_slice,
        shape=tuple(int(s) for s in volume.slices.shape), spacing=volume.spacing, window=volume.window)


def explained_class(result: VolumeResult) -> str | None:
    """The class Grad-CAM explains for a volume: its tumour verdict, else each slice's predicted class (None)."""
    return result.verdict if result.verdict in result.classes and \
        result.verdict != no_tumour_class(result.classes) else None


def montage_image(classifier, volume: Volume, result: VolumeResult):
    """Grad-CAM montage of the most suspicious slices (explaining the verdict class when it is a tumour class)."""
    from braintumor.visualize.explain import explain
    from braintumor.visualize.figures import gradcam_montage

    target = explained_class(result)
    images = volume.images()
    explanations = explain(classifier, [images[i] for i in result.suspicious], target=target)
    titles = [f"slice {i}: {e.predicted} {e.probability:.2f}" for i, e in zip(result.suspicious, explanations)]
    title = (f"{Path(result.source).name}: verdict {result.verdict} ({result.evidence})\n"
             f"rule: {result.rule}")
    return gradcam_montage(explanations, titles, title)


def write_volume_outputs(classifier, volume: Volume, result: VolumeResult, out_dir, *,
                         montage: bool = True) -> list[Path]:
    """``<stem>_slices.csv``, ``<stem>_volume.json`` and (with Grad-CAM) ``<stem>_montage.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", volume.stem).strip("_") or "volume"
    written = []
    if montage and result.suspicious:
        picture = montage_image(classifier, volume, result)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        path = atomic_write(out / f"{stem}_montage.png", lambda handle: handle.write(buffer.getvalue()))
        result.montage = path.name
        written.append(path)
    text = result.csv_text()
    written.append(atomic_write(out / f"{stem}_slices.csv", lambda handle: handle.write(text), "w"))
    data = json.dumps(result.to_dict(), indent=2)
    written.append(atomic_write(out / f"{stem}_volume.json", lambda handle: handle.write(data), "w"))
    return written
