"""Results written out: the one CSV writer (every CSV the tool writes), and predict's table/CSV/JSON on stdout.

CSV files follow RFC 4180 through the csv module: fields holding a comma, a quote, ``\\r`` or ``\\n`` are quoted,
rows end in ``\\r\\n``, so a file name with a line break stays one cell. Cells starting with ``=``, ``+``, ``-`` or
``@`` are **not** neutralised: the CSVs are data for pandas and the csv module, and a path must read back as
the same path (prefixing a quote would change it); open them in a spreadsheet with import-as-text. File names
that are not valid UTF-8 are written with their original bytes (``surrogateescape``), so
``os.fsencode(cell)`` gives the file's name back (pandas: ``encoding_errors="surrogateescape"``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from braintumor.inference.results import Prediction, csv_columns, csv_row
from braintumor.trust.status import ATYPICAL, NOT_MRI, UNCERTAIN
from braintumor.utils.atomic import atomic_write
from braintumor.utils.jsonfiles import to_json

NOT_RECOGNISED = "not recognised as a brain MRI slice like the training data"
# What the table's prediction column shows for a slice that gets no class (its probabilities stay).
SHOWN_STATUS = {NOT_MRI: "NOT RECOGNISED", UNCERTAIN: "uncertain"}


def csv_writer(out: IO[str]):
    """The one CSV dialect: csv module defaults (QUOTE_MINIMAL, ``\\r\\n``)."""
    return csv.writer(out)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv_writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file written atomically (UTF-8; names that are not valid UTF-8 keep their bytes)."""
    data = csv_text(header, rows).encode("utf-8", "surrogateescape")
    return atomic_write(path, lambda handle: handle.write(data))


def write_predictions_csv(path: str | os.PathLike, predictions: Sequence[Prediction], classes: Sequence[str], *,
                          volumes: bool = True, evaluation: bool = False) -> Path:
    """Predictions as a CSV file with the schema's columns (docs/schema.md)."""
    classes = list(classes)
    return write_csv(path, csv_columns(classes, volumes=volumes, evaluation=evaluation),
                     (csv_row(p, classes, volumes=volumes, evaluation=evaluation) for p in predictions))


class PredictionWriter:
    """``predict``'s stdout: a table, CSV or JSON, written as predictions are made.

    - table: one row per slice (a ``not_mri``/``uncertain`` slice shows no class) and one per volume (its verdict,
      the key slice's probabilities); legends go to stderr.
    - CSV: one header and one row per slice, volume slices included (``volume``, ``slice_index``); every row has
      every column. Volume verdicts are not rows: the caller reports them on stderr.
    - JSON: one array of slice objects and volume objects (:class:`VolumePrediction`), printed whole by
      :meth:`close`, so stdout holds a complete document or, after an error, nothing.
    """

    def __init__(self, out: IO[str], classes: Sequence[str], fmt: str = "table", width: int = 5,
                 err: IO[str] | None = None, min_confidence: float = 0.0):
        if fmt not in ("table", "csv", "json"):
            raise ValueError(f"unknown format {fmt!r}")
        self.out, self.fmt, self.width, self.err = out, fmt, max(5, width), err
        self.classes = list(classes)
        self.min_confidence = min_confidence
        self.count = 0
        self.statuses: set[str] = set()
        self.volumes = 0
        self._records: list[dict] = []
        if fmt == "csv":
            self._csv = csv_writer(out)
            self._csv.writerow(csv_columns(self.classes))
        elif fmt == "table":
            out.write(f"{'image':<{self.width}}  {'prediction':<14} " + " ".join(f"{c[:10]:>10}" for c in self.classes)
                      + f" {'status':>9} {'not_mri':>8} {'atypical':>8}\n")
        out.flush()

    def _table_row(self, source: str, shown: str, probabilities: dict, status: str, not_mri, atypical) -> None:
        def score(value):
            return "n/a" if value is None else f"{value:.2f}"

        self.out.write(f"{source:<{self.width}}  {shown:<14} "
                       + " ".join(f"{probabilities.get(c, float('nan')):>10.4f}" for c in self.classes)
                       + f" {status:>9} {score(not_mri):>8} {score(atypical):>8}\n")

    def write(self, p: Prediction) -> None:
        """One slice."""
        self.statuses.add(p.status)
        if self.fmt == "csv":
            self._csv.writerow(csv_row(p, self.classes))
        elif self.fmt == "json":
            self._records.append(p.to_dict())
        else:
            self._table_row(p.source, p.shown_class or SHOWN_STATUS.get(p.status, "-"), p.probabilities, p.status,
                            p.not_mri_score, p.atypical_score)
        self.count += 1
        self.out.flush()

    def write_volume(self, result) -> None:
        """One volume (a VolumeResult): its slices (CSV), one object (JSON), or one verdict row (table)."""
        summary = result.summary()
        self.statuses.add(summary.status)
        self.volumes += 1
        if self.fmt == "csv":
            for p in summary.slices:
                self._csv.writerow(csv_row(p, self.classes))
                self.count += 1
        elif self.fmt == "json":
            self._records.append(summary.to_dict())
            self.count += 1
        else:
            shown = SHOWN_STATUS[NOT_MRI] if summary.verdict is None else summary.verdict
            key = summary.slices[summary.key_slice] if summary.slices else None
            self._table_row(summary.source, shown, summary.probabilities, summary.status,
                            None if key is None else key.not_mri_score, None if key is None else key.atypical_score)
            self.count += 1
        self.out.flush()

    def legend(self, has_not_mri_tier: bool = True) -> list[str]:
        """Human lines explaining the table (for stderr)."""
        lines = []
        if self.fmt != "table":
            return lines
        if NOT_MRI in self.statuses:
            lines.append(f"NOT RECOGNISED (status not_mri): {NOT_RECOGNISED}; its probabilities mean nothing")
        if UNCERTAIN in self.statuses:
            lines.append(f"uncertain: highest probability below --min-confidence {self.min_confidence:g}")
        if ATYPICAL in self.statuses:
            lines.append("atypical: a brain MRI slice unlike the training data; its class is less reliable")
        if self.volumes:
            lines.append("a volume's row: its verdict and status, with the probabilities and scores of its key slice "
                         "(the most suspicious one), not of the volume")
        return lines

    def close(self) -> None:
        """Finish the document (JSON: the whole array)."""
        if self.fmt == "json":
            self.out.write(to_json(self._records))
        self.out.flush()
