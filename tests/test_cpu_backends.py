"""cpu_backends.py: the default rule for accelerated CPU backends, its verdict files, and agreement on a trained model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from braintumor.inference.accelerated import compare_predictions, judge, resolve_auto_backend, write_verdict
from braintumor.utils.fingerprint import file_fingerprint
from braintumor.inference.classifier import Classifier

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def verdict_for(correct_reference: int, correct: int, agree: int, n: int = 1000) -> dict:
    return judge({"n": n, "reference_accuracy": correct_reference / n, "accuracy": correct / n,
                  "agreement": agree / n})


def test_default_needs_accuracy_within_0_3_points_and_99_percent_agreement():
    assert verdict_for(950, 947, 990)["default_ok"]  # exactly -0.3 points and 99 %
    assert not verdict_for(950, 946, 995)["default_ok"]  # -0.4 points
    assert not verdict_for(950, 950, 989)["default_ok"]  # same accuracy, but only 98.9 % agreement
    assert verdict_for(950, 955, 995)["accuracy_gap_points"] == pytest.approx(-0.5)
    comparison = compare_predictions(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0]), np.array([0, 1, 1, 3]))
    assert comparison == {"n": 4, "reference_accuracy": 0.75, "accuracy": 0.5, "agreement": 0.75}


@pytest.mark.slow
def test_auto_backend_takes_the_fastest_passing_export_of_this_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from braintumor.inference.export import export_onnx

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(Path(tiny_checkpoint).read_bytes())
    fingerprint = file_fingerprint(checkpoint)
    assert resolve_auto_backend(checkpoint) is None  # nothing measured: PyTorch
    onnx_path = export_onnx(checkpoint, tmp_path / "best.onnx")
    write_verdict(onnx_path, "openvino-fp32", {**verdict_for(900, 900, 1000), "latency_ms": 90.0,
                                               "source_fingerprint": fingerprint})
    failing = write_verdict(onnx_path, "onnxruntime-int8", {**verdict_for(900, 880, 960), "latency_ms": 40.0,
                                                            "source_fingerprint": fingerprint})
    write_verdict(onnx_path, "onnxruntime-fp32", {**verdict_for(900, 900, 1000), "latency_ms": 10.0,
                                                  "source_fingerprint": "another-ckpt"})
    assert resolve_auto_backend(checkpoint) == (onnx_path, "openvino")
    failing.unlink()
    write_verdict(onnx_path, "openvino-fp32", {**verdict_for(900, 880, 960), "latency_ms": 90.0,
                                               "source_fingerprint": fingerprint})
    assert resolve_auto_backend(checkpoint) is None
    line = capsys.readouterr().err.strip()
    assert line == ("note: openvino-fp32 stays opt-in: accuracy 88.00 % vs 90.00 % in float32 (-2.00 points), "
                    "same class on 96.0 % of 1000 slices (default needs accuracy gap <= 0.3 points and "
                    "agreement >= 99%)")
    assert Classifier.from_checkpoint(checkpoint, backend="auto").backend == "torch"


@pytest.fixture(scope="module")
def trained_run(phantom_dir, tmp_path_factory):
    """A ResNet-18 at 32 px fitted to the phantoms (full-batch Adam, a few seconds), saved as a run's best.pt."""
    import torch

    from braintumor.models.checkpoint import save_checkpoint
    from braintumor.data.index import discover

    from helpers import make_checkpoint

    run = tmp_path_factory.mktemp("trained")
    classifier = Classifier.from_checkpoint(make_checkpoint(run / "init.pt", image_size=32))
    index = discover(phantom_dir)
    images = torch.stack([classifier.preprocess(classifier.load(path)) for path in index.paths])
    labels = torch.tensor(index.labels)
    model = classifier.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt = torch.load(run / "init.pt", weights_only=True)
    save_checkpoint({**ckpt, "model": model.eval().state_dict()}, run / "best.pt")
    return run


