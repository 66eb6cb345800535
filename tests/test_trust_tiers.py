"""The two trust tiers (trust/ood.py, trust/fitting.py): Mondrian thresholds, round trips of a two-tier checkpoint,
legacy one-tier checkpoints, non-finite inputs, and what `braintumor calibrate` may write."""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import pytest
import torch

from braintumor.models.checkpoint import REFERENCE_MODEL, load_checkpoint, model_from_checkpoint
from braintumor.trust.fitting import Features, describe_trust, fit_trust_from_features, stage_widths, store_trust
from braintumor.trust.ood import (MISSING_NOT_MRI, ScoringNet, acceptance_threshold,
                                  backbone_features, fit_mahalanobis, missing_tiers_note, mondrian_thresholds,
                                  trust_head_from_state, trust_summary, trust_tiers)
from braintumor.trust.status import NOT_MRI, status_of

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


# ------------------------------------------------------------------------------------------ Mondrian thresholds


def test_mondrian_thresholds_flag_each_class_at_the_promised_rate_where_one_threshold_does_not():
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 4.0, 0.5, 2.0])  # one class's scores run four times higher than another's
    calibration_groups = rng.integers(0, 4, 8000)
    calibration = rng.exponential(scales[calibration_groups])
    thresholds, counts = mondrian_thresholds(calibration, calibration_groups, 4, rate=0.02)
    assert counts.sum() == 8000
    fresh_groups = np.repeat(np.arange(4), 50_000)
    fresh = rng.exponential(scales[fresh_groups])
    flagged = fresh > thresholds[fresh_groups]
    for group in range(4):
        assert 0.01 <= flagged[fresh_groups == group].mean() <= 0.03, group
        # on its own calibration scores the conformal threshold never flags more than the rate
        assert (calibration[calibration_groups == group] > thresholds[group]).mean() <= 0.02
    pooled = acceptance_threshold(calibration, 0.98)
    pooled_rates = [(fresh[fresh_groups == g] > pooled).mean() for g in range(4)]
    assert max(pooled_rates) > 0.05 and min(pooled_rates) < 0.005  # what the per-class thresholds fix


def test_a_group_without_calibration_scores_takes_the_pooled_threshold():
    thresholds, counts = mondrian_thresholds(np.arange(1, 101.0), np.zeros(100, dtype=int), 3, rate=0.02)
    assert counts.tolist() == [100, 0, 0]
    assert thresholds[1] == thresholds[2] == acceptance_threshold(np.arange(1, 101.0), 0.98)


# ------------------------------------------------------------------------------------------ a two-tier model


