"""The training benchmarks keep working in their small CPU mode (their figures are never asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_cpu_mode(phantom_dir, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert load("train_throughput").main(["--data", str(phantom_dir), "--device", "cpu", "--image-size", "32",
                                          "--batch-size", "8", "--epochs", "1", "--ref-steps", "2",
                                          "--ceiling-steps", "2", "--workers", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["arch"] == "resnet18" and results["device"].startswith("CPU")
    for key in ("reference_img_s", "project_img_s", "ceiling_img_s", "train_gflops_per_image"):
        assert results[key] > 0, key
    table = capsys.readouterr().out
    assert "| (b) `braintumor train`" in table and "MFU of (b): n/a" in table


def test_time_to_accuracy_reports_thresholds(phantom_dir, tmp_path, capsys):
    out = tmp_path / "tta.json"
    assert load("time_to_accuracy").main(["--data", str(phantom_dir), "--arch", "resnet18", "--image-size", "32",
                                          "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                                          "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["reached"]) == {"0.95", "0.97", "0.98"} and len(results["epochs"]) == 1
    assert "| ≥ 98% |" in capsys.readouterr().out
