"""Test-time augmentation: a mirror-symmetric input gives the same answer with and without it; otherwise the
mirrored slice really reaches the model, on the torch and ONNX backends alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braintumor.inference.classifier import Classifier
from braintumor.inference.service import calibrate, tta_views


def probabilities(model, images, tta=False, temperature=1.0):
    views, _ = tta_views(model, images, tta)
    return torch.from_numpy(calibrate([view.numpy() for view in views], temperature))


def test_tta_views_is_the_batch_and_its_mirror_and_calibrate_averages_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3)).eval()
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = probabilities(model, images)
        tta = probabilities(model, images, tta=True)
        mirror = torch.softmax(model(images.flip(-1)), dim=1)
        torch.testing.assert_close(tta, (plain + mirror) / 2)
        assert not torch.allclose(tta, plain)  # the mirror changes the answer for an asymmetric model and input
        symmetric = images + images.flip(-1)
        torch.testing.assert_close(probabilities(model, symmetric, tta=True), probabilities(model, symmetric),
                                   rtol=0, atol=1e-6)
        # the temperature divides the logits of every view
        cooled = probabilities(model, images, tta=True, temperature=2.0)
        expected = (torch.softmax(model(images) / 2, 1) + torch.softmax(model(images.flip(-1)) / 2, 1)) / 2
        torch.testing.assert_close(cooled, expected)


@pytest.mark.parametrize("temperature", [0.0, float("nan"), float("inf"), -1.0])
def test_a_temperature_that_is_not_positive_and_finite_gives_nan_never_a_confident_answer(temperature):
    logits = np.array([[5.0, 0.0, 0.0]], dtype=np.float32)
    assert np.isnan(calibrate([logits], temperature)).all()


def test_tta_views_keeps_the_scores_of_the_unmirrored_batch():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)

    def forward(batch):
        return batch.flatten(1)[:, :3], batch.flatten(1)[:, 0] * 10

    views, scores = tta_views(forward, images, tta=True)
    assert len(views) == 2 and torch.equal(scores, images.flatten(1)[:, 0] * 10)
    assert torch.equal(views[1], images.flip(-1).flatten(1)[:, :3])


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint, tmp_path_factory):
    from braintumor.inference.export import export

    return export(tiny_checkpoint, "onnx", tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.mark.slow
def test_classifier_tta_on_both_backends(tiny_checkpoint, onnx_export):
    rng = np.random.default_rng(0)
    asymmetric = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    asymmetric[:, :20] = 255
    symmetric = np.concatenate([asymmetric[:, :32], asymmetric[:, :32][:, ::-1]], axis=1)
    from PIL import Image

    for path in (tiny_checkpoint, onnx_export):
        plain = Classifier.from_checkpoint(path, tta=False)
        tta = Classifier.from_checkpoint(path, tta=True)
        assert tta.tta and not plain.tta and tta.describe()["tta"]
        a = plain.predict(Image.fromarray(asymmetric)).probabilities
        b = tta.predict(Image.fromarray(asymmetric)).probabilities
        mirrored = plain.predict(Image.fromarray(asymmetric[:, ::-1].copy())).probabilities
        for name in plain.classes:
            assert b[name] == pytest.approx((a[name] + mirrored[name]) / 2, abs=1e-5)
        assert max(abs(a[n] - b[n]) for n in plain.classes) > 1e-4
        s1 = plain.predict(Image.fromarray(symmetric)).probabilities
        s2 = tta.predict(Image.fromarray(symmetric)).probabilities
        assert all(s1[n] == pytest.approx(s2[n], abs=1e-6) for n in plain.classes)


@pytest.mark.slow
def test_stored_setting_is_the_default_and_travels_into_onnx(tmp_path):
    from braintumor.models.checkpoint import load_checkpoint, save_checkpoint
    from braintumor.inference.export import export
    from helpers import make_checkpoint

    path = make_checkpoint(tmp_path / "m.pt", image_size=32)
    ckpt = load_checkpoint(path)
    save_checkpoint({**ckpt, "tta": True}, path)
    assert Classifier.from_checkpoint(path).tta
    onnx_path = export(path, "onnx", tmp_path / "m.onnx")
    assert Classifier.from_checkpoint(onnx_path).tta
    assert not Classifier.from_checkpoint(onnx_path, tta=False).tta
