"""The one status every prediction carries, and the one cut-off of the trust scores.

Every surface (CLI table/CSV/JSON, evaluate's predictions.csv, the server, the Python ``Prediction``) reads a
slice's status from :func:`status_of`; nothing else compares a trust score with a number.

- ``not_mri``: the input is not a brain MR slice (or something in it, its weights or its output is not finite).
  The slice gets no class.
- ``uncertain``: the calibrated confidence is below the ``--min-confidence`` asked for. No class is shown.
- ``atypical``: a brain MR slice unlike the training data. It keeps its class and probabilities, with a warning.
- ``ok``: none of the above.

The trust scores come out of the model already divided by their thresholds (the ``atypical`` one by the
threshold of the predicted class: Mondrian conformal), so a score above :data:`FLAG_AT` flags its tier for any
model.
"""

from __future__ import annotations

import math

FLAG_AT = 1.0  # a normalized trust score above this flags its tier
OK, ATYPICAL, NOT_MRI, UNCERTAIN = "ok", "atypical", "not_mri", "uncertain"
STATUSES = (OK, ATYPICAL, NOT_MRI, UNCERTAIN)
# Statuses under which a slice is shown without a class (its probabilities stay available on request).
WITHHELD = (NOT_MRI, UNCERTAIN)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def status_of(confidence: float, not_mri_score: float | None = None, atypical_score: float | None = None,
              min_confidence: float = 0.0) -> str:
    """The status of one slice from its calibrated confidence and its two normalized trust scores (None: the
    model has no such tier). Anything non-finite is ``not_mri``: NaN never passes as ``ok``."""
    if not (math.isfinite(confidence) and _finite(not_mri_score) and _finite(atypical_score)):
        return NOT_MRI
    if not_mri_score is not None and not_mri_score > FLAG_AT:
        return NOT_MRI
    if confidence < min_confidence:
        return UNCERTAIN
    if atypical_score is not None and atypical_score > FLAG_AT:
        return ATYPICAL
    return OK
