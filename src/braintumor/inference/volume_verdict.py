"""Classify a volume slice by slice and summarise it: per-slice results, the volume's verdict and its rule.

The rule (``VerdictRule``), stated in every output:

- A slice *has content* when at least 5 % of its pixels are brighter than 10 % of the window; empty slices
  (air above and below the head) are classified and listed but never decide the verdict.
- A slice *votes* for a tumour class when the model predicts that class with probability ≥ ``threshold``
  (default 0.5) and the slice's status is ``ok`` or ``atypical`` (``not_mri`` and ``uncertain`` slices never vote).
- The verdict is the tumour class with the most votes, if it has at least ``min_slices`` (default 2); ties go
  to the class with the highest single-slice probability. Otherwise the verdict is the model's no-tumour class
  (a class named ``notumor``, ``no_tumor``, ``normal``, ``healthy``, …), or ``no tumour class found`` for a
  model without one.

Tumour classes are all classes except the no-tumour class. The most suspicious slices (shown in the montage)
are the content slices with the highest probability of the verdict class, or of any tumour class when the
verdict is no tumour.

The volume's status: ``not_mri`` (and no verdict) when at least half of its slices with content are not recognised
as brain MRI (noise, a photo, NaN voxels); ``atypical`` when most accepted content slices are atypical; else ``ok``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.data.volumes import Volume
from braintumor.inference.results import VolumePrediction
from braintumor.inference.writers import write_predictions_csv
from braintumor.trust.status import ATYPICAL, NOT_MRI, OK
from braintumor.utils.atomic import atomic_write
from braintumor.utils.jsonfiles import write_json

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
    """Per-slice predictions of one volume, its verdict and status (see :meth:`summary` for the schema)."""

    source: str
    kind: str
    classes: list[str]
    probabilities: np.ndarray  # (Z, C) calibrated
    content: np.ndarray  # bool (Z,)
    verdict: str | None
    rule: str
    votes: dict[str, int]
    suspicious: list[int]  # slice indices for the montage, in slice order
    key_slice: int  # the most suspicious slice (the page shows it)
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    window: tuple[float, float]
    predictions: list = field(default_factory=list)  # one Prediction per slice
    status: str = "ok"
    montage: str | None = field(default=None)

    @property
    def evidence(self) -> str:
        """One sentence: how many slices voted for the verdict (or for any tumour class)."""
        n = int(self.content.sum())
        if self.verdict is None:
            flagged = sum(1 for p, c in zip(self.predictions, self.content) if c and p.status == "not_mri")
            return f"{flagged} of {n} slices with content are not recognised as brain MRI"
        if self.verdict in self.votes:
            return f"{self.votes[self.verdict]} of {n} slices with content vote {self.verdict}"
        counted = ", ".join(f"{name} {count}" for name, count in self.votes.items()) or "none"
        return f"{n} slices with content; tumour votes: {counted}"

    def slice_predictions(self) -> list:
        """One ``Prediction`` per slice (source ``<volume>#slice<index>``, with ``volume`` and ``slice_index``)."""
        return list(self.predictions)

    def summary(self) -> VolumePrediction:
        """The volume in the results schema (plain types: JSON, the server's response model)."""
        key = self.predictions[self.key_slice] if self.predictions else None
        return VolumePrediction(
            source=self.source, kind=self.kind, verdict=self.verdict, status=self.status, rule=self.rule,
            evidence=self.evidence, votes=dict(self.votes), slices_total=int(len(self.probabilities)),
            slices_with_content=int(self.content.sum()), suspicious_slices=list(self.suspicious),
            key_slice=int(self.key_slice), confidence=float("nan") if key is None else key.confidence,
            probabilities={} if key is None else dict(key.probabilities),
            shape_zyx=[int(s) for s in self.shape], spacing_mm=[float(s) for s in self.spacing],
            window=[float(w) for w in self.window], content=[bool(c) for c in self.content],
            slices=list(self.predictions), montage=self.montage)

    def to_dict(self) -> dict[str, Any]:
        return self.summary().to_dict()


def content_mask(slices: np.ndarray) -> np.ndarray:
    """True for slices where at least 5 % of the pixels are above 10 % of the window."""
    return (slices > CONTENT_LEVEL).mean(axis=(1, 2)) >= CONTENT_FRACTION


def decide(probabilities: np.ndarray, classes, content: np.ndarray, rule: VerdictRule,
           accepted: np.ndarray | None = None) -> tuple[str, dict[str, int]]:
    """The verdict and the vote count per tumour class (classes with no vote are left out); only slices
    ``accepted`` (status ok or atypical; default all) vote."""
    normal = no_tumour_class(classes)
    tumour = [k for k, name in enumerate(classes) if name != normal]
    finite = np.isfinite(probabilities).all(axis=1)
    safe = np.where(finite[:, None], probabilities, 0.0)
    predicted = safe.argmax(axis=1)
    confident = finite & (safe.max(axis=1) >= rule.threshold)
    if accepted is not None:
        confident &= np.asarray(accepted, dtype=bool)
    votes = {classes[k]: int(np.sum(content & confident & (predicted == k))) for k in tumour}
    votes = {name: count for name, count in votes.items() if count}
    if not votes or max(votes.values()) < rule.min_slices:
        return (normal or NO_FINDING), votes

    def strength(name: str) -> tuple[int, float]:
        k = classes.index(name)
        return votes[name], float(safe[content, k].max())

    return max(votes, key=strength), votes


def most_suspicious(probabilities: np.ndarray, classes, content: np.ndarray, verdict: str, count: int
                    ) -> tuple[list[int], int]:
    """Up to ``count`` content slices with the highest probability of the verdict (or of any tumour class), in
    slice order, and the single most suspicious one."""
    normal = no_tumour_class(classes)
    probabilities = np.where(np.isfinite(probabilities), probabilities, 0.0)
    if verdict in classes and verdict != normal:
        score = probabilities[:, classes.index(verdict)]
    else:
        tumour = [k for k, name in enumerate(classes) if name != normal]
        score = probabilities[:, tumour].max(axis=1) if tumour else probabilities.max(axis=1)
    candidates = np.flatnonzero(content) if content.any() else np.arange(len(score))
    ranked = candidates[np.argsort(-score[candidates], kind="stable")][:count]
    return sorted(int(i) for i in ranked), int(ranked[0])


def volume_status(statuses: Sequence[str], content: np.ndarray) -> str:
    """``not_mri`` when at least half of the slices with content (all slices when none has content) are not
    recognised as brain MRI; else ``atypical`` when more than half of the accepted ones are atypical; else ``ok``."""
    statuses = np.asarray(list(statuses), dtype=object)
    considered = statuses[content] if content.any() else statuses
    if not len(considered):
        return NOT_MRI
    if np.mean(considered == NOT_MRI) >= 0.5:
        return NOT_MRI
    accepted = considered[np.isin(considered, (OK, ATYPICAL))]
    return ATYPICAL if len(accepted) and np.mean(accepted == ATYPICAL) > 0.5 else OK


def summarize_volume(volume: Volume, classes: list[str], predictions: list, rule: VerdictRule, *,
                     montage_slices: int = 6) -> VolumeResult:
    """The verdict of a volume from its slices' predictions (one per axial slice, in order)."""
    probabilities = (np.array([[p.probabilities[c] for c in classes] for p in predictions], dtype=np.float64)
                     if predictions else np.zeros((0, len(classes))))
    content = content_mask(volume.slices)
    statuses = [p.status for p in predictions]
    status = volume_status(statuses, content)
    accepted = np.isin(np.asarray(statuses, dtype=object), (OK, ATYPICAL))
    verdict, votes = decide(probabilities, classes, content, rule, accepted)
    if status == NOT_MRI:
        verdict = None
    suspicious, key_slice = (most_suspicious(probabilities, classes, content, verdict or "", montage_slices)
                             if len(predictions) else ([], 0))
    return VolumeResult(
        source=volume.source, kind=volume.kind, classes=classes, probabilities=probabilities, content=content,
        verdict=verdict, rule=rule.describe(no_tumour_class(classes)), votes=votes,
        suspicious=suspicious, key_slice=key_slice,
        shape=tuple(int(s) for s in volume.slices.shape), spacing=volume.spacing, window=volume.window,
        predictions=list(predictions), status=status)


def explained_class(result: VolumeResult) -> str | None:
    """The class Grad-CAM explains for a volume: its tumour verdict, else each slice's predicted class (None)."""
    return result.verdict if result.verdict in result.classes and \
        result.verdict != no_tumour_class(result.classes) else None


def montage_image(classifier, volume: Volume, result: VolumeResult, *, method: str | None = None,
                  layer: str | None = None, mirror: bool | None = None):
    """Explanation montage of the most suspicious slices (explaining the verdict class when it is a tumour class)
    by ``method`` at ``layer``, mirror-averaged or not (None: the defaults of ``visualize.explain``)."""
    from braintumor.visualize.explain import explain
    from braintumor.visualize.figures import gradcam_montage

    target = explained_class(result)
    images = volume.images()
    explanations = explain(classifier, [images[i] for i in result.suspicious], target=target, method=method,
                           layer=layer, mirror=mirror)
    titles = [f"slice {i}: {e.predicted} {e.probability:.2f}" for i, e in zip(result.suspicious, explanations)]
    title = (f"{Path(result.source).name}: verdict {result.verdict} ({result.evidence})\n"
             f"rule: {result.rule}")
    return gradcam_montage(explanations, titles, title)


def write_volume_outputs(classifier, volume: Volume, result: VolumeResult, out_dir, *,
                         montage: bool = True, method: str | None = None, layer: str | None = None,
                         mirror: bool | None = None) -> list[Path]:
    """``<stem>_slices.csv``, ``<stem>_volume.json`` and (with ``montage``) ``<stem>_montage.png``, the
    explanations of the most suspicious slices by ``method`` at ``layer``, in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", volume.stem).strip("_") or "volume"
    written = []
    if montage and result.suspicious:
        picture = montage_image(classifier, volume, result, method=method, layer=layer, mirror=mirror)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        path = atomic_write(out / f"{stem}_montage.png", lambda handle: handle.write(buffer.getvalue()))
        result.montage = path.name
        written.append(path)
    written.append(write_predictions_csv(out / f"{stem}_slices.csv", result.predictions, result.classes))
    written.append(write_json(out / f"{stem}_volume.json", result.to_dict()))
    return written
