"""Real MRI slices, when BRAINTUMOR_REAL_DATA points at a folder-per-class set (e.g. 10 slices per class of the
public Brain Tumor MRI data set); skipped otherwise. The data never ships with the repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from braintumor.cli import main

REAL_DATA = os.environ.get("BRAINTUMOR_REAL_DATA")
pytestmark = pytest.mark.skipif(not REAL_DATA, reason="set BRAINTUMOR_REAL_DATA to a folder-per-class MRI set")


def test_train_evaluate_predict_on_real_slices(tmp_path, capsys):
    data = Path(REAL_DATA)
    run_dir = tmp_path / "run"
    assert main(["train", str(data), "--arch", "resnet18", "--weights", "none", "--image-size", "64",
                 "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--workers", "0",
                 "--no-progress", "--out", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    classes = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))

    assert main(["evaluate", str(run_dir / "best.pt"), str(data), "--out", str(tmp_path / "eval"),
                 "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["classes"] == classes and report["n"] == sum(c["support"] for c in report["per_class"].values())

    capsys.readouterr()
    first_class = data / classes[0]
    assert main(["predict", str(run_dir / "best.pt"), str(first_class), "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert predictions and all(set(p["probabilities"]) == set(classes) for p in predictions)


def test_the_reference_model_classifies_real_slices(capsys):
    """`braintumor predict reference` on up to 5 slices per class: at least 90 % right (the shipped model's
    grouped-validation accuracy is in MODEL_CARD.md)."""
    data = Path(REAL_DATA)
    slices, truth = [], []
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.iterdir())[:5]:
            slices.append(str(path))
            truth.append(folder.name)
    capsys.readouterr()
    assert main(["predict", "reference", *slices, "--json"]) == 0
    predicted = [p["predicted_class"] for p in json.loads(capsys.readouterr().out)]
    correct = sum(p == t for p, t in zip(predicted, truth))
    assert correct >= 0.9 * len(slices), list(zip(truth, predicted))
