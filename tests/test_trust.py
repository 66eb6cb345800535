"""The trust tiers through the Classifier, temperature scaling and the fit into checkpoints (trust/ood.py,
trust/temperature.py, trust/fitting.py); tests/test_trust_tiers.py has the tiers' own unit tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from braintumor.trust.temperature import fit_temperature, softmax
from braintumor.models.checkpoint import load_checkpoint
from braintumor.training.config import TrainConfig
from braintumor.data.index import discover
from braintumor.evaluation.metrics import expected_calibration_error
from braintumor.trust.ood import acceptance_threshold, fit_mahalanobis
from braintumor.synthetic.phantom import make_phantom, write_phantom_set
from braintumor.inference.classifier import Classifier
from braintumor.trust.fitting import fit_trust, store_trust


@pytest.fixture(scope="module")
def phantom_model(phantom_dir, tmp_path_factory):
    """A resnet18 trained briefly on the 24 phantoms (32 px), with the detector refitted on a separate
    validation set of 8 phantoms per class; training itself already fitted one into best.pt."""
    from braintumor.training.trainer import train

    root = tmp_path_factory.mktemp("trust")
    result = train(TrainConfig(data=str(phantom_dir), arch="resnet18", weights="none", image_size=32, epochs=2,
                               batch_size=8, lr=2e-3, device="cpu", workers=0, data_cache="memory",
                               progress=False, out=str(root / "run")))
    trained_trust = load_checkpoint(result.best_checkpoint)["trust"]
    val = discover(write_phantom_set(root / "val", per_class=8, size=64, seed=77))
    train_index = discover(phantom_dir)
    trust = fit_trust(result.best_checkpoint, train_index.paths, train_index.labels, val.paths, val.labels)
    store_trust(result.best_checkpoint, trust)
    return {"checkpoint": result.best_checkpoint, "trained_trust": trained_trust, "run_dir": result.run_dir}


def natural_photo() -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))


def out_of_distribution_inputs() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    text = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(text).text((10, 50), "not an MRI slice", fill="black")
    return {"noise": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
            "gray noise": Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).convert("RGB"),
            "black": Image.new("RGB", (64, 64), "black"), "white": Image.new("RGB", (64, 64), "white"),
            "photo": natural_photo(), "text": text}


@pytest.mark.slow
def test_training_fits_both_tiers_and_temperature_into_best_pt(phantom_model):
    trust = phantom_model["trained_trust"]
    assert trust["not_mri"]["method"] == "gaussian-statistics" and trust["atypical"]["method"] == "mahalanobis-mondrian"
    assert trust["temperature"] > 0 and trust["n_val"] == 4
    assert trust["warnings"]  # 4 validation slices calibrate nothing: said so
    assert "trust" not in load_checkpoint(phantom_model["run_dir"] / "last.pt")  # last.pt stays as trained


@pytest.mark.slow
def test_not_mri_flags_noise_blanks_photo_and_text_and_accepts_held_aside_phantoms(phantom_model):
    classifier = Classifier.from_checkpoint(phantom_model["checkpoint"])
    names, images = zip(*out_of_distribution_inputs().items())
    for name, prediction in zip(names, classifier.predict(list(images))):
        assert prediction.status == "not_mri" and prediction.not_mri_score > 1, (name, prediction.not_mri_score)
        assert prediction.shown_class is None
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)  # still available
    held_aside = [Image.fromarray(make_phantom(label, 64, 5000 + i)) for i in range(6)
                  for label in ("glioma", "meningioma", "notumor", "pituitary")]
    statuses = [p.status for p in classifier.predict(held_aside)]
    assert statuses.count("not_mri") <= 1  # real-looking slices are (almost) never refused


@pytest.mark.slow
def test_onnx_backend_gives_the_same_trust_scores_and_status(phantom_model, tmp_path):
    from braintumor.inference.export import export_onnx

    onnx_path = export_onnx(phantom_model["checkpoint"], tmp_path / "model.onnx")
    torch_clf = Classifier.from_checkpoint(phantom_model["checkpoint"])
    onnx_clf = Classifier.from_checkpoint(onnx_path, backend="onnx")
    assert onnx_clf.trust_tiers == torch_clf.trust_tiers == ("not_mri", "atypical")
    assert onnx_clf.temperature == pytest.approx(torch_clf.temperature)
    images = list(out_of_distribution_inputs().values()) + [Image.fromarray(make_phantom("glioma", 64, 9))]
    for a, b in zip(torch_clf.predict(images), onnx_clf.predict(images)):
        assert a.status == b.status
        for score in ("not_mri_score", "atypical_score"):
            assert getattr(a, score) == pytest.approx(getattr(b, score), rel=1e-4, abs=1e-4)
        for name in a.probabilities:
            assert a.probabilities[name] == pytest.approx(b.probabilities[name], abs=1e-5)


def test_mahalanobis_distance_matches_scipy_with_the_same_covariance():
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], 40)
    features = rng.normal(size=(120, 6)) + labels[:, None] * 2.0
    detector = fit_mahalanobis(features, labels)
    means = np.stack([features[labels == k].mean(axis=0) for k in range(3)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(features - means[labels]).covariance_)
    queries = rng.normal(size=(5, 6)) * 3
    expected = [min(mahalanobis(q, m, precision) for m in means) for q in queries]
    got = detector.distance(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_acceptance_threshold_is_the_conformal_order_statistic():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    assert acceptance_threshold(scores, 0.95) == 96.0  # ceil(101 * 0.95) = 96th smallest
    assert acceptance_threshold([3.0, 1.0, 2.0], 0.95) == 3.0  # too few scores: the largest


def overconfident_logits(n=600, classes=4, seed=0):
    """Logits of a model that is right ~70 % of the time but ~99 % sure."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    predicted = np.where(rng.random(n) < 0.7, labels, rng.integers(0, classes, n))
    logits = rng.normal(0, 0.5, (n, classes))
    logits[np.arange(n), predicted] += 6.0
    return logits, labels


def test_temperature_scaling_lowers_ece_and_never_changes_the_argmax():
    logits, labels = overconfident_logits()
    temperature = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, temperature)
    assert temperature > 1.5  # an over-confident model is softened
    assert expected_calibration_error(after, labels) < expected_calibration_error(before, labels) / 2
    np.testing.assert_array_equal(before.argmax(axis=1), after.argmax(axis=1))
    # Against a brute-force grid search of the negative log-likelihood (an independent reference).
    from scipy.special import log_softmax

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    nll = [-log_softmax(logits / t, axis=1)[np.arange(len(labels)), labels].mean() for t in grid]
    best = grid[int(np.argmin(nll))]
    assert temperature == pytest.approx(best, rel=5e-3)


def test_a_checkpoint_without_trust_still_predicts_with_no_scores(tiny_checkpoint):
    prediction = Classifier.from_checkpoint(tiny_checkpoint).predict(Image.new("RGB", (64, 64)))
    assert prediction.not_mri_score is None and prediction.atypical_score is None and prediction.status == "ok"


def test_min_confidence_gives_uncertain(tiny_checkpoint):
    classifier = Classifier.from_checkpoint(tiny_checkpoint)
    classifier.min_confidence = 0.99
    prediction = classifier.predict(Image.fromarray(make_phantom("glioma", 64, 1)))
    assert prediction.status == "uncertain" and prediction.shown_class is None
    assert prediction.to_dict()["status"] == "uncertain"
