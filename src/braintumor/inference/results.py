"""The one results schema: what every surface (CLI table/CSV/JSON, evaluate's predictions.csv, the server's JSON,
the Python API) says about a slice and about a volume. Documented in docs/schema.md.

Field names here are the CSV column names, the JSON keys and the server's response-model fields; per-class
probabilities become CSV columns ``p_<class>``. The dataclasses hold plain Python types only, so FastAPI can use
them as response models. Non-finite numbers stay NaN in the Python object (honest) and become ``null`` in JSON
and empty cells in CSV; a slice whose probabilities are not finite has no ``predicted_class``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from braintumor.trust.status import WITHHELD
from braintumor.utils.jsonfiles import json_safe

__all__ = ["EVALUATION_FIELDS", "EvaluatedPrediction", "Prediction", "SLICE_FIELDS", "VOLUME_SLICE_FIELDS",
           "VolumePrediction", "csv_columns", "csv_row"]

# Schema order of the per-slice fields (the probabilities dict becomes p_<class> columns in its place).
SLICE_FIELDS = ("source", "predicted_class", "confidence", "probabilities", "status", "not_mri_score",
                "atypical_score")
VOLUME_SLICE_FIELDS = ("volume", "slice_index")
EVALUATION_FIELDS = ("true_class", "correct", "loss", "duplicate_of_train", "group")


@dataclass
class Prediction:
    """One slice: its most probable class, calibrated probabilities, trust scores and status.

    - ``predicted_class``: the most probable class (None when the probabilities are not finite). Surfaces that
      show one class per slice (the table, the page) withhold it when ``status`` is ``not_mri`` or
      ``uncertain`` (see :attr:`shown_class`); CSV/JSON always carry it, with the status beside it.
    - ``confidence``: the calibrated probability of ``predicted_class``.
    - ``probabilities``: every class's calibrated probability (temperature-scaled softmax, mirror-averaged
      when the model uses test-time augmentation).
    - ``status``: ``ok``, ``atypical``, ``not_mri`` or ``uncertain`` (:mod:`braintumor.trust.status`).
    - ``not_mri_score``, ``atypical_score``: the two trust tiers' normalized scores (> 1 flags the tier; None
      when the model has no such tier).
    - ``volume``, ``slice_index``: set for a slice of a volume (its source and axial index), else None.
    """

    source: str
    predicted_class: Optional[str]
    confidence: float
    probabilities: dict[str, float]
    status: str
    not_mri_score: Optional[float] = None
    atypical_score: Optional[float] = None
    volume: Optional[str] = None
    slice_index: Optional[int] = None

    @property
    def shown_class(self) -> str | None:
        """The class a one-class display shows: none for ``not_mri`` and ``uncertain`` slices."""
        return None if self.status in WITHHELD else self.predicted_class

    @property
    def label(self) -> str | None:
        """Deprecated (0.1 name): ``predicted_class``."""
        return self.predicted_class

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (non-finite numbers as None)."""
        return json_safe(dataclasses.asdict(self))


@dataclass
class EvaluatedPrediction(Prediction):
    """A slice of a labelled set (``braintumor evaluate``): the prediction plus its ground truth.

    ``correct``: ``predicted_class == true_class``; ``loss``: -log p(true class); ``duplicate_of_train``: it
    duplicates a training image (None without ``--exclude-duplicates-of``); ``group``: its patient/series group
    (None without groups).
    """

    true_class: Optional[str] = None
    correct: Optional[bool] = None
    loss: Optional[float] = None
    duplicate_of_train: Optional[bool] = None
    group: Optional[str] = None


@dataclass
class VolumePrediction:
    """One volume (NIfTI, DICOM series, multi-frame DICOM): its verdict, how it was reached, and every slice.

    ``verdict`` is a class name (None when the volume is ``not_mri``: most of its slices with content are not
    recognised as brain MRI); ``status`` is the volume's: ``not_mri`` as just said, ``atypical`` when most of
    its accepted content slices are atypical, else ``ok``. ``confidence`` and ``probabilities`` are those of
    the key slice (the most suspicious one), not of the volume.
    """

    source: str
    kind: str
    verdict: Optional[str]
    status: str
    rule: str
    evidence: str
    votes: dict[str, int]
    slices_total: int
    slices_with_content: int
    suspicious_slices: list[int]
    key_slice: int
    confidence: float
    probabilities: dict[str, float]
    shape_zyx: list[int]
    spacing_mm: list[float]
    window: list[float]
    content: list[bool]
    slices: list[Prediction] = field(default_factory=list)
    montage: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))


def csv_columns(classes, *, volumes: bool = True, evaluation: bool = False) -> list[str]:
    """The CSV header: the slice fields with ``p_<class>`` in place of ``probabilities``, then the volume and
    evaluation fields when asked for (every row has every column)."""
    columns = []
    for name in SLICE_FIELDS:
        columns.extend(f"p_{c}" for c in classes) if name == "probabilities" else columns.append(name)
    if volumes:
        columns.extend(VOLUME_SLICE_FIELDS)
    if evaluation:
        columns.extend(EVALUATION_FIELDS)
    return columns


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6f}" if math.isfinite(value) else ""
    return str(value)


def csv_row(prediction: Prediction, classes, *, volumes: bool = True, evaluation: bool = False) -> list[str]:
    """One CSV row in :func:`csv_columns` order (empty cells for None and non-finite numbers)."""
    row = [_cell(prediction.source), _cell(prediction.predicted_class), _cell(prediction.confidence),
           *(_cell(prediction.probabilities.get(c)) for c in classes), prediction.status,
           _cell(prediction.not_mri_score), _cell(prediction.atypical_score)]
    if volumes:
        row += [_cell(prediction.volume), _cell(prediction.slice_index)]
    if evaluation:
        row += [_cell(getattr(prediction, name, None)) for name in EVALUATION_FIELDS]
    return row

