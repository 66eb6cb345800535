"""The training benchmarks keep working in their small CPU mode (their figures are never asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
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
    # The CPU mode measures the eager step variants: the ceiling's batch, and twice it with twice the lr.
    assert results["variants"]["eager-2x-batch"]["batch_size"] == 16 and results["variants"]["eager"]["img_s"] > 0
    assert "| eager-2x-batch | eager | fp32 | 16 | 2.0e-05 |" in table
    bf16 = results["variants"]["eager-bf16"]  # bf16 where the CPU has it natively, else float32 and a notice
    assert bf16["precision"] == "bf16" or "no native bfloat16" in bf16["notice"]
    assert results["project_first_epoch_seconds"] > 0 and results["project_seconds_to_first_epoch"] > 0


@pytest.mark.slow
def test_time_to_accuracy_runs_seeds_on_one_split_and_summarizes(phantom_dir, tmp_path, capsys):
    out = tmp_path / "tta.json"
    assert load("time_to_accuracy").main(["--data", str(phantom_dir), "--recipe", "scratch-cpu", "--arch", "resnet18",
                                          "--image-size", "32", "--progressive-resize", "0", "--precision", "fp32", "--epochs", "1",
                                          "--batch-size", "8", "--device",
                                          "cpu", "--seeds", "0", "1", "--out", str(tmp_path / "runs"),
                                          "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"0", "1"}
    assert all(set(run["reached"]) == {"0.97", "0.98", "0.99"} for run in results["runs"].values())
    table = capsys.readouterr().out
    assert "| mean ± sd |" in table and "recipe scratch-cpu" in table
    splits = {(tmp_path / "runs" / f"seed{s}" / "config.yaml").read_text().count("split_seed: 0") for s in (0, 1)}
    assert splits == {1}  # both seeds validated on the split of seed 0
    assert "precision: fp32" in (tmp_path / "runs" / "seed0" / "config.yaml").read_text()  # the override
    assert load("time_to_accuracy").main(["--summarize", str(tmp_path / "runs" / "seed0")]) == 0
    assert "seed0" in capsys.readouterr().out


def test_time_to_accuracy_formats_seconds_whole_and_accuracy_to_two_places():
    mean_std = load("time_to_accuracy").mean_std
    assert mean_std([2191.82], 0) == "2192"
    assert mean_std([98.0, 99.0]) == "98.50 ± 0.71"
    assert mean_std([1000.0, 1100.0], 0) == "1050 ± 71"
    assert mean_std([]) == "–"


def test_gpu_session_script_plans_every_gpu_measurement(tmp_path):
    import subprocess

    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_session.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path),
                                                         "PYTHON": "false", "DATA": "Training"})
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    assert "benchmarks/train_throughput.py --data Training --epochs 3" in plan and f"--json {tmp_path}" in plan
    assert "benchmarks/optimizer_step.py --device cuda --arch resnet152" in plan
    assert "time_to_accuracy.py --data Training --recipe scratch-gpu --seeds 0" in plan


@pytest.mark.slow
def test_ood_benchmark_smoke_mode(tmp_path, capsys):
    """Both tiers fitted on phantoms: the candidates of each tier measured, as JSON and as the Markdown table."""
    out = tmp_path / "ood.json"
    assert load("ood").main(["--smoke", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    assert results["n_val"] > 0 and results["n_variants"] > 0 and results["n_negatives"] > 0
    stored = results["not_mri"]["stored: per-stage Gaussians (max) + colour"]
    assert {"energy", "1 - max softmax"} <= set(results["not_mri"])
    for row in results["not_mri"].values():
        assert 0 <= row["auroc"] <= 1 and 0 <= row["val_false_alarms"] <= 1 and 0 <= row["detected"] <= 1
        assert set(row["val_false_alarms_by_class"]) == set(classes)
    assert "blank" in stored["detected_by_kind"] and "dicom" in stored["variant_false_alarms_by_kind"]
    assert set(results["atypical"]["stored: Mahalanobis to predicted class"]["val_rate_by_class"]) == set(classes)
    assert set(results["atypical_cross_fitted"]) == set(classes)
    table = capsys.readouterr().out
    assert "stored: per-stage Gaussians (max) + colour" in table and "Mahalanobis to predicted class" in table
    assert "nan" not in table  # a class without slices in one half shows '-'


def test_ood_benchmark_needs_the_training_data(tiny_checkpoint, capsys):
    assert load("ood").main(["--checkpoint", str(tiny_checkpoint)]) == 2
    assert "does not name its training data; pass --data" in capsys.readouterr().err


def _run_folder(folder: Path, rows: list[tuple[str, str, list[float]]]) -> Path:
    """A run folder whose predictions.csv holds ``(source, true class, probabilities)`` rows."""
    folder.mkdir(parents=True)
    lines = ["source,predicted_class,p_glioma,p_notumor,true_class"]
    lines += [f"{source},x,{p[0]},{p[1]},{truth}" for source, truth, p in rows]
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_val_ensemble_scores_models_ensembles_and_the_slices_every_model_gets_wrong(tmp_path, capsys):
    val_ensemble = load("val_ensemble")
    # a: wrong on s2 and s4; b: wrong on s3 and s4, and its file lists the slices in another order.
    a = _run_folder(tmp_path / "a", [("d/glioma/s1.png", "glioma", [0.9, 0.1]), ("d/glioma/s2.png", "glioma", [0.4, 0.6]),
                                     ("d/notumor/s3.png", "notumor", [0.2, 0.8]),
                                     ("d/notumor/s4.png", "notumor", [0.7, 0.3])])
    b = _run_folder(tmp_path / "b", [("d/notumor/s4.png", "notumor", [0.8, 0.2]),
                                     ("d/notumor/s3.png", "notumor", [0.6, 0.4]),
                                     ("d/glioma/s2.png", "glioma", [0.9, 0.1]), ("d/glioma/s1.png", "glioma", [0.8, 0.2])])
    summary = val_ensemble.summarize(*val_ensemble.load_models([str(a), str(b)]))
    assert [(row["models"], row["errors"]) for row in summary["models"]] == [([str(a)], 2), ([str(b)], 2)]
    # mean: s1 (0.85) right, s2 (0.65 glioma) right, s3 (0.6 notumor) right, s4 (0.75 glioma) wrong
    (pair,) = summary["ensembles"][2]
    assert pair["errors"] == 1 and pair["accuracy"] == 0.75
    assert [row["source"] for row in summary["floor"]] == ["d/notumor/s4.png"] and summary["ceiling"] == 0.75
    assert summary["floor"][0]["predicted"] == {str(a): "glioma", str(b): "glioma"}
    assert val_ensemble.main([str(a), str(b), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["floor"][0]["true_class"] == "notumor"
    assert val_ensemble.main([str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert "| notumor/s4.png | notumor | glioma |" in table and "ceiling 75.00 %" in table


def test_val_ensemble_refuses_runs_of_different_splits_with_one_line(tmp_path, capsys):
    val_ensemble = load("val_ensemble")
    a = _run_folder(tmp_path / "a", [("s1.png", "glioma", [0.9, 0.1])])
    b = _run_folder(tmp_path / "b", [("s2.png", "glioma", [0.9, 0.1])])
    assert val_ensemble.main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "share one split" in err and len(err.strip().splitlines()) == 1
    assert val_ensemble.main([str(tmp_path / "model.pt")]) == 2  # no run folder names the slices
    assert "at least one training run folder" in capsys.readouterr().err


@pytest.mark.parametrize("name, argv, taken", [
    ("val_ensemble", ["{tmp}/run", "--json", "{tmp}/taken"], "taken"),
    ("time_to_accuracy", ["--summarize", "{tmp}/run", "--json", "{tmp}/taken"], "taken"),
    ("train_throughput", ["--data", "{tmp}/no-data", "--json", "{tmp}/taken"], "taken"),
    ("ood", ["--smoke", "--markdown", "{tmp}/taken"], "taken"),
    ("optimizer_compare", ["--out", "{tmp}"], "optimizer_compare.png"),
    ("cpu_inference", ["--checkpoint", "{ckpt}", "--data", "{tmp}/no-data", "--out", "{tmp}"], "tiny-int8.onnx"),
])
def test_benchmarks_refuse_to_replace_an_output_before_any_work(name, argv, taken, tmp_path, tiny_checkpoint, capsys):
    # The check comes first: nothing is trained, exported or read (the data folders do not even exist).
    (tmp_path / taken).write_text("the user's own file")
    ckpt = tmp_path / "tiny.pt"
    ckpt.write_bytes(Path(tiny_checkpoint).read_bytes())
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in argv]
    assert load(name).main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"{taken} already exists; pass --overwrite" in err and "\n" not in err
    assert (tmp_path / taken).read_text() == "the user's own file"


def test_inference_variants_ends_a_missing_run_folder_with_one_line(tmp_path, capsys):
    assert load("inference_variants").main([str(tmp_path / "no-run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config.yaml" in err and "\n" not in err


def test_cpu_inference_never_writes_its_exports_into_the_installed_package(tmp_path, capsys):
    # The shipped model's folder is its default --out: refused, before anything is read or exported.
    assert load("cpu_inference").main(["--checkpoint", "reference", "--data", str(tmp_path / "no-data")]) == 2
    err = capsys.readouterr().err.strip()
    assert "inside the installed braintumor package" in err and "--out DIR" in err and "\n" not in err
