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
    assert "- Trust tiers: none (the model has no fitted trust scores" in markdown  # an untrained tiny checkpoint


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
    assert list(rows[0]) == ["source", "predicted_class", "confidence", *(f"p_{c}" for c in classes), "status",
                             "not_mri_score", "atypical_score", "true_class", "correct", "loss",
                             "duplicate_of_train", "group"]
    assert sorted(row["source"].rsplit("/", 1)[-1] for row in rows if row["duplicate_of_train"] == "true") == \
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
    from braintumor.evaluation.evaluate import evaluate_classifier, file_batches, infer_batches
    from braintumor.inference.service import run_batches
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
    evaluated = run_batches(classifier, file_batches(classifier, paths, batch_size=8))[0].views
    assert seen_labels.tolist() == labels and len(views) == len(evaluated) == (2 if tta else 1)
    for ours, theirs in zip(views, evaluated):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    probabilities = np.mean([torch.softmax(torch.from_numpy(v), 1).numpy() for v in views], axis=0)
    assert (probabilities.argmax(1) == classifier.probabilities(evaluated).argmax(1)).all()
    report = evaluate_classifier(classifier, paths, labels, tmp_path / "report", batch_size=8)
    assert report["metrics"]["accuracy"] == trainer.validate()["val_accuracy"]


@pytest.mark.slow
def test_predictions_csv_carries_the_status_and_metrics_count_it_per_status_and_class(tmp_path):
    """A trusted model on phantoms and a photo-like image: predictions.csv in the results schema, status per row,
    metrics.trust counts them (accuracy per status, flag rate per class and tier); a file name with a line
    break and one that is not valid UTF-8 stay one row each."""
    import csv
    import os

    import numpy as np
    from PIL import Image

    from helpers import make_trusted_checkpoint

    checkpoint = make_trusted_checkpoint(tmp_path / "trusted.pt", image_size=32)
    data = write_phantom_set(tmp_path / "data", per_class=2, size=32, seed=3)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        data / "glioma" / "line\nbreak.png")
    odd = os.fsencode(str(data / "notumor")) + b"/caf\xe9.png"
    with open(odd, "wb") as handle:
        Image.new("RGB", (32, 32), "white").save(handle, format="PNG")
    result = evaluate_checkpoint(checkpoint, data, tmp_path / "out", device="cpu", batch_size=4)
    with open(tmp_path / "out" / "predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result["metrics"]["n"] == 10
    assert sum(row["source"].endswith("line\nbreak.png") for row in rows) == 1
    assert any(os.fsencode(row["source"]) == odd for row in rows)
    trust = result["metrics"]["trust"]
    assert trust["tiers"] == ["not_mri", "atypical"]
    assert sum(trust["statuses"].values()) == 10
    assert trust["statuses"] == {status: sum(row["status"] == status for row in rows)
                                 for status in ("ok", "atypical", "not_mri", "uncertain")}
    for status, accuracy in trust["accuracy_by_status"].items():
        members = [row for row in rows if row["status"] == status]
        assert accuracy == (None if not members else pytest.approx(np.mean([r["correct"] == "true" for r in members])))
    assert set(trust["flag_rate_by_class"]["glioma"]) == {"atypical", "not_mri", "uncertain"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "flag_rate_per_class" in report["extra"] and report["trust"]["statuses"] == trust["statuses"]
    whole = (tmp_path / "out" / "report.md").read_text()
    assert whole.count(f"ok {trust['statuses']['ok']} (") == 1  # the statuses once, in the summary, not again in Notes
    summary = (tmp_path / "out" / "report.md").read_text().split("## Per class")[0]
    counts = trust["statuses"]
    assert (f"- Status of the slices: ok {counts['ok']} ({counts['ok'] / 10:.1%}), atypical {counts['atypical']} "
            f"({counts['atypical'] / 10:.1%}), not_mri {counts['not_mri']} ({counts['not_mri'] / 10:.1%})") in summary


def test_report_notes_say_a_class_without_slices_has_no_flag_rates():
    from braintumor.evaluation.evaluate import _trust_notes

    trust = {"flag_rate_by_class": {"glioma": {"atypical": 0.25, "not_mri": 0.0, "uncertain": None},
                                    "pituitary": {"atypical": None, "not_mri": None, "uncertain": None}}}
    notes = _trust_notes(trust, ("not_mri", "atypical"))
    assert notes["flag rate per class"] == "glioma: atypical 25.0%, not_mri 0.0%; pituitary: no slices"
