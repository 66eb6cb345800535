"""Training interrupted at every write boundary, then ``braintumor train --resume``: the same run as without the crash.

The interruption is an exception raised at the boundary (faster than a real SIGKILL, and at an exact place);
what a SIGKILL leaves beyond that, a half-written temporary file, is added by hand. After the resume, the final
weights (last.pt and best.pt), the metrics and the report must equal those of an uninterrupted run, and no
temporary file may remain.
"""

from __future__ import annotations

import json

import pytest
import torch

from braintumor.evaluation import report as report_module
from braintumor.training import trainer as train_module
from braintumor.cli import main

TIMING_KEYS = {"seconds", "images_per_second", "elapsed_seconds", "seconds_to_first_epoch"}


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way out treats it as an error to report."""


def train_args(data, out):
    return ["train", str(data), "--arch", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "2",
            "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--workers", "0", "--no-progress",
            "--max-steps-per-epoch", "2", "--data-cache", "memory", "--out", str(out)]


def outcome(run):
    """What must not depend on the crash: weights, metrics (without timings), the report's figures."""
    weights = {name: torch.load(run / name, weights_only=True)["model"] for name in ("last.pt", "best.pt")}
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((run / "report.json").read_text())
    report.pop("extra", None)  # names the checkpoint by its hash, which covers the timings in its history
    return weights, metrics, report


@pytest.fixture(scope="module")
def reference(phantom_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(phantom_dir, run)) == 0
    return outcome(run)


def kill_on_call(monkeypatch, owner, name, call, when=lambda *args, **kwargs: True):
    """Raise Killed on the ``call``-th call of ``owner.name`` for which ``when(args)`` holds, before it runs."""
    original = getattr(owner, name)
    seen = {"n": 0}

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            seen["n"] += 1
            if seen["n"] == call:
                raise Killed(f"{name} #{call}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


CRASH_POINTS = {
    # epoch 2: before its metrics line, between metrics and last.pt
    "before-metrics": lambda mp: kill_on_call(mp, train_module, "write_metrics", 2),
    "between-metrics-and-last.pt": lambda mp: kill_on_call(mp, train_module, "save_checkpoint", 2),
    # epoch 1 always improves: killed after last.pt, before best.pt is written
    "between-last.pt-and-best.pt": lambda mp: kill_on_call(mp, train_module, "save_inference_checkpoint", 1),
    # after training, report.md written but not report.json
    "during-the-report": lambda mp: kill_on_call(
        mp, report_module, "write_json", 1, when=lambda path, *a, **k: str(path).endswith("report.json")),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_resume_after_a_crash_gives_the_uninterrupted_run(point, reference, phantom_dir, tmp_path, monkeypatch,
                                                          capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        CRASH_POINTS[point](patch)
        with pytest.raises(Killed):
            main(train_args(phantom_dir, run))
    # What a SIGKILL in the middle of an atomic write leaves: a half-written temporary file.
    (run / ".last.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    (run / ".best.pt.link.tmp").write_bytes(b"")
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    weights, metrics, report = outcome(run)
    ref_weights, ref_metrics, ref_report = reference
    for name in ("last.pt", "best.pt"):
        assert weights[name].keys() == ref_weights[name].keys()
        assert all(torch.equal(weights[name][k], ref_weights[name][k]) for k in weights[name]), name
    assert metrics == ref_metrics
    assert report == ref_report
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.tmp"))


@pytest.mark.slow
def test_a_finished_run_with_its_report_is_not_trained_again(reference, phantom_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(phantom_dir, run)) == 0
    assert main(["train", "--resume", str(run)]) == 2
    assert "already finished 2 epochs and its report" in capsys.readouterr().err
