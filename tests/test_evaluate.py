"""evaluate.py: a checkpoint on a folder, with the leak-free subset reported beside the full set."""

from __future__ import annotations

import json
import shutil

import pytest

from braintumor.evaluate import evaluate_checkpoint
from braintumor.errors import UserError
from braintumor.phantom import write_phantom_set


@pytest.fixture(scope="module")
def planted_leak(phantom_dir, tmp_path_factory):
    """A test folder of 8 new phantoms plus 4 slices copied from the training folder (the planted leak)."""
    test = write_phantom_set(tmp_path_factory.mktemp("test"), per_class=2, size=64, seed=999)
    for name in ("glioma", "pituitary"):
        for index in (0, 1):
            source = phantom_dir / name / f"{name}_{index:04d}.png"
            shutil.copy(source, test / name / f"leaked_{index}.png")
    return test


def test_full_and_leak_free_metrics_side_by_side(tiny_checkpoint, phantom_dir, planted_leak, tmp_path):
    result = evaluate_checkpoint(tiny_checkpoint, planted_leak, tmp_path, device="cpu",
                                 exclude_duplicates_of=str(phantom_dir))
    assert result["metrics"]["n"] == 12
    assert set(result["subsets"]) == {"full set", "leak-free subset"}
    assert result["subsets"]["leak-free subset"]["n"] == 8
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extra"]["leak check"].startswith("4 of 12 images are exact or near duplicates")
    assert report["subsets"]["leak-free subset"]["n"] == 8
    markdown = (tmp_path / "report.md").read_text()
    assert "| Metric | full set | leak-free subset |" in markdown


def test_without_a_leak_check_there_are_no_subsets(tiny_checkpoint, planted_leak, tmp_path):
    result = evaluate_checkpoint(tiny_checkpoint, planted_leak, tmp_path, device="cpu")
    assert result["subsets"] == {} and result["metrics"]["n"] == 12
    assert sum(row["support"] for row in result["metrics"]["per_class"].values()) == 12


def test_folder_classes_must_belong_to_the_model(tiny_checkpoint, tmp_path):
    other = write_phantom_set(tmp_path / "data", per_class=1, size=32, classes=("glioma", "notumor"))
    (other / "glioma").rename(other / "astrocytoma")
    with pytest.raises(UserError, match="not among the model's classes: astrocytoma"):
        evaluate_checkpoint(tiny_checkpoint, other, tmp_path / "out", device="cpu")
