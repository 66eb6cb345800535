"""The inference runtime: the backend is chosen from a file's content, every export reads back everywhere, and a
suffix that names another format than the one written is a one-line error."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from braintumor.cli import main
from braintumor.inference.export import export
from braintumor.models.formats import CHECKPOINT, ONNX, TORCHSCRIPT, model_format
from braintumor.inference.classifier import Classifier
from braintumor.serve.app import create_app

IMAGE = ("glioma", "glioma_0000.png")


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported once to each format, under the names export proposes."""
    folder = tmp_path_factory.mktemp("exports")
    return {"onnx": export(tiny_checkpoint, "onnx", folder / "model.onnx"),
            "torchscript": export(tiny_checkpoint, "torchscript", folder / "model.ts")}


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def probabilities(classifier, path):
    return classifier.predict(str(path)).probabilities


@pytest.mark.slow
def test_format_and_backend_follow_the_content_when_the_suffix_lies(tiny_checkpoint, exports, phantom_dir, tmp_path):
    image = phantom_dir.joinpath(*IMAGE)
    expected = probabilities(Classifier.from_checkpoint(tiny_checkpoint), image)
    disguised = {  # name -> (source, format its bytes hold, backend that must read it)
        "checkpoint.onnx": (tiny_checkpoint, CHECKPOINT, "torch"),
        "checkpoint": (tiny_checkpoint, CHECKPOINT, "torch"),
        "onnx-model.pt": (exports["onnx"], ONNX, "onnx"),
        "onnx-model": (exports["onnx"], ONNX, "onnx"),
        "script.onnx": (exports["torchscript"], TORCHSCRIPT, "torchscript"),
        "script.bin": (exports["torchscript"], TORCHSCRIPT, "torchscript"),
    }
    for name, (source, kind, backend) in disguised.items():
        path = shutil.copy(source, tmp_path / name)
        assert model_format(path) == kind, name
        classifier = Classifier.from_checkpoint(path)
        assert classifier.backend == backend, name
        got = probabilities(classifier, image)
        assert got == pytest.approx(expected, abs=1e-4), name


@pytest.mark.slow
def test_torchscript_export_is_read_by_predict_evaluate_and_serve(tiny_checkpoint, phantom_dir, tmp_path, capsys):
    script = tmp_path / "model.ts"
    code, out, _ = run(["export", tiny_checkpoint, "--format", "torchscript", "--out", script], capsys)
    assert code == 0 and script.is_file()
    image = phantom_dir.joinpath(*IMAGE)
    _, torch_out, _ = run(["predict", tiny_checkpoint, image, "--json"], capsys)
    code, script_out, err = run(["predict", script, image, "--json"], capsys)
    assert code == 0, err
    expected, got = json.loads(torch_out)[0], json.loads(script_out)[0]
    assert got["predicted_class"] == expected["predicted_class"] and got["status"] == expected["status"]
    assert got["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    code, out, err = run(["evaluate", script, phantom_dir, "--out", tmp_path / "eval"], capsys)
    assert code == 0 and (tmp_path / "eval" / "report.md").is_file(), err
    with TestClient(create_app(Classifier.from_checkpoint(script))) as client:
        assert client.get("/api/model").json()["backend"] == "torchscript"
        response = client.post("/api/predict", files=[("files", (IMAGE[1], image.read_bytes(), "image/png"))])
        result = response.json()["results"][0]
        assert response.status_code == 200 and result["predicted_class"] == expected["predicted_class"]
        refused = client.post("/api/predict?explain=1", files=[("files", (IMAGE[1], image.read_bytes(), "image/png"))])
        assert refused.status_code == 422 and "need gradients" in refused.json()["detail"]


@pytest.mark.slow
def test_onnx_export_is_read_by_predict_and_evaluate_without_a_backend_flag(exports, phantom_dir, tmp_path, capsys):
    image = phantom_dir.joinpath(*IMAGE)
    for backend in ([], ["--backend", "torch"], ["--backend", "auto"]):
        code, out, err = run(["predict", exports["onnx"], image, "--json", *backend], capsys)
        assert code == 0 and json.loads(out)[0]["predicted_class"], err
    code, _, err = run(["evaluate", exports["onnx"], phantom_dir, "--out", tmp_path / "eval"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("fmt, name, hint", [
    ("onnx", "model.pt", "does not name an ONNX file: use a name ending in .onnx or pass --format torchscript"),
    ("onnx", "model.ts", "--format torchscript"),
    ("torchscript", "model.onnx", "does not name a TorchScript file"),
    ("torchscript", "model.zip", ".ts"),
])
def test_export_suffix_must_name_the_format(tiny_checkpoint, tmp_path, capsys, fmt, name, hint):
    code, _, err = run(["export", tiny_checkpoint, "--format", fmt, "--out", tmp_path / name], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: ") and hint in err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_every_default_export_name_reads_back(tiny_checkpoint, tmp_path):
    source = shutil.copy(tiny_checkpoint, tmp_path / "best.pt")
    for fmt, backend in (("onnx", "onnx"), ("torchscript", "torchscript")):
        written = export(source, fmt)
        assert written.parent == tmp_path and Classifier.from_checkpoint(written).backend == backend


def test_onnx_runtime_asked_for_a_checkpoint_is_one_line(tiny_checkpoint, phantom_dir, capsys):
    code, _, err = run(["predict", tiny_checkpoint, phantom_dir.joinpath(*IMAGE), "--backend", "onnx"], capsys)
    assert code == 2 and err.count("\n") == 1 and "runs ONNX exports" in err and "--format onnx" in err


def test_a_checkpoint_command_names_an_export_it_was_given(exports, capsys):
    code, _, err = run(["calibrate", exports["torchscript"], "--data", "nowhere"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a TorchScript export, not a .pt checkpoint" in err


@pytest.mark.slow
def test_a_model_file_is_sniffed_once_per_load(tiny_checkpoint, exports, monkeypatch):
    from braintumor.models import formats

    calls = []
    original = formats.content_format
    monkeypatch.setattr(formats, "content_format", lambda path: calls.append(path) or original(path))
    for path in (tiny_checkpoint, exports["onnx"], exports["torchscript"]):
        calls.clear()
        for backend in ("torch", "auto"):
            Classifier.from_checkpoint(path, backend=backend)
        assert len(calls) == 2, (path, calls)  # once per load


def test_runtime_for_reads_the_content_not_the_suffix(tiny_checkpoint, exports, tmp_path):
    from braintumor.models.formats import runtime_for

    disguised = shutil.copy(exports["onnx"], tmp_path / "model.pt")
    assert runtime_for(disguised, "torch") == "onnx" and runtime_for(disguised, "auto") == "onnx"
    named = shutil.copy(tiny_checkpoint, tmp_path / "model.onnx")
    assert runtime_for(named, "torch") == "torch"
    assert runtime_for(exports["torchscript"], "auto") == "auto" and runtime_for("reference", "torch") == "torch"
    assert runtime_for(tiny_checkpoint, "openvino") == "openvino"
