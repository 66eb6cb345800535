"""inference/service.py, results.py, writers.py and data/inputs.py: inputs of every kind, the one status, NaN never
``ok``, the one discovery, the one CSV writer."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from braintumor.data.inputs import expand_inputs, find_files, to_image
from braintumor.data.pixels import ImageReadError
from braintumor.errors import UserError
from braintumor.inference.classifier import Classifier
from braintumor.inference.results import Prediction, csv_columns
from braintumor.inference.service import (BatchOutputs, discover_inputs, iter_predictions, predict_items,
                                          predictions_from, trust_scores)
from braintumor.inference.writers import write_predictions_csv
from braintumor.synthetic.phantom import make_phantom
from helpers import make_checkpoint, make_trusted_checkpoint

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    return Classifier.from_checkpoint(make_trusted_checkpoint(tmp_path_factory.mktemp("svc") / "t.pt",
                                                              image_size=32), device="cpu")


def slice_uint8(size=40) -> np.ndarray:
    return make_phantom("meningioma", size, rng=4)


# ------------------------------------------------------------------ inputs

def test_numpy_and_tensor_inputs_give_the_pixels_of_the_same_image():
    gray = slice_uint8()
    expected = np.asarray(Image.fromarray(gray).convert("RGB"))
    variants = {
        "uint8 HxW": gray, "uint8 HxWx1": gray[..., None], "uint8 HxWx3": np.stack([gray] * 3, -1),
        "uint8 HxWx4": np.concatenate([np.stack([gray] * 3, -1), np.full(gray.shape + (1,), 255, np.uint8)], -1),
        "float 0..1": gray / 255.0, "float whole 0..255": gray.astype(np.float32),
        "int16 whole": gray.astype(np.int16), "tensor CxHxW float": torch.from_numpy(gray / 255.0)[None].repeat(3, 1, 1),
        "tensor 1x1xHxW uint8": torch.from_numpy(gray)[None, None], "tensor HxW": torch.from_numpy(gray),
    }
    for name, item in variants.items():
        image, finite = to_image(item)
        assert finite and image.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=name)
    # Any other range is scaled from its minimum and maximum (a raw MR slice in scanner units).
    scaled, _ = to_image(gray.astype(np.float32) * 7.5 + 100)
    np.testing.assert_allclose(np.asarray(scaled)[..., 0].astype(int),
                               np.rint((gray - gray.min()) / np.ptp(gray) * 255), atol=1)


def test_bad_arrays_are_one_line_errors():
    for bad in (np.zeros((4, 5, 6, 7)), np.zeros((5, 5, 2)), np.array(["a", "b"]), np.zeros((0, 4))):
        with pytest.raises(ImageReadError):
            to_image(bad)
    with pytest.raises(TypeError):
        to_image(3.0)


def test_classifier_predict_takes_arrays_tensors_paths_and_pil_alike(trusted, tmp_path):
    gray = slice_uint8()
    path = tmp_path / "s.png"
    Image.fromarray(gray).save(path)
    single = trusted.predict(gray)
    assert isinstance(single, Prediction) and single.source == "<array 40x40>"
    answers = trusted.predict([str(path), Image.open(path), gray / 255.0, torch.from_numpy(gray)[None], path.read_bytes()])
    for p in answers:
        assert p.predicted_class == single.predicted_class and p.status == single.status
        assert p.probabilities == pytest.approx(single.probabilities, abs=1e-6)
        assert p.atypical_score == pytest.approx(single.atypical_score, abs=1e-5)
    assert answers[0].source == str(path)


# ------------------------------------------------------------------ the one status; NaN is never ok

def test_status_comes_from_the_scores_and_min_confidence(trusted):
    outputs = BatchOutputs([np.zeros((4, 4))], np.array([[0.7, 0.1, 0.1, 0.1]] * 3 + [[0.4, 0.3, 0.2, 0.1]]),
                           np.array([0.5, 2.0, 0.5, 0.5]), np.array([0.5, 0.5, 3.0, 0.5]))
    trusted.min_confidence = 0.5
    try:
        statuses = [p.status for p in predictions_from(trusted, outputs, list("abcd"))]
    finally:
        trusted.min_confidence = 0.0
    assert statuses == ["ok", "not_mri", "atypical", "uncertain"]


def test_trust_scores_by_tier():
    two = np.array([[0.5, 2.0], [3.0, 0.1]], dtype=np.float32)
    not_mri, atypical = trust_scores(two, ("not_mri", "atypical"))
    assert not_mri.tolist() == [0.5, 3.0] and atypical.tolist() == pytest.approx([2.0, 0.1])
    not_mri, atypical = trust_scores(two, ("atypical",))  # a legacy model: no not-MRI tier
    assert not_mri is None and atypical.tolist() == pytest.approx([2.0, 0.1])
    assert trust_scores(np.array([1.5, 0.2]), ("atypical",))[0] is None  # a one-tier (B,) output
    assert trust_scores(None, ()) == (None, None)


def test_a_legacy_one_tier_model_has_no_not_mri_score(tmp_path):
    classifier = Classifier.from_checkpoint(make_trusted_checkpoint(tmp_path / "legacy.pt", image_size=32,
                                                                    legacy=True), device="cpu")
    prediction = classifier.predict(slice_uint8())
    assert prediction.not_mri_score is None and prediction.atypical_score is not None


def _statuses_or_refused(path) -> set[str]:
    """The statuses a damaged model gives (UserError at load is also never ``ok``)."""
    try:
        classifier = Classifier.from_checkpoint(path, device="cpu")
    except UserError:
        return {"refused"}
    predictions = classifier.predict([slice_uint8(), np.zeros((40, 40), np.uint8)])
    for p in predictions:
        assert p.predicted_class is None or p.status == "not_mri"
        json.loads(json.dumps(p.to_dict(), allow_nan=False))  # valid JSON: null, never NaN
    return {p.status for p in predictions}


@pytest.mark.parametrize("temperature", [0.0, float("nan")])
def test_a_temperature_of_zero_or_nan_is_never_ok(tmp_path, temperature):
    from braintumor.models.checkpoint import load_checkpoint, save_checkpoint

    path = make_trusted_checkpoint(tmp_path / "t.pt", image_size=32)
    ckpt = load_checkpoint(path)
    ckpt["trust"]["temperature"] = temperature
    save_checkpoint(ckpt, path)
    assert _statuses_or_refused(path) <= {"not_mri", "refused"}


def test_nan_weights_are_never_ok(tmp_path):
    from braintumor.models.checkpoint import load_checkpoint, save_checkpoint

    path = make_checkpoint(tmp_path / "nan.pt", image_size=32)
    ckpt = load_checkpoint(path)
    ckpt["model"]["fc.3.weight"] = torch.full_like(ckpt["model"]["fc.3.weight"], float("nan"))
    save_checkpoint(ckpt, path)
    assert _statuses_or_refused(path) <= {"not_mri", "refused"}


def test_a_non_finite_input_is_not_mri(trusted):
    values = slice_uint8().astype(np.float32)
    values[3, 4] = np.inf
    prediction = trusted.predict(values)
    assert prediction.status == "not_mri"
    assert trusted.predict(np.full((8, 8), np.nan)).status == "not_mri"


# ------------------------------------------------------------------ batching, dispatch, discovery

def test_unreadable_inputs_stop_or_are_skipped_and_reported(trusted, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(slice_uint8()).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ImageReadError, match="bad.png"):
        list(iter_predictions(trusted, [good, bad], batch_size=1))
    skipped = []
    kept = list(iter_predictions(trusted, [bad, good, bad], batch_size=2, skip_bad=True,
                                 on_skip=lambda source, reason: skipped.append(source)))
    assert [p.source for p in kept] == [str(good)] and skipped == [str(bad), str(bad)]


def test_predict_items_mixes_slices_and_volumes_in_order(trusted):
    from braintumor.data.volumes import Volume
    from braintumor.inference.volume_verdict import VolumeResult

    slices = np.stack([slice_uint8(32)] * 3)
    volume = Volume(source="v.nii", kind="nifti", slices=slices, spacing=(1.0, 1.0, 1.0), window=(0.0, 255.0))
    results = predict_items(trusted, [slices[0], volume, Image.fromarray(slices[1])], sources=["a", "v", "b"])
    assert isinstance(results[0], Prediction) and isinstance(results[1], VolumeResult)
    assert [results[0].source, results[2].source] == ["a", "b"]
    slice0 = results[1].predictions[0]
    assert slice0.volume == "v.nii" and slice0.slice_index == 0 and slice0.source == "v.nii#slice000"
    assert slice0.probabilities == pytest.approx(results[0].probabilities, abs=1e-6)
    summary = results[1].summary()
    assert summary.status in ("ok", "atypical", "not_mri") and len(summary.slices) == 3
    json.loads(json.dumps(summary.to_dict(), allow_nan=False))


def test_volume_slices_with_nan_voxels_are_not_mri_and_an_all_nan_volume_gets_no_verdict(trusted):
    from braintumor.data.volumes import Volume
    from braintumor.inference.service import predict_volume

    slices = np.stack([slice_uint8(32)] * 4)
    some = Volume(source="v.nii", kind="nifti", slices=slices, spacing=(1.0, 1.0, 1.0), window=(0.0, 255.0),
                  nonfinite=np.array([0, 7, 0, 0]))
    statuses = [p.status for p in predict_volume(trusted, some).predictions]
    assert statuses[1] == "not_mri" and len(set(statuses[::2])) == 1
    every = Volume(source="nan.nii", kind="nifti", slices=np.zeros((4, 32, 32), np.uint8), spacing=(1.0, 1.0, 1.0),
                   window=(0.0, 0.0), nonfinite=np.full(4, 32 * 32))
    result = predict_volume(trusted, every)
    assert result.status == "not_mri" and result.verdict is None
    assert all(p.status == "not_mri" for p in result.predictions)


def test_one_discovery_sorted_hidden_skipped_each_file_once(tmp_path):
    root = tmp_path / "scans"
    for relative in ("b/2.png", "a/1.jpg", "a/.hidden.png", ".cache/x.png", "notes.txt", "c.png"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(root / relative, format="PNG")
    expected = [root / "a" / "1.jpg", root / "b" / "2.png", root / "c.png"]
    assert find_files(root) == expected
    from braintumor.data.index import _images_in

    assert _images_in(root) == expected  # training's index uses the same discovery
    assert expand_inputs([root / "c.png", root, root / "c.png"]) == [root / "c.png", *expected[:2]]
    found = discover_inputs([root / "b" / "2.png", root])
    assert found.images == [root / "b" / "2.png", root / "a" / "1.jpg", root / "c.png"] and found.volumes == []


# ------------------------------------------------------------------ the one CSV writer

def test_csv_quotes_line_breaks_keeps_odd_bytes_and_does_not_rewrite_formula_like_names(tmp_path):
    odd = os.fsdecode(b"caf\xe9.png")  # not valid UTF-8: a surrogate escape
    names = ["line\nbreak.png", "carriage\rreturn.png", "=cmd|' /C calc'!A0.png", "-1.png", odd]
    predictions = [Prediction(source=name, predicted_class="glioma", confidence=0.5,
                              probabilities={c: 0.5 if c == "glioma" else 1 / 6 for c in CLASSES}, status="ok",
                              not_mri_score=float("nan"), atypical_score=0.25) for name in names]
    path = write_predictions_csv(tmp_path / "p.csv", predictions, CLASSES)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == csv_columns(CLASSES) and len(rows) == 1 + len(names)
    assert [row[0] for row in rows[1:]] == names  # every name round-trips, formula-like ones unchanged
    assert os.fsencode(rows[-1][0]) == b"caf\xe9.png"
    assert all(row[rows[0].index("not_mri_score")] == "" for row in rows[1:])  # NaN: an empty cell
    text = path.read_bytes()
    assert text.count(b"\r\n") == len(rows)


def test_the_json_of_a_prediction_is_strict_json():
    p = Prediction(source="x", predicted_class=None, confidence=float("nan"),
                   probabilities={c: float("nan") for c in CLASSES}, status="not_mri", not_mri_score=float("inf"))
    data = json.loads(json.dumps(p.to_dict(), allow_nan=False))
    assert data["confidence"] is None and data["not_mri_score"] is None and data["status"] == "not_mri"
    assert list(data) == ["source", "predicted_class", "confidence", "probabilities", "status", "not_mri_score",
                          "atypical_score", "volume", "slice_index"]


@pytest.mark.slow
def test_predict_csv_on_a_name_that_is_not_utf8_under_a_strict_stdout(tmp_path):
    """Through the real CLI process: a UTF-8 stdout in strict mode must not crash on the name."""
    import subprocess
    import sys

    checkpoint = make_checkpoint(tmp_path / "m.pt", image_size=32)
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsencode(str(folder)) + b"/caf\xe9.png"
    with open(name, "wb") as handle:
        Image.fromarray(slice_uint8(32)).save(handle, format="PNG")
    result = subprocess.run([sys.executable, "-m", "braintumor", "predict", str(checkpoint), str(folder), "--csv",
                             "--device", "cpu"], capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout.decode("utf-8", "surrogateescape"))))
    assert len(rows) == 2 and os.fsencode(rows[1][0]) == name
