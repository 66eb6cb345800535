"""Predictions written out as they are made: an interruption keeps every finished batch; bad files skipped or fatal."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO

import torch

from braintumor.errors import UserError
from braintumor.data.io import ImageReadError
from braintumor.inference.classifier import Classifier, Prediction


NOT_RECOGNISED = "not recognised as a brain MRI slice like the training data"
# What the table shows instead of a class for a slice that should not get one (its probabilities stay).
SHOWN_STATUS = {"out_of_distribution": "NOT RECOGNISED", "low_confidence": "uncertain"}


class PredictionWriter:
    """Table, CSV or JSON rows written and flushed one prediction at a time (JSON: an array, closed by close()).

    An out-of-distribution or low-confidence slice shows no class in the table's prediction column, with a legend
    at the end; CSV and JSON carry ``status``, ``out_of_distribution`` and ``ood_score`` for every slice."""

    def __init__(self, out: IO[str], classifier: Classifier, fmt: str = "table", width: int = 5):
        self.out, self.classifier, self.fmt, self.width = out, classifier, fmt, max(5, width)
        self.classes = list(classifier.classes)
        self.count = 0
        self.statuses: set[str] = set()
        if fmt == "csv":
            self._csv = csv.writer(out)
            self._csv.writerow(["source", "label", "confidence", *self.classes, "status", "ood_score",
                                "out_of_distribution"])
        elif fmt == "table":
            out.write(f"{'image':<{self.width}}  {'prediction':<14} "
                      + " ".join(f"{c[:10]:>10}" for c in self.classes) + f" {'ood_score':>9}\n")
        elif fmt == "json":
            out.write("[")
        out.flush()

    def write(self, p: Prediction) -> None:
        self.statuses.add(p.status)
        if self.fmt == "csv":
            self._csv.writerow([p.source, p.label, f"{p.confidence:.6f}",
                                *(f"{p.probabilities[c]:.6f}" for c in self.classes), p.status,
                                "" if p.ood_score is None else f"{p.ood_score:.4f}",
                                "" if p.out_of_distribution is None else str(p.out_of_distribution).lower()])
        elif self.fmt == "json":
            text = json.dumps(p.to_dict(), indent=2).replace("\n", "\n  ")
            self.out.write(("," if self.count else "") + "\n  " + text)
        else:
            score = "n/a" if p.ood_score is None else f"{p.ood_score:.2f}"
            self.out.write(f"{p.source:<{self.width}}  {SHOWN_STATUS.get(p.status, p.label):<14} "
                           + " ".join(f"{p.probabilities[c]:>10.4f}" for c in self.classes) + f" {score:>9}\n")
        self.count += 1
        self.out.flush()

    def write_record(self, record: dict) -> None:
        """Another JSON object in the array (e.g. a volume's verdict); only the JSON format has room for it."""
        if self.fmt == "json":
            text = json.dumps(record, indent=2).replace("\n", "\n  ")
            self.out.write(("," if self.count else "") + "\n  " + text)
            self.count += 1
            self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.count else "]\n")
        elif self.fmt == "table":
            if "out_of_distribution" in self.statuses:
                self.out.write(f"NOT RECOGNISED: {NOT_RECOGNISED} (ood_score above 1); its probabilities mean "
                               "nothing\n")
            if "low_confidence" in self.statuses:
                self.out.write(f"uncertain: highest probability below --min-confidence "
                               f"{self.classifier.min_confidence:g}\n")
            if not self.classifier.has_ood:
                self.out.write("note: this model has no out-of-distribution detector; run `braintumor calibrate` "
                               "on it\n")
        self.out.flush()


def stream_predictions(classifier: Classifier, paths: list[Path], writer: PredictionWriter, *,
                       batch_size: int = 32, skip_bad: bool = False) -> list[tuple[str, str]]:
    """Predict ``paths`` in batches, writing each batch as soon as it is done; returns the skipped files. The
    caller closes ``writer`` (more records may follow).

    Without ``skip_bad`` the first unreadable file ends the run with a UserError naming it (what was written so
    far stays written); with it, unreadable files are skipped and returned as (path, reason).
    """
    skipped: list[tuple[str, str]] = []
    for start in range(0, len(paths), batch_size):
        tensors, sources = [], []
        for path in paths[start:start + batch_size]:
            try:
                tensors.append(classifier.preprocess(classifier.load(path)))
                sources.append(str(path))
            except ImageReadError as err:
                if not skip_bad:
                    done = f" after {writer.count} prediction(s)" if writer.count else ""
                    raise UserError(f"{err}{done}; rerun with --skip-bad to skip unreadable files") from None
                skipped.append((str(path), err.reason))
        if tensors:
            for prediction in classifier.predict_batch(torch.stack(tensors), sources):
                writer.write(prediction)
    if not writer.count:
        raise UserError(f"none of the {len(paths)} file(s) could be read")
    return skipped