@pytest.mark.slow
def test_accelerated_backends_agree_with_float32_on_a_trained_model(trained_run, phantom_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("cpu_inference", BENCHMARKS / "cpu_inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = tmp_path / "results.json"
    assert module.main(["--checkpoint", str(trained_run), "--data", str(phantom_dir), "--calibration",
                        str(phantom_dir), "--latency-runs", "3", "--threads", "1", "--json", str(results)]) == 0
    rows = json.loads(results.read_text())["rows"]
    reference = rows["onnxruntime-fp32"]
    assert reference["agreement"] == 1.0 and reference["n"] == 24
    assert reference["accuracy"] > 0.5  # trained: well above the 25 % of chance on four classes
    assert rows["onnxruntime-int8"]["agreement"] >= 0.9
    for name, row in rows.items():
        assert row["total_ms"] > 0 and row["network_ms"] > 0 and row["decode_ms"] > 0, name
    verdict = json.loads(Path(rows["onnxruntime-int8"]["verdict_file"]).read_text())
    assert verdict["source_fingerprint"] == file_fingerprint(trained_run / "best.pt")
    if importlib.util.find_spec("openvino"):
        assert rows["openvino-fp32"]["agreement"] == 1.0
    table = capsys.readouterr().out
    assert "| onnxruntime-int8 |" in table and "| pytorch-fp32 |" in table
    # predict --backend auto now finds what passed (or stays on PyTorch, printing the gap).
    passed = [name for name, row in rows.items() if row.get("default_ok") and "verdict_file" in row]
    fastest = min(passed, key=lambda name: rows[name]["total_ms"], default="torch")
    expected = {"torch": "torch", "onnxruntime-int8": "onnx"}.get(fastest, "openvino")
    assert Classifier.from_checkpoint(trained_run, backend="auto").backend == expected


def test_judge_asks_the_statuses_to_agree_too():
    base = {"n": 100, "reference_accuracy": 1.0, "accuracy": 1.0, "agreement": 1.0}
    assert judge({**base, "status_agreement": 0.99})["default_ok"]
    assert not judge({**base, "status_agreement": 0.98})["default_ok"]


def test_auto_skips_an_export_measured_slower_than_pytorch(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(Path(tiny_checkpoint).read_bytes())
    export_file = tmp_path / "best.onnx"
    export_file.write_bytes(b"stands for an export")
    passing = {**verdict_for(900, 900, 1000), "source_fingerprint": file_fingerprint(checkpoint)}
    write_verdict(export_file, "onnxruntime-fp32", {**passing, "latency_ms": 50.0, "reference_latency_ms": 20.0})
    assert resolve_auto_backend(checkpoint) is None
    write_verdict(export_file, "onnxruntime-fp32", {**passing, "latency_ms": 10.0, "reference_latency_ms": 20.0})
    assert resolve_auto_backend(checkpoint) == (export_file, "onnx")


@pytest.mark.slow
def test_export_writes_the_verdict_that_auto_reads(tmp_path, capsys):
    from braintumor.cli import main

    from helpers import make_trusted_checkpoint

    checkpoint = make_trusted_checkpoint(tmp_path / "best.pt", image_size=32)
    assert main(["export", str(checkpoint)]) == 0
    captured = capsys.readouterr()
    exported = tmp_path / "best.onnx"
    assert captured.out == f"wrote {exported}\n"
    assert captured.err.count("\n") == 1 and captured.err.startswith("onnxruntime-fp32: same class on 100.0 %")
    verdict = json.loads((tmp_path / "best.onnx.onnxruntime-fp32.verdict.json").read_text())
    assert verdict["export"] == "best.onnx" and verdict["source_fingerprint"] == file_fingerprint(checkpoint)
    assert verdict["agreement"] == 1.0 and verdict["status_agreement"] == 1.0 and verdict["default_ok"]
    assert verdict["max_trust_score_delta"] <= 1e-3 and verdict["n"] == 32
    assert verdict["latency_ms"] > 0 and verdict["reference_latency_ms"] > 0
    faster = verdict["latency_ms"] < verdict["reference_latency_ms"]
    assert Classifier.from_checkpoint(checkpoint, backend="auto").backend == ("onnx" if faster else "torch")
    assert Classifier.from_checkpoint(checkpoint, backend="torch").backend == "torch"


def test_auto_finds_the_reference_models_exports_in_the_current_folder(tmp_path, monkeypatch):
    from braintumor.models.checkpoint import REFERENCE_MODEL

    monkeypatch.chdir(tmp_path)
    exported = tmp_path / "braintumor-reference.onnx"  # where `braintumor export reference` writes
    exported.write_bytes(b"stands for an export")
    write_verdict(exported, "onnxruntime-fp32", {**verdict_for(900, 900, 1000), "latency_ms": 5.0,
                                                 "reference_latency_ms": 9.0,
                                                 "source_fingerprint": file_fingerprint(REFERENCE_MODEL)})
    assert resolve_auto_backend(REFERENCE_MODEL) == (Path.cwd() / exported.name, "onnx")
