"""The command line end to end: every subcommand on generated data, exit codes and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from braintumor.cli import main


@pytest.fixture(scope="module")
def trained_run(phantom_dir, tmp_path_factory):
    """One tiny training run through the CLI, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", str(phantom_dir), "--arch", "resnet18", "--weights", "none", "--image-size", "32",
                 "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--workers", "0",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    return out


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_train_writes_the_run_and_prints_where(trained_run):
    assert (trained_run / "best.pt").is_file() and (trained_run / "report.md").is_file()
    assert len((trained_run / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_evaluate_with_leak_free_subset(trained_run, phantom_dir, tmp_path, capsys):
    code, out, _ = run(["evaluate", trained_run / "best.pt", phantom_dir, "--out", tmp_path / "eval",
                        "--device", "cpu", "--exclude-duplicates-of", phantom_dir], capsys)
    assert code == 0 and "macro avg" in out and "report: " in out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == 24 and set(report["per_class"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    assert "24 of 24 images are exact or near duplicates" in report["extra"]["leak_check"]
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000


def test_predict_table_json_csv(trained_run, phantom_dir, capsys):
    folder = phantom_dir / "glioma"
    code, out, _ = run(["predict", trained_run / "best.pt", folder], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split()[:2] == ["image", "prediction"] and len(lines) == 7
    code, out, _ = run(["predict", trained_run / "best.pt", folder / "glioma_0000.png", "--json"], capsys)
    (record,) = json.loads(out)
    assert record["source"].endswith("glioma_0000.png") and sum(record["probabilities"].values()) == \
        pytest.approx(1.0, abs=1e-5) and record["predicted_class"] in record["probabilities"]
    code, out, _ = run(["predict", trained_run / "best.pt", folder, "--csv"], capsys)
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(table) == 6 and list(table[0]) == [
        "source", "predicted_class", "confidence", "p_glioma", "p_meningioma", "p_notumor", "p_pituitary",
        "status", "not_mri_score", "atypical_score", "volume", "slice_index"]
    # Training fitted the trust tiers into best.pt: every output carries the status and the scores.
    assert all(row["status"] in ("ok", "atypical", "not_mri", "uncertain") and float(row["atypical_score"]) >= 0
               for row in table)
    assert {"status", "not_mri_score", "atypical_score"} <= set(record)


def test_predict_rejects_a_blank_image_and_abstains_below_min_confidence(trained_run, phantom_dir, tmp_path,
                                                                         capsys):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), "black").save(blank)
    code, out, err = run(["predict", trained_run / "best.pt", blank], capsys)
    row = out.splitlines()[1]
    assert code == 0 and row.split()[-3] in ("not_mri", "atypical")  # never ok; which tier: the run's trust fit
    if "not_mri" in row:
        assert "NOT RECOGNISED" in row and "not recognised as a brain MRI slice" in err
        assert not any(name in row.split()[1] for name in ("glioma", "meningioma", "notumor", "pituitary"))
    code, out, _ = run(["predict", trained_run / "best.pt", phantom_dir / "glioma", "--json",
                        "--min-confidence", "1"], capsys)
    records = json.loads(out)
    assert code == 0 and {r["status"] for r in records} <= {"uncertain", "not_mri"}
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(trained_run / "best.pt"), str(blank), "--min-confidence", "1.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "between 0 and 1" in err and err.count("\n") == 1


@pytest.mark.slow
def test_calibrate_refits_a_checkpoint_from_its_own_run(trained_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy.pt"
    shutil.copy(trained_run / "last.pt", copy)  # last.pt has no trust entry: as a checkpoint trained earlier
    assert "trust" not in torch.load(copy, weights_only=True)
    code, out, err = run(["calibrate", copy, "--device", "cpu", "--atypical-rate", "0.1"], capsys)
    trust = torch.load(copy, weights_only=True)["trust"]
    assert code == 0 and out.strip() == str(copy) and "temperature" in err and trust["n_val"] == 4
    assert trust["atypical"]["rate"] == 0.1 and {"not_mri", "atypical"} <= set(trust)


@pytest.mark.slow
def test_export_then_predict_with_onnx_runtime(trained_run, phantom_dir, tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    code, out, _ = run(["export", trained_run / "best.pt", "--format", "onnx", "--out", onnx_file], capsys)
    assert code == 0 and onnx_file.is_file()
    image = phantom_dir / "pituitary" / "pituitary_0001.png"
    _, torch_out, _ = run(["predict", trained_run / "best.pt", image, "--json"], capsys)
    code, onnx_out, err = run(["predict", onnx_file, image, "--json", "--backend", "onnx"], capsys)
    expected, got = json.loads(torch_out)[0], json.loads(onnx_out)[0]
    assert code == 0 and got["predicted_class"] == expected["predicted_class"] and got["status"] == expected["status"]
    # --device auto (the default) with an ONNX model: one line says it runs on the CPU; --device cpu: silence.
    # (and a model without both trust tiers says so, once)
    lines = err.splitlines()
    assert lines[0] == "note: the onnx model runs on the CPU (--device auto applies to .pt checkpoints)"
    assert all(line.startswith("note: this model has") for line in lines[1:]) and len(lines) <= 2
    assert run(["predict", onnx_file, image, "--device", "cpu"], capsys)[2] == "".join(
        line + "\n" for line in lines[1:])
    for name, p in expected["probabilities"].items():
        assert got["probabilities"][name] == pytest.approx(p, abs=1e-4)


@pytest.mark.slow
def test_export_int8_with_calibration_images(trained_run, phantom_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    code, printed, _ = run(["export", trained_run / "best.pt", "--out", out, "--int8-calibration",
                            phantom_dir / "glioma"], capsys)
    assert code == 0 and out.is_file() and (tmp_path / "model.fp32.onnx").is_file() and "int8" in printed
    code, result, _ = run(["predict", out, phantom_dir / "glioma" / "glioma_0000.png", "--json"], capsys)
    assert code == 0 and sum(json.loads(result)[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_explain_writes_overlays(trained_run, phantom_dir, tmp_path, capsys):
    code, out, _ = run(["explain", trained_run / "best.pt", phantom_dir / "meningioma" / "meningioma_0002.png",
                        "--class", "meningioma", "--out", tmp_path / "cam"], capsys)
    written = out.strip().splitlines()
    assert code == 0 and len(written) == 1 and "meningioma" in written[0]
    assert (tmp_path / "cam").is_dir() and any((tmp_path / "cam").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("method, layer", [("gradcam", "layer3"), ("layercam", None), ("occlusion", None)])
def test_explain_method_and_layer_flags(tiny_checkpoint, phantom_dir, tmp_path, capsys, method, layer):
    image = phantom_dir / "glioma" / "glioma_0001.png"
    flags = ["--method", method] + (["--layer", layer] if layer else [])
    code, out, err = run(["explain", tiny_checkpoint, image, "--out", tmp_path / "cam", *flags], capsys)
    [written] = out.strip().splitlines()
    assert code == 0 and Path(written).name.startswith(f"glioma_0001_{method}_") and Path(written).is_file()
    code, out, err = run(["explain", tiny_checkpoint, image, "--out", tmp_path / "single", "--no-mirror", *flags],
                         capsys)
    [single] = out.strip().splitlines()
    assert code == 0 and Path(single).name == Path(written).name
    assert Path(single).read_bytes() != Path(written).read_bytes()  # the single-view map differs


@pytest.mark.parametrize("flags, message", [
    (["--method", "smoothgrad"], "unknown explanation method 'smoothgrad'"),
    (["--method", "occlusion", "--layer", "layer3"], "--layer applies to the CAM methods"),
    (["--layer", "layer9"], "layer9"),
])
@pytest.mark.slow
def test_explain_bad_method_or_layer_is_one_line(tiny_checkpoint, phantom_dir, tmp_path, capsys, flags, message):
    code, out, err = run(["explain", tiny_checkpoint, phantom_dir / "glioma" / "glioma_0001.png",
                          "--out", tmp_path / "cam", *flags], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err
    assert not (tmp_path / "cam").exists()  # a failed explain leaves nothing behind


def test_audit_and_fail_on_leak(phantom_dir, tmp_path, capsys):
    code, out, _ = run(["audit", phantom_dir, "--out", tmp_path / "a"], capsys)
    assert code == 0 and (tmp_path / "a" / "audit.md").is_file() and (tmp_path / "a" / "audit.json").is_file()
    code, _, err = run(["audit", phantom_dir, "--against", phantom_dir, "--out", tmp_path / "b",
                        "--fail-on-leak"], capsys)
    # The audited set first: its images that duplicate one of --against (here the same folder: all of them).
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: leak: 24 image(s) of {phantom_dir} duplicate images of {phantom_dir} (24 of ")


def test_make_phantoms(tmp_path, capsys):
    code, out, _ = run(["make-phantoms", tmp_path / "p", "--per-class", "2", "--size", "48"], capsys)
    assert code == 0 and len(list((tmp_path / "p").rglob("*.png"))) == 8


@pytest.mark.parametrize("make_data, message", [
    (lambda root: None, "error: data folder not found: {root}"),
    (lambda root: (root / "glioma").mkdir(parents=True), "error: need at least 2 class folders in {root}, found 1"),
    (lambda root: [(root / c).mkdir(parents=True) for c in ("a", "b")], "error: class folder 'a' in {root} has no images"),
])
def test_bad_data_folders_are_one_line_errors(tmp_path, capsys, make_data, message):
    root = tmp_path / "data"
    make_data(root)
    code, _, err = run(["train", root, "--weights", "none", "--device", "cpu"], capsys)
    assert code == 2 and err.startswith(message.format(root=root)) and err.count("\n") == 1


def test_unreadable_images_stop_training_with_exit_2_and_the_skip_bad_hint(phantom_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    good = (data / "notumor" / "notumor_0000.png").read_bytes()
    (data / "notumor" / "cut.png").write_bytes(good[:200])
    (data / "glioma" / "notes.jpg").write_text("not an image")
    code, _, err = run(["train", data, "--weights", "none", "--arch", "resnet18", "--device", "cpu",
                        "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: 2 unreadable image(s) in ")
    assert "cut.png (truncated image)" in err and "notes.jpg (not an image)" in err and "--skip-bad" in err
    assert not (tmp_path / "run").exists()


def test_imagenet_weights_offline_through_the_cli(phantom_dir, tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    code, _, err = run(["train", phantom_dir, "--arch", "resnet18", "--image-size", "32", "--device", "cpu",
                        "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "resnet18-f37072fd.pth" in err and str(tmp_path / "empty" / "hub" / "checkpoints") in err


@pytest.mark.parametrize("args, message", [
    (["train", "x", "--arch", "vgg16"], "error: --arch must be one of resnet18"),
    (["predict", "missing.pt", "a.png"], "error: checkpoint not found: missing.pt"),
    (["train", "--epochs", "2"], "error: no training data folder given"),
    (["train", "x", "--config", "nope.yaml"], "error: config file not found: nope.yaml"),
    (["calibrate", "missing.pt"], "error: checkpoint not found: missing.pt"),
])
def test_user_errors_exit_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(args, capsys)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.mark.slow
def test_unwritable_output_is_a_one_line_error(trained_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, _, err = run(["export", trained_run / "best.pt", "--out", blocker / "model.onnx"], capsys)
    assert code == 2 and err.startswith("error: ") and str(blocker) in err and err.count("\n") == 1


@pytest.mark.slow
def test_real_process_exit_codes_and_no_traceback(tmp_path):
    """Through a real interpreter: argparse errors and user errors are one line on stderr, exit code 2."""
    for args in (["train", str(tmp_path / "nowhere"), "--device", "cpu"], ["train", "d", "--epochs", "many"],
                 ["frobnicate"]):
        result = subprocess.run([sys.executable, "-m", "braintumor", *args], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_help_and_argument_errors_do_not_import_torch_or_scipy():
    """The parser (every command's --help, argparse errors) is built from torch-free modules: --help answered in
    about 0.3 s instead of 3 s on 2 cores. A top-level import of torch or scipy on that path fails this."""
    code = ("import sys\n"
            "from braintumor.cli import main\n"
            "for argv in ([], ['train'], ['predict'], ['explain'], ['serve'], ['audit'], ['evaluate']):\n"
            "    try:\n"
            "        main([*argv, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'scipy') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: braintumor train" in result.stdout and "--optimizer" in result.stdout


def help_entries(argv, monkeypatch, capsys) -> dict[str, str]:
    """--help of a command as {flag: its whole help text}, unwrapped (a wide terminal)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    entries, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_every_config_option_has_a_generated_train_flag_showing_its_default(monkeypatch, capsys):
    from braintumor.training.config import FIELDS, flag_name, shown_default

    entries = help_entries(["train"], monkeypatch, capsys)
    for key, f in FIELDS.items():
        if key in ("data", "recipe"):  # DATA is positional; --recipe NAME loads a shipped recipe
            continue
        help_text = entries[f"--{flag_name(key)}"]
        assert f"(default: {shown_default(key)})" in help_text, key
        assert f.metadata["help"] in help_text
        if not f.metadata["shown"] and not isinstance(f.default, bool):
            assert f"(default: {f.default})" in help_text, key  # the dataclass's value itself, not a copy
    assert "--compile" not in entries


def test_generated_flags_parse_to_the_fields_type_and_override_the_config_file(tmp_path, monkeypatch):
    from braintumor.cli import build_parser, train_options
    from braintumor.training.config import read_config_file, resolve_config

    args = build_parser().parse_args(["train", "d", "--lr", "1e-3", "--epochs", "3", "--no-tta", "--no-progress",
                                      "--arch", "resnet18"])
    assert train_options(args) == {"data": "d", "lr": 1e-3, "epochs": 3, "tta": False, "progress": False,
                                   "arch": "resnet18"}
    (tmp_path / "c.yaml").write_text("lr: 1e-5\ntta: true\nepochs: 9\nbatch_size: 4\n")
    cfg = resolve_config(read_config_file(tmp_path / "c.yaml"), train_options(args))
    assert (cfg.lr, cfg.tta, cfg.epochs, cfg.batch_size) == (1e-3, False, 3, 4)


def test_every_flag_of_every_command_shows_its_default(monkeypatch, capsys):
    from braintumor.cli import COMMANDS

    for command in COMMANDS:
        for flag, text in help_entries([command], monkeypatch, capsys).items():
            if flag not in ("-h", "-q", "-v"):
                assert "(default: " in text, (command, text)


def test_device_and_workers_have_one_default_everywhere():
    from braintumor.cli import build_parser
    from braintumor.training.config import DEFAULT_WORKERS, TrainConfig

    parser = build_parser()
    for argv in (["predict", "m.pt", "a.png"], ["explain", "m.pt", "a.png"], ["serve"], ["evaluate", "m.pt", "d"],
                 ["calibrate", "m.pt"]):
        assert parser.parse_args(argv).device == "auto" == TrainConfig().device, argv
    for argv in (["evaluate", "m.pt", "d"], ["calibrate", "m.pt"]):
        assert parser.parse_args(argv).workers == DEFAULT_WORKERS == TrainConfig().workers
    assert parser.parse_args(["export", "m.pt"]).out is None  # export names the file after the checkpoint


@pytest.mark.parametrize("text, message", [
    ("epochs: abc\n", "error: epochs in {path} must be a whole number, got 'abc'\n"),
    ("lr: 1e-5\nepochs: 0\n", "error: --epochs must be at least 1 and at most 100000, got 0\n"),
    ("learning_rate: 0.1\n", "error: unknown option(s) in {path}: learning_rate (see braintumor train --help)\n"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, _, err = run(["train", tmp_path, "--config", path], capsys)
    assert code == 2 and err == message.format(path=path)


def test_compile_flag_names_its_replacement(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "d", "--compile"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--compile was replaced by --train-step compile" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra, named", [
    (["DATA_DIR"], "DATA"), (["--config", "c.yaml"], "--config"), (["--recipe", "seed"], "--recipe"),
])
def test_resume_refuses_data_config_and_recipe(tmp_path, capsys, extra, named):
    code, _, err = run(["train", "--resume", tmp_path, *extra], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --resume continues {tmp_path} with its own data and recipe, so {named} cannot")


@pytest.mark.parametrize("flag, value", [("--lr", "0.1"), ("--arch", "resnet18"), ("--tta", None),
                                         ("--out", "x"), ("--scheduler", "cosine")])
def test_resume_refuses_recipe_flags(trained_run, capsys, flag, value):
    before = (trained_run / "last.pt").stat().st_mtime_ns
    code, _, err = run(["train", "--resume", trained_run, flag, *([value] if value else [])], capsys)
    assert code == 2 and err.count("\n") == 1 and f", so {flag} cannot be given; only --epochs" in err
    assert (trained_run / "last.pt").stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_run_started_with_a_relative_data_path_resumes_from_another_folder(phantom_dir, tmp_path, monkeypatch,
                                                                            capsys):
    import shutil

    import yaml

    project = tmp_path / "project"
    shutil.copytree(phantom_dir, project / "data")
    monkeypatch.chdir(project)
    code, _, err = run(["train", "data", "--arch", "resnet18", "--weights", "none", "--image-size", "32",
                        "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--workers", "0",
                        "--no-progress", "--out", "runs/r"], capsys)
    assert code == 0, err
    saved = yaml.safe_load((project / "runs" / "r" / "config.yaml").read_text())
    assert saved["data"] == str(project / "data") and "device" not in saved
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["train", "--resume", project / "runs" / "r", "--epochs", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert len((project / "runs" / "r" / "metrics.jsonl").read_text().splitlines()) == 2
