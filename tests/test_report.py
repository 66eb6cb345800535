"""Report files (JSON, markdown, PNGs), the terminal table, and atomic writes."""

import errno
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from braintumor.evaluation.metrics import compute_metrics
from braintumor.evaluation import report as reports
from braintumor.utils import atomic

# 3 present classes + 1 absent, 10 samples. Confusion matrix (rows true, columns predicted):
#   [[2, 1, 1, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
NAMES = ["glioma", "meningioma", "pituitary", "notumor"]


def one_hot_probs(y_pred, num_classes, confidence=0.7):
    """Probabilities whose argmax is y_pred; the rest spread evenly."""
    probs = np.full((len(y_pred), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(y_pred)), y_pred] = confidence
    return probs


def check_png(path, min_side=200):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side and max(image.size) < 4000


def test_write_report_files_json_markdown_and_images(tmp_path):
    probs = one_hot_probs(Y_PRED, 4)
    full = compute_metrics(Y_TRUE, Y_PRED, probs, NAMES, bootstrap=100)
    keep = [0, 1, 2, 4, 5, 7, 8]
    subset = compute_metrics(np.array(Y_TRUE)[keep], np.array(Y_PRED)[keep], probs[keep], NAMES,
                                      bootstrap=100)
    extra = {"checkpoint": tmp_path / "best.pt", "skipped bad files": [(tmp_path / "x.jpg", "truncated image")],
             "images/s": np.float32(12.5)}
    paths = reports.write_report(full, tmp_path / "out", title="Test report", extra=extra,
                                  subsets={"full set": full, "leak-free subset": subset})
    assert set(paths) == {"json", "markdown", "confusion_matrix", "reliability"}
    assert all(p.parent == tmp_path / "out" and p.is_file() for p in paths.values())
    report = json.loads(paths["json"].read_text())
    assert report["title"] == "Test report"
    for key in ("accuracy", "per_class", "confusion_matrix", "accuracy_ci95", "ece", "roc_auc", "macro_avg"):
        assert report[key] == pytest.approx(full[key]) if isinstance(full[key], float) else report[key] == full[key]
    assert report["subsets"]["leak_free_subset"]["n"] == 7  # JSON keys are snake_case
    assert report["extra"]["skipped_bad_files"] == [[str(tmp_path / "x.jpg"), "truncated image"]]
    assert report["extra"]["images_s"] == 12.5
    md = paths["markdown"].read_text()
    assert "# Test report" in md and "not a medical device" in md
    assert "| Class | Accuracy | Precision | Sensitivity (recall) | Specificity | F1 | Support | ROC-AUC |" in md
    assert "| glioma | 0.5000 | 0.6667 | 0.5000 | 0.8333 | 0.5714 | 4 | " in md
    assert "| notumor | n/a | n/a | n/a | 1.0000 | n/a | 0 | n/a |" in md
    assert "exact Clopper–Pearson" in md and "bootstrap over images (100 resamples" in md
    assert "| Metric | full set | leak-free subset |" in md and "| Images (n) | 10 | 7 |" in md
    assert "| glioma | 2 | 1 | 1 | 0 |" in md  # confusion matrix counts
    assert f"Accuracy: 0.6000 (95 % CI {full['accuracy_ci95'][0]:.4f}" in md
    assert "(confusion_matrix.png)" in md and "(reliability.png)" in md and "truncated image" in md
    check_png(paths["confusion_matrix"])
    check_png(paths["reliability"])
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert paths["json"].stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    assert plt.get_fignums() == []  # no pyplot figures left behind


def test_report_without_probabilities_or_ci_and_wide_confusion_matrix(tmp_path):
    names = [f"class_{i}" for i in range(10)]
    y = np.arange(40) % 10
    metrics = compute_metrics(y, (y + (np.arange(40) % 3 == 0)) % 10, None, names, bootstrap=0)
    paths = reports.write_report(metrics, tmp_path, title="No probabilities")
    assert set(paths) == {"json", "markdown", "confusion_matrix"}
    assert "n/a" in paths["markdown"].read_text()
    check_png(paths["confusion_matrix"], min_side=500)  # 10 classes get a bigger figure
    table = reports.format_table(metrics)
    assert all(name in table for name in names) and "macro avg" in table and "weighted avg" in table


def test_plot_reliability_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([2, 1], 50)
    path = reports.plot_reliability(probs, rng.integers(0, 2, 50), tmp_path / "r.png", n_bins=10)
    check_png(path)


def test_failed_write_keeps_previous_report_intact(tmp_path, monkeypatch):
    metrics = compute_metrics(Y_TRUE, Y_PRED, one_hot_probs(Y_PRED, 4), NAMES, bootstrap=0)
    (tmp_path / "report.json").write_text('{"old": true}')
    original = atomic._WriteErrors.write

    def write_half_then_fail(self, payload):  # half the file reaches the disk, then the disk is full
        if self.target.name == "report.json":
            original(self, payload[:len(payload) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, payload)

    monkeypatch.setattr(atomic._WriteErrors, "write", write_half_then_fail)
    with pytest.raises(OSError, match="cannot write .*report.json.*No space left"):
        reports.write_report(metrics, tmp_path, title="t")
    assert json.loads((tmp_path / "report.json").read_text()) == {"old": True}
    assert not list(tmp_path.glob(".*.tmp"))


def test_format_table_lines():
    metrics = compute_metrics(Y_TRUE, Y_PRED, one_hot_probs(Y_PRED, 4), NAMES, bootstrap=50)
    lines = reports.format_table(metrics).splitlines()
    assert lines[0].split() == ["accuracy", "precision", "recall", "f1", "support", "roc_auc"]
    glioma = lines[1].split()
    assert glioma[0] == "glioma" and glioma[1:6] == ["0.5000", "0.6667", "0.5000", "0.5714", "4"]
    accuracy_line = next(line for line in lines if line.startswith("accuracy"))
    assert "0.6000" in accuracy_line and "95% CI" in accuracy_line
    assert len({len(line) for line in lines[:5]}) == 1  # fixed width


def test_confusion_cells_of_a_class_without_slices_have_no_share():
    from braintumor.visualize.figures import confusion_cell_text

    assert confusion_cell_text(3, 4) == "3\n75.0 %" and confusion_cell_text(0, 4) == "0\n0.0 %"
    assert confusion_cell_text(0, 0) == "0\n–"  # not "0.0 %": there is nothing to be a share of
