"""The reference model shipped in the package: its checksum is MODEL_CARD.md's, and "reference" works wherever a
checkpoint is accepted (predict, evaluate, explain, export, serve, Classifier)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from braintumor.models import checkpoint
from braintumor.models.checkpoint import REFERENCE_MODEL, load_checkpoint, resolve_checkpoint
from braintumor.cli import build_parser, main
from braintumor.errors import UserError
from braintumor.inference.classifier import Classifier

CARD = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"


def test_file_is_small_and_its_checksum_is_the_model_cards():
    # 22.9 MB of float16 weights and 6.6 MB of float32 trust statistics (the not-MRI tier's per-stage whitening
    # matrices, 128² … 1024², and the atypical tier's 512²): the wheel and every clone carry it.
    assert REFERENCE_MODEL.is_file() and REFERENCE_MODEL.stat().st_size <= 30 * 10**6
    quoted = re.search(r"SHA-256[^`]*`([0-9a-f]{64})`", CARD.read_text())
    assert quoted, "MODEL_CARD.md must quote the file's SHA-256"
    assert hashlib.sha256(REFERENCE_MODEL.read_bytes()).hexdigest() == quoted.group(1)


def test_it_describes_itself():
    ckpt = load_checkpoint("reference")
    assert ckpt["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert ckpt["arch"] == "resnet18" and ckpt["config"]["weights"] == "none" and "optimizer" not in ckpt
    classifier = Classifier.from_checkpoint("reference")
    assert classifier.source_path == str(REFERENCE_MODEL) and classifier.tta == bool(ckpt["tta"])
    assert all(p.dtype.is_floating_point and p.dtype != __import__("torch").float16
               for p in classifier.model.parameters())  # fp16 on disk, fp32 in memory


@pytest.mark.slow
def test_predict_evaluate_explain_export_accept_reference(phantom_dir, tmp_path, capsys, monkeypatch):
    image = next((phantom_dir / "glioma").iterdir())
    assert main(["predict", "reference", str(image), "--json"]) == 0
    [prediction] = json.loads(capsys.readouterr().out)
    assert set(prediction["probabilities"]) == {"glioma", "meningioma", "notumor", "pituitary"}

    assert main(["evaluate", "reference", str(phantom_dir), "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["n"] == 24

    assert main(["explain", "reference", str(image), "--out", str(tmp_path / "cam")]) == 0
    assert list((tmp_path / "cam").glob("*.png"))

    monkeypatch.chdir(tmp_path)
    assert main(["export", "reference"]) == 0  # default: the current folder, never the installed package
    exported = tmp_path / "braintumor-reference.onnx"
    assert exported.is_file()
    assert Classifier.from_checkpoint(exported).classes == Classifier.from_checkpoint("reference").classes


def test_serve_defaults_to_reference():
    from fastapi.testclient import TestClient

    from braintumor.serve import create_app

    assert build_parser().parse_args(["serve"]).checkpoint == "reference"
    with TestClient(create_app(Classifier.from_checkpoint("reference"))) as client:
        model = client.get("/api/model").json()
    assert model["arch"] == "resnet18" and len(model["classes"]) == 4


def test_a_missing_reference_file_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "REFERENCE_MODEL", tmp_path / "gone.pt")
    with pytest.raises(UserError, match="reference model is missing"):
        resolve_checkpoint("reference")


def test_reference_is_a_name_that_a_local_file_does_not_shadow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reference").write_text("not a model")
    assert resolve_checkpoint("reference") == REFERENCE_MODEL
