"""evaluate.py: a checkpoint on a folder, with the leak-free subset reported beside the full set."""

from __future__ import annotations

import json
import shutil

import pytest

from braintumor.evaluation.evaluate import evaluate_checkpoint
from braintumor.errors import UserError
from braintumor.synthetic.phantom import write_phantom_set


@pytest.fixture(scope="module")
def planted_leak(phantom_dir, tmp_path_factory):
    """A test folder of 8 new phantoms plus 4 slices copied from the training folder (the planted leak)."""
    test = write_phantom_set(tmp_path_factory.mktemp("test"), per_class=2, size=64, seed=999)
    for name in ("glioma", "pituitary"):
        for index in (0, 1):
            source = phantom_dir / name / f"{name}_{index:04d}.png"
            shutil.copy(source, test / name / f"leaked_{index}.png")
    return test


@pytest.mark.slow
def test_full_and_leak_free_metrics_side_by_side(tiny_checkpoint, phantom_dir, planted_leak, tmp_path):
    result = evaluate_checkpoint(tiny_checkpoint, planted_leak, tmp_path, device="cpu",
                                 exclude_duplicates_of=str(phantom_dir))
    assert result["metrics"]["n"] == 12
    assert set(result["subsets"]) == {"full set", "leak-free subset"}
    assert result["subsets"]["leak-free subset"]["n"] == 8
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extra"]["leak_check"].startswith("4 of 12 images are exact or near duplicates")
    assert report["subsets"]["leak_free_subset"]["n"] == 8
    markdown = (tmp_path / "report.md").read_text()
    assert "| Metric | full set | leak-free subset |" in markdown


@pytest.mark.slow
def test_without_a_leak_check_there_are_no_subsets(tiny_checkpoint, planted_leak, tmp_path):
    result = evaluate_checkpoint(tiny_checkpoint, planted_leak, tmp_path, device="cpu")
    assert result["subsets"] == {} and result["metrics"]["n"] == 12
    assert sum(row["support"] for row in result["metrics"]["per_class"].values()) == 12


def test_folder_classes_must_belong_to_the_model(tiny_checkpoint, tmp_path):
    other = write_phantom_set(tmp_path / "data", per_class=1, size=32, classes=("glioma", "notumor"))
    (other / "glioma").rename(other / "astrocytoma")
    with pytest.raises(UserError, match="not among the model's classes: astrocytoma"):
        evaluate_checkpoint(tiny_checkpoint, other, tmp_path / "out", device="cpu")


@pytest.mark.slow
def test_predictions_csv_rows_match_the_reports_counts(tiny_checkpoint, phantom_dir, planted_leak, tmp_path):
    import csv

    evaluate_checkpoint(tiny_checkpoint, planted_leak, tmp_path, device="cpu", exclude_duplicates_of=str(phantom_dir))
    report = json.loads((tmp_path / "report.json").read_text())
    with open(tmp_path / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    classes = report["classes"]
    assert len(rows) == report["n"] == 12
    counts = [[0] * len(classes) for _ in classes]
    for row in rows:
        counts[classes.index(row["true_class"])][classes.index(row["predicted_class"])] += 1
        assert sum(float(row[f"p_{name}"]) for name in classes) == pytest.approx(1.0, abs=1e-4)
        assert (row["correct"] == "true") == (row["true_class"] == row["predicted_class"])
    assert counts == report["confusion_matrix"]
    assert sum(row["correct"] == "true" for row in rows) == round(report["accuracy"] * report["n"])
    # The 4 planted copies are the rows marked as duplicates of a training image.
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in rows if row["duplicate_in_train"] == "true") == \
        ["leaked_0.png", "leaked_0.png", "leaked_1.png", "leaked_1.png"]
    # Per-class sensitivity/specificity, an exact accuracy interval, snake_case keys, and the figures.
    glioma = report["per_class"]["glioma"]
    assert glioma["sensitivity"] == glioma["recall"] and 0 <= glioma["specificity"] <= 1
    assert "Clopper-Pearson" in report["intervals"]["accuracy_ci95"]
    assert all(key == key.lower() and " " not in key for key in report["extra"])
    wrong = sum(row["correct"] == "false" for row in rows)
    assert (tmp_path / "roc_curves.png").stat().st_size > 1000
    assert (tmp_path / "worst_mistakes.png").is_file() == (wrong > 0)
    markdown = (tmp_path / "report.md").read_text()
    assert "(roc_curves.png)" in markdown and "Specificity" in markdown


@pytest.mark.slow
@pytest.mark.parametrize("data_cache, tta", [("none", False), ("memory", True)])
def test_training_validation_and_evaluate_run_one_routine_on_identical_tensors(phantom_dir, tmp_path, data_cache,
                                                                                tta):
    import numpy as np
    import torch

    from braintumor.models.checkpoint import save_checkpoint
    from braintumor.data.io import read_image
    from braintumor.evaluation.evaluate import evaluate_paths, infer_batches, infer_paths
    from braintumor.inference.classifier import Classifier
    from braintumor.training.trainer import Trainer
    from helpers import tiny_config

    cfg = tiny_config(phantom_dir, tmp_path / "run", data_cache=data_cache, val_split=0.5, tta=tta).validate()
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.cache_mode == data_cache and trainer.eval_net is trainer.net  # --compile reaches validation
    save_checkpoint(trainer.checkpoint_payload(0, []), tmp_path / "model.pt")
    classifier = Classifier.from_checkpoint(tmp_path / "model.pt", device="cpu")
    paths, labels = trainer.split.val_paths, trainer.split.val_labels
    assert len(paths) == 12  # 8 + 4: the last validation batch is padded

    # The same tensors: validation batches (DataLoader or decoded cache) and evaluate's preprocessing.
    trainer.model.eval()
    expected = torch.stack([classifier.preprocess(read_image(path)) for path in paths])
    assert torch.equal(torch.cat([images for images, _ in trainer.val_batches]), expected)

    # The same predictions, through the same loop, and the same accuracy in the metrics log and the report.
    views, _, seen_labels = infer_batches(trainer.validation_views, trainer.val_batches, len(trainer.classes))
    evaluated, _ = infer_paths(classifier, paths, batch_size=8)
    assert seen_labels.tolist() == labels and len(views) == len(evaluated) == (2 if tta else 1)
    for ours, theirs in zip(views, evaluated):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    probabilities = np.mean([torch.softmax(torch.from_numpy(v), 1).numpy() for v in views], axis=0)
    assert (probabilities.argmax(1) == classifier.probabilities(evaluated).argmax(1)).all()
    report = evaluate_paths(tmp_path / "model.pt", paths, labels, tmp_path / "report", device="cpu", batch_size=8)
    assert report["metrics"]["accuracy"] == trainer.validate()["val_accuracy"]
