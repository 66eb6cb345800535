"""How far can trained models go on their validation split, alone and averaged? An error-floor check.

Every MODEL is either a training run folder, whose ``predictions.csv`` holds its validation predictions as training
wrote them, or a checkpoint (a ``.pt`` file or ``reference``), which is run on the first run folder's validation
slices (so at least one run folder is needed, and every run folder must hold the same slices). Reported:

  each model      its accuracy and errors on the slices
  ensembles       the mean of the members' probabilities, for every combination of 2 .. --max-size models (the
                  best --top of each size): the accuracy that distilling from that ensemble of teachers starts from
  floor           the slices that every model gets wrong, with the classes they called instead, and the ceiling: the
                  accuracy of a model right on every slice but these (an ensemble of them can still be right on one
                  where their wrong calls differ)

Only validation predictions are read: no test data, and nothing here trains or chooses weights for a shipped model.
Models meant to be compared must share one split (same data folder and split seed); the script checks that the
run folders hold the same slices, not how they were split.

    python benchmarks/val_ensemble.py runs/zoom192-s0 runs/distill-zoom128-s0 reference runs/reference-teacher.pt \\
        [--max-size 3] [--top 5] [--json out.json]

The Markdown tables go to stdout (or JSON with ``--json -``), progress to stderr.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from braintumor.errors import UserError
from braintumor.utils.jsonfiles import emit_report
from braintumor.utils.outputs import refuse_overwrites


class Slices(NamedTuple):
    """The validation slices of a run folder: their files and true classes, in the file's order."""

    sources: list[str]
    truth: list[str]


def read_run(folder: Path) -> tuple[Slices, list[str], np.ndarray]:
    """(slices, classes, probabilities (N, C)) of a run folder's ``predictions.csv``."""
    path = folder / "predictions.csv"
    if not path.is_file():
        raise UserError(f"{folder}: no predictions.csv (a training run folder writes one at its end)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        classes = [name[2:] for name in reader.fieldnames or () if name.startswith("p_")]
        if not classes or not {"source", "true_class"} <= set(reader.fieldnames or ()):
            raise UserError(f"{path}: not a validation predictions.csv (needs source, true_class and p_* columns)")
        rows = list(reader)
    probabilities = np.array([[float(row[f"p_{c}"]) for c in classes] for row in rows], dtype=np.float64)
    return Slices([row["source"] for row in rows], [row["true_class"] for row in rows]), classes, probabilities


def predict_checkpoint(checkpoint: str, slices: Slices, classes: list[str]) -> np.ndarray:
    """A checkpoint's probabilities on the slices, in ``classes`` order (its own settings: size, TTA)."""
    from braintumor.inference.classifier import Classifier

    classifier = Classifier.from_checkpoint(checkpoint)
    if sorted(classifier.classes) != sorted(classes):
        raise UserError(f"{checkpoint}: classes {', '.join(classifier.classes)} differ from the runs' "
                        f"{', '.join(classes)}")
    predictions = classifier.predict(slices.sources, batch_size=64)
    return np.array([[p.probabilities[c] for c in classes] for p in predictions], dtype=np.float64)


def load_models(models: list[str]) -> tuple[Slices, list[str], dict[str, np.ndarray]]:
    """Every model's probabilities on one set of validation slices, the run folders' order of classes."""
    runs = [m for m in models if Path(m).is_dir()]
    if not runs:
        raise UserError("give at least one training run folder: its predictions.csv names the validation slices")
    slices, classes, _ = read_run(Path(runs[0]))
    order = {source: i for i, source in enumerate(slices.sources)}
    probabilities: dict[str, np.ndarray] = {}
    for model in models:
        if model in probabilities:
            raise UserError(f"{model} is named twice")
        if Path(model).is_dir():
            theirs, their_classes, p = read_run(Path(model))
            if sorted(theirs.sources) != sorted(slices.sources) or their_classes != classes:
                raise UserError(f"{model}: its validation slices or classes differ from {runs[0]}'s "
                                "(the models must share one split)")
            p = p[np.argsort([order[s] for s in theirs.sources])]
        else:
            print(f"predicting {len(slices.sources)} slices with {model}", file=sys.stderr)
            p = predict_checkpoint(model, slices, classes)
        probabilities[model] = p
    return slices, classes, probabilities


def summarize(slices: Slices, classes: list[str], probabilities: dict[str, np.ndarray], max_size: int = 3,
              top: int = 5) -> dict:
    """Each model's and the best ensembles' accuracy, and the floor of slices every model gets wrong."""
    truth = np.array([classes.index(t) for t in slices.truth])
    n = len(truth)

    def scored(names: tuple[str, ...]) -> dict:
        mean = np.mean([probabilities[name] for name in names], axis=0)
        errors = int((mean.argmax(1) != truth).sum())
        return {"models": list(names), "accuracy": 1 - errors / n, "errors": errors}

    names = list(probabilities)
    singles = [scored((name,)) for name in names]
    ensembles = {}
    for size in range(2, min(max_size, len(names)) + 1):
        ranked = sorted((scored(combo) for combo in itertools.combinations(names, size)),
                        key=lambda row: (row["errors"], row["models"]))
        ensembles[size] = ranked[:top]
    wrong = np.array([probabilities[name].argmax(1) != truth for name in names])
    floor = [{"source": slices.sources[i], "true_class": slices.truth[i],
              "predicted": {name: classes[int(probabilities[name][i].argmax())] for name in names}}
             for i in np.flatnonzero(wrong.all(axis=0))]
    return {"slices": n, "classes": classes, "models": singles, "ensembles": ensembles, "floor": floor,
            "ceiling": 1 - len(floor) / n}


def markdown(summary: dict) -> str:
    n = summary["slices"]
    lines = [f"Validation slices: {n}", "", "| model | accuracy | errors |", "|---|---|---|"]
    lines += [f"| {row['models'][0]} | {100 * row['accuracy']:.2f} % | {row['errors']} |" for row in summary["models"]]
    for size, rows in summary["ensembles"].items():
        lines += ["", f"Best ensembles of {size} (mean of probabilities):", "",
                  "| models | accuracy | errors |", "|---|---|---|"]
        lines += [f"| {' + '.join(row['models'])} | {100 * row['accuracy']:.2f} % | {row['errors']} |" for row in rows]
    lines += ["", f"Wrong under every model: {len(summary['floor'])} slices "
                  f"(ceiling {100 * summary['ceiling']:.2f} %: all right but these)", ""]
    if summary["floor"]:
        lines += ["| slice | true class | called |", "|---|---|---|"]
        for row in summary["floor"]:
            calls = sorted(set(row["predicted"].values()))
            shown = "/".join(Path(row["source"]).parts[-2:])  # class folder and file, as in the audit
            lines.append(f"| {shown} | {row['true_class']} | {', '.join(calls)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="a run folder (predictions.csv) or a checkpoint")
    parser.add_argument("--max-size", type=int, default=3, help="largest ensemble (default: 3)")
    parser.add_argument("--top", type=int, default=5, help="best ensembles shown per size (default: 5)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout, no table)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file (default: refuse)")
    args = parser.parse_args(argv)
    try:
        refuse_overwrites({"--json": args.json}, args.overwrite)
        if args.max_size < 1 or args.top < 1:
            raise UserError("--max-size and --top must be at least 1")
        summary = summarize(*load_models(args.models), max_size=args.max_size, top=args.top)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return emit_report(summary, args.json, markdown)


if __name__ == "__main__":
    sys.exit(main())
