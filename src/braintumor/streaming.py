"""Predictions written out as they are made: an interruption keeps every finished batch; bad files skipped or fatal."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO

import torch

from .errors import UserError
from .images import ImageReadError
from .predict import Classifier, Prediction


class PredictionWriter:
    """Table, CSV or JSON rows written and flushed one prediction at a time (JSON: an array, closed by close())."""

    def __init__(self, out: IO[str], classes: list[str], fmt: str = "table", width: int = 5):
        self.out, self.classes, self.fmt, self.width = out, list(classes), fmt, max(5, width)
        self.count = 0
        if fmt == "csv":
            self._csv = csv.writer(out)
            self._csv.writerow(["source", "label", "confidence", *self.classes])
        elif fmt == "table":
            out.write(f"{'image':<{self.width}}  {'prediction':<12} "
                      + " ".join(f"{c[:10]:>10}" for c in self.classes) + "\n")
        elif fmt == "json":
            out.write("[")
        out.flush()

    def write(self, p: Prediction) -> None:
        if self.fmt == "csv":
            self._csv.writerow([p.source, p.label, f"{p.confidence:.6f}",
                                *(f"{p.probabilities[c]:.6f}" for c in self.classes)])
        elif self.fmt == "json":
            text = json.dumps(p.to_dict(), indent=2).replace("\n", "\n  ")
            self.out.write(("," if self.count else "") + "\n  " + text)
        else:
            self.out.write(f"{p.source:<{self.width}}  {p.label:<12} "
                           + " ".join(f"{p.probabilities[c]:>10.4f}" for c in self.classes) + "\n")
        self.count += 1
        self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.count else "]\n")
            self.out.flush()


def stream_predictions(classifier: Classifier, paths: list[Path], writer: PredictionWriter, *,
                       batch_size: int = 32, skip_bad: bool = False) -> list[tuple[str, str]]:
    """Predict ``paths`` in batches, writing each batch as soon as it is done; returns the skipped files.

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
            for source, row in zip(sources, classifier.predict_proba(torch.stack(tensors))):
                writer.write(classifier._prediction(source, row))
    writer.close()
    if not writer.count:
        raise UserError(f"none of the {len(paths)} file(s) could be read")
    return skipped
