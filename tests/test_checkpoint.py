"""checkpoint.py: atomic writes survive a kill, loading is weights-only and checked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from braintumor.utils.atomic import atomic_write
from braintumor.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from braintumor.errors import UserError

from helpers import make_checkpoint


def test_round_trip_rebuilds_the_model(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt.pt", classes=("a", "b", "c"), seed=3)
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == 1 and ckpt["classes"] == ["a", "b", "c"] and ckpt["arch"] == "resnet18"
    model = model_from_checkpoint(ckpt)
    assert not model.training
    assert torch.equal(model.fc[3].weight, ckpt["model"]["fc.3.weight"])
    # A run folder resolves to its best.pt.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(path.read_bytes())
    assert load_checkpoint(tmp_path / "run")["classes"] == ["a", "b", "c"]


def test_load_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="is not a braintumor checkpoint"):
        load_checkpoint(other)


class NotAllowed:  # a pickled object that weights_only loading must refuse
    pass


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "classes": ["a", "b"], "image_size": 32, "mean": [0.0] * 3, "std": [1.0] * 3,
                "arch": "resnet18", "payload": NotAllowed()}, path)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.bin"
    atomic_write(path, lambda handle: handle.write(b"first"))

    def broken(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["report.bin"]  # no temp file left behind


@pytest.mark.slow
def test_killed_checkpoint_write_leaves_previous_last_pt_loadable(tmp_path):
    """SIGKILL in the middle of writing a new last.pt: the old one is still there and loads."""
    last = make_checkpoint(tmp_path / "last.pt", classes=("x", "y"), seed=5)
    before = load_checkpoint(last)["model"]["fc.3.weight"].clone()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from braintumor.models import checkpoint

        def save_then_die(obj, handle):
            handle.write(b"PK" + b"0" * 100_000)  # part of a new checkpoint reaches the disk
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_then_die
        checkpoint.save_checkpoint({{"model": {{}}, "classes": ["p", "q"]}}, {str(last)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9  # really killed mid-write
    after = load_checkpoint(last)
    assert after["classes"] == ["x", "y"]
    assert torch.equal(after["model"]["fc.3.weight"], before)


def test_save_checkpoint_adds_format_version(tmp_path):
    save_checkpoint({"model": {}, "value": torch.arange(3)}, tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format_version"] == 1 and torch.equal(raw["value"], torch.arange(3))


def spec(**changes):
    from braintumor.models.checkpoint import ModelSpec

    values = dict(arch="resnet18", classes=("a", "b", "c"), image_size=32, mean=(0.5, 0.4, 0.3),
                  std=(0.2, 0.2, 0.2))
    return ModelSpec(**{**values, **changes})


def test_model_spec_round_trips_and_validates():
    from braintumor.models.checkpoint import ModelSpec

    full = spec(tta=True, trust={"temperature": 1.5, "ood": {"mean": torch.zeros(2)}})
    data = full.to_dict()
    assert data["classes"] == ["a", "b", "c"] and data["mean"] == [0.5, 0.4, 0.3]  # plain lists, for JSON
    assert ModelSpec.from_dict(data) == full and ModelSpec.from_dict(spec().to_dict()) == spec()
    assert "trust" not in spec().to_dict()
    assert full.temperature == 1.5 and full.ood_state is not None and spec().temperature == 1.0
    assert json.loads(json.dumps(spec(tta=True).to_dict())) == spec(tta=True).to_dict()
    for bad in (dict(classes=("a",)), dict(classes=("a", "a")), dict(image_size=0), dict(image_size=True),
                dict(mean=(0.5, 0.5)), dict(std=(0.2, 0.0, 0.2)), dict(mean=(float("nan"), 0, 0)),
                dict(tta="yes"), dict(arch=""), dict(trust=[1.5])):
        with pytest.raises(ValueError):
            spec(**bad)
    with pytest.raises(ValueError, match="missing image_size"):
        ModelSpec.from_dict({"arch": "resnet18", "classes": ["a", "b"], "mean": [0] * 3, "std": [1] * 3})


@pytest.mark.slow
def test_old_checkpoints_load_with_defaults_and_ema_weights(tmp_path):
    """A checkpoint of the first format (no tta, no trust; an EMA run keeps its average under "ema") still loads."""
    from braintumor.models.checkpoint import spec_of
    from braintumor.models.network import build_model

    torch.manual_seed(0)
    trained, averaged = build_model("resnet18", 2), build_model("resnet18", 2)
    path = tmp_path / "old.pt"
    torch.save({"format_version": 1, "model": trained.state_dict(), "ema": {"module": averaged.state_dict(),
                "updates": 3, "decay": 0.9}, "optimizer": {"state": {}}, "classes": ["a", "b"], "image_size": 48,
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "arch": "resnet18"}, path)
    ckpt = load_checkpoint(path)
    loaded = spec_of(ckpt, path)
    assert loaded == spec(classes=("a", "b"), image_size=48, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert loaded.tta is False and loaded.trust is None
    assert torch.equal(model_from_checkpoint(ckpt).fc[3].weight, averaged.fc[3].weight)


def test_a_damaged_spec_is_a_user_error_naming_the_file(tmp_path):
    path = make_checkpoint(tmp_path / "m.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["mean"] = [0.5]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"m\.pt is damaged: mean must be 3 finite numbers"):
        model_from_checkpoint(load_checkpoint(path), path)


@pytest.mark.slow
def test_best_checkpoint_holds_validated_weights_and_spec_only(tmp_path):
    """best.pt from a full resume checkpoint: the EMA weights, the spec, provenance; no optimizer, no RNG state;
    about the size of the weights."""
    from braintumor.models.checkpoint import save_inference_checkpoint, spec_of
    from braintumor.models.network import build_model

    torch.manual_seed(1)
    model, averaged = build_model("resnet18", 3), build_model("resnet18", 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # two moment buffers per weight: twice the weights' bytes
    full = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()},
            "ema": {"module": averaged.state_dict(), "updates": 1, "decay": 0.9}, "history": [{"epoch": 1}],
            "config": {"lr": 0.001}, "epoch": 1, "best_val_accuracy": 0.5, "best_epoch": 1, **spec(tta=True).to_dict()}
    save_checkpoint(full, tmp_path / "last.pt")
    best = save_inference_checkpoint(full, tmp_path / "best.pt")
    ckpt = load_checkpoint(best)
    assert set(ckpt) == {"format_version", "model", *spec(tta=True).to_dict(), "config", "epoch", "best_val_accuracy"}
    assert spec_of(ckpt) == spec(tta=True)
    assert all(torch.equal(ckpt["model"][key], value) for key, value in averaged.state_dict().items())
    weight_bytes = sum(t.numel() * t.element_size() for t in averaged.state_dict().values())
    assert best.stat().st_size < 1.05 * weight_bytes
    assert (tmp_path / "last.pt").stat().st_size > 3 * weight_bytes  # weights + EMA + two Adam moments


def test_resume_repairs_a_best_checkpoint_the_kill_left_stale(tmp_path):
    from braintumor.models.checkpoint import save_inference_checkpoint
    from braintumor.training.runstate import repair_best

    last = load_checkpoint(make_checkpoint(tmp_path / "last.pt"))
    save_inference_checkpoint({**last, "epoch": 1}, tmp_path / "best.pt")
    last.update(epoch=2, best_epoch=2, optimizer={"state": {}})
    repair_best(tmp_path, last)
    repaired = load_checkpoint(tmp_path / "best.pt")
    assert repaired["epoch"] == 2 and "optimizer" not in repaired
    before = (tmp_path / "best.pt").stat().st_mtime_ns
    repair_best(tmp_path, last)  # up to date: left alone
    assert (tmp_path / "best.pt").stat().st_mtime_ns == before


def test_the_shipped_reference_model_reads_as_a_spec():
    from braintumor.models.checkpoint import REFERENCE_MODEL, spec_of

    loaded = spec_of(load_checkpoint("reference"), REFERENCE_MODEL)
    assert loaded.arch == "resnet18" and loaded.classes == ("glioma", "meningioma", "notumor", "pituitary")
    # stored without TTA (MODEL_CARD.md: mirror TTA did not improve its validation accuracy)
    assert loaded.tta is False and loaded.temperature != 1.0
    assert {"not_mri", "atypical"} <= set(loaded.trust) and loaded.ood_state is None  # two tiers, no legacy entry
