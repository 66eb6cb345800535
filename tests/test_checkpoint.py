"""checkpoint.py: atomic writes survive a kill, loading is weights-only and checked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from braintumor.atomic import atomic_write
from braintumor.checkpoint import load_checkpoint, model_from_checkpoint, publish_copy, save_checkpoint
from braintumor.errors import UserError

from conftest import make_checkpoint


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


def test_killed_checkpoint_write_leaves_previous_last_pt_loadable(tmp_path):
    """SIGKILL in the middle of writing a new last.pt: the old one is still there and loads."""
    last = make_checkpoint(tmp_path / "last.pt", classes=("x", "y"), seed=5)
    before = load_checkpoint(last)["model"]["fc.3.weight"].clone()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from braintumor import checkpoint

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


def test_best_snapshot_survives_later_last_checkpoints(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint({"model": {}, "epoch": 1}, last)
    publish_copy(last, best)
    save_checkpoint({"model": {}, "epoch": 2}, last)  # replaced by rename: the snapshot keeps epoch 1
    assert torch.load(best, weights_only=True)["epoch"] == 1
    assert torch.load(last, weights_only=True)["epoch"] == 2
    publish_copy(last, best)
    assert torch.load(best, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