@pytest.fixture(scope="module")
def two_tier(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with both tiers fitted on synthetic features of the right shapes (no images)."""
    ckpt = load_checkpoint(tiny_checkpoint)
    model = model_from_checkpoint(ckpt)
    widths = stage_widths(model)
    rng = np.random.default_rng(1)

    def features(n, labels, shift=0.0):
        pooled = rng.normal(size=(n, 512)) + labels[:, None] + shift
        logits = np.eye(4)[labels] * 5 + rng.normal(size=(n, 4))
        return Features(pooled.astype(np.float32), (rng.normal(size=(n, 2 * sum(widths))) + shift).astype(np.float32),
                        logits.astype(np.float32))

    train_labels, val_labels = np.arange(400) % 4, np.arange(200) % 4
    trust = fit_trust_from_features(features(400, train_labels), train_labels, features(200, val_labels), val_labels,
                                    CLASSES, widths, fit_negatives=features(40, np.zeros(40, dtype=int), shift=3.0))
    path = store_trust(tiny_checkpoint, trust, tmp_path_factory.mktemp("two-tier") / "two.pt")
    return path, trust


@pytest.mark.slow
def test_fitting_reports_per_class_rates_and_flags_the_fit_negatives(two_tier):
    _, trust = two_tier
    assert trust_tiers(trust) == ("not_mri", "atypical")
    rates = trust["atypical"]["val_rate_by_predicted"]
    assert set(rates) == set(CLASSES) and all(rate <= 0.02 for rate in rates.values())
    assert trust["not_mri"]["val_rate"] <= 0.005 and trust["not_mri"]["fit_negatives_flagged"] == 1.0
    text = describe_trust(trust)
    assert "meningioma" in text and "not_mri" in text
    summary = trust_summary(trust)  # what export metadata may carry: no tensors
    assert summary["tiers"] == ["not_mri", "atypical"] and "whitening" not in summary["atypical"]
    import json

    json.dumps(summary)


def _scoring_net(path):
    ckpt = load_checkpoint(path)
    return ScoringNet(model_from_checkpoint(ckpt), trust_head_from_state(ckpt["trust"])).eval()


def test_a_two_tier_checkpoint_round_trips_with_equal_scores(two_tier):
    path, trust = two_tier
    images = torch.randn(3, 3, 64, 64)
    reloaded = _scoring_net(path)
    original = ScoringNet(reloaded.model, trust_head_from_state(trust)).eval()
    with torch.no_grad():
        logits, scores = reloaded(images)
        expected = original(images)[1]
    assert scores.shape == (3, 2) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected)
    assert torch.isfinite(scores).all() and (scores >= 0).all()
    torch.load(path, weights_only=True)  # tensors and plain data only


@pytest.mark.slow
def test_a_two_tier_scoring_net_traces_and_exports_to_onnx_unchanged(two_tier):
    import onnxruntime

    net = _scoring_net(two_tier[0])
    images = torch.randn(2, 3, 64, 64)
    images[1, 0, 5, 5] = float("nan")
    with torch.no_grad():
        _, expected = net(images)
        traced = torch.jit.trace(net, images[:1])
        torch.testing.assert_close(traced(images)[1], expected)
    buffer = io.BytesIO()
    torch.onnx.export(net, images[:1], buffer, opset_version=17, input_names=["input"],
                      output_names=["logits", "trust_scores"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue())
    got = session.run(None, {"input": images.numpy()})[1]
    np.testing.assert_allclose(got[0], expected[0].numpy(), rtol=1e-4)
    assert np.isinf(got[1]).all()


def test_non_finite_pixels_give_infinite_scores_and_status_not_mri(two_tier):
    net = _scoring_net(two_tier[0])
    images = torch.zeros(3, 3, 64, 64)
    images[0, 1, 2, 3] = float("nan")
    images[1] = float("inf")
    with torch.no_grad():
        _, scores = net(images)
    assert torch.isinf(scores[:2]).all() and torch.isfinite(scores[2]).all()
    assert status_of(0.9, float(scores[0, 0]), float(scores[0, 1])) == NOT_MRI


# ------------------------------------------------------------------------------------------ legacy checkpoints


def legacy_trust(rng=np.random.default_rng(2)):
    detector = fit_mahalanobis(rng.normal(size=(200, 512)), np.arange(200) % 4)
    detector.threshold.fill_(7.5)
    return {"ood": detector.state(), "temperature": 1.3, "accept_rate": 0.95, "val_accepted": 0.95,
            "val_ece_before": 0.05, "val_ece_after": 0.01, "n_train": 200, "n_val": 40}, detector


def test_a_legacy_one_tier_checkpoint_loads_as_atypical_only_and_says_what_it_lacks(tiny_checkpoint, tmp_path):
    trust, detector = legacy_trust()
    path = store_trust(tiny_checkpoint, trust, tmp_path / "legacy.pt")
    state = load_checkpoint(path)["trust"]
    assert trust_tiers(state) == ("atypical",)
    assert missing_tiers_note(state) == MISSING_NOT_MRI
    net = _scoring_net(path)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        _, scores = net(images)
        pooled, _ = backbone_features(net.model, images)
    assert (scores[:, 0] == 0).all()  # no not-MRI tier: never flags
    torch.testing.assert_close(scores[:, 1], detector(pooled))  # the old rule: nearest centre / one threshold
    assert "not_mri: none" in describe_trust(state)


def test_the_0_1_scoring_net_signature_still_works():
    from braintumor.models.network import build_model

    _, detector = legacy_trust()
    net = ScoringNet(build_model("resnet18", 4).eval(), detector).eval()
    with torch.no_grad():
        _, scores = net(torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, 2) and (scores[:, 0] == 0).all()


def test_no_trust_entry_means_no_head():
    assert trust_tiers(None) == () and trust_head_from_state(None) is None
    assert trust_tiers({"temperature": 1.0}) == ()


@pytest.mark.parametrize("state", [
    {"ood": {"mean": 1}}, {"ood": "x"}, "hot", {"not_mri": {"method": "gaussian-statistics", "blocks": []}},
    {"atypical": {"method": "mahalanobis-mondrian", "whitening": torch.eye(3), "centers": torch.zeros(4, 3),
                  "thresholds": torch.ones(2)}},
    {"ood": {"method": "mahalanobis", "whitening": torch.eye(3), "centers": torch.zeros(4, 3), "threshold": "x"}},
    {"ood": {"method": "mahalanobis", "whitening": torch.full((3, 3), float("nan")), "centers": torch.zeros(4, 3),
             "threshold": 1.0}},
])
def test_a_malformed_trust_entry_is_a_value_error(state):
    with pytest.raises(ValueError):
        trust_head_from_state(state)


# ------------------------------------------------------------------------------------------ fit warnings


def test_fitting_on_too_few_validation_slices_warns_on_one_line(caplog):
    rng = np.random.default_rng(3)
    widths = [4, 4, 4, 4]

    def features(n, labels):
        return Features(rng.normal(size=(n, 6)).astype(np.float32) + labels[:, None],
                        rng.normal(size=(n, 32)).astype(np.float32), np.eye(4)[labels].astype(np.float32) * 3)

    train_labels, val_labels = np.arange(80) % 4, np.arange(8) % 4
    with caplog.at_level(logging.WARNING, logger="braintumor.trust"):
        trust = fit_trust_from_features(features(80, train_labels), train_labels, features(8, val_labels),
                                        val_labels, CLASSES, widths)
    messages = [record.getMessage() for record in caplog.records]
    assert any("fewer than 20 per class" in message and "\n" not in message for message in messages)
    assert any("temperature sits on its bound" in message for message in messages)  # perfect logits: T -> bound
    assert len(trust["warnings"]) == 2


# ------------------------------------------------------------------------------------------ calibrate


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_calibrate_reference_without_out_refuses_and_leaves_the_shipped_file_alone(capsys):
    from braintumor.cli import main

    before = sha256(REFERENCE_MODEL)
    assert main(["calibrate", "reference", "--data", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0]
    assert sha256(REFERENCE_MODEL) == before


def test_calibrate_out_never_overwrites_silently_nor_writes_into_the_package(tiny_checkpoint, tmp_path, capsys):
    from braintumor.cli import main

    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"keep me")
    assert main(["calibrate", str(tiny_checkpoint), "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    inside = REFERENCE_MODEL.parent / "calibrated.pt"
    assert main(["calibrate", str(tiny_checkpoint), "--out", str(inside)]) == 2
    assert "inside the installed package" in capsys.readouterr().err and not inside.exists()
    assert main(["calibrate", "reference", "--out", str(REFERENCE_MODEL)]) == 2
    assert sha256(REFERENCE_MODEL) == sha256(REFERENCE_MODEL)  # (checked against the start by conftest)


@pytest.mark.slow
def test_calibrate_out_writes_a_two_tier_copy_and_leaves_the_source(tiny_checkpoint, phantom_dir, tmp_path, capsys):
    import shutil

    from braintumor.cli import main

    source = shutil.copy(tiny_checkpoint, tmp_path / "old.pt")
    before = sha256(source)
    out = tmp_path / "new.pt"
    assert main(["calibrate", str(source), "--data", str(phantom_dir), "--out", str(out), "--workers", "0"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)  # the written file, last
    assert sha256(source) == before
    assert trust_tiers(load_checkpoint(out)["trust"]) == ("not_mri", "atypical")
    assert main(["calibrate", str(source), "--data", str(phantom_dir), "--out", str(out)]) == 2  # exists now


def test_a_flat_image_of_any_value_is_blank_and_a_slice_is_not():
    """The pixel check every not-MRI tier with a colour check applies: fewer than BLANK_LEVELS 8-bit levels."""
    import torch

    from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from braintumor.synthetic.phantom import make_phantom
    from braintumor.trust.ood import BLANK_LEVELS, ColourCheck, pixel_checks

    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)

    def normalized(pixels: np.ndarray) -> torch.Tensor:  # (H, W) 8-bit gray -> (1, 3, H, W) as preprocessing does
        image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None].repeat(3, 1, 1)
        return ((image - mean[:, None, None]) / std[:, None, None])[None]

    flat = [np.full((32, 32), value, np.uint8) for value in (0, 128, 255)]
    faint = np.zeros((32, 32), np.uint8)
    faint[::2] = 3  # 3 levels: still blank
    slice_ = make_phantom("glioma", 32, 1)
    scores = [float(pixel_checks(normalized(p), mean, std)[1]) for p in (*flat, faint, slice_)]
    assert all(score > 1 for score in scores[:4]) and scores[4] < 0.05
    assert scores[3] == pytest.approx(BLANK_LEVELS / 3, rel=1e-3)
    check = ColourCheck(mean, std, threshold=8.0)  # gray: the colour part stays 0, the blank part decides
    assert float(check(normalized(flat[1]))) > 1 and float(check(normalized(slice_))) < 1
