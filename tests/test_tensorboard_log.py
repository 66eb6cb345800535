"""tensorboard_log.py: every run folder opens with TensorBoard's own event reader and holds every epoch."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from braintumor.training.config import TrainConfig
from braintumor.training.tensorboard import SCALARS
from braintumor.training.trainer import resume, train


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_run_folder_opens_in_tensorboard_with_every_epoch_once(phantom_dir, tmp_path):
    cfg = TrainConfig(data=str(phantom_dir), arch="resnet18", weights="none", image_size=32, epochs=1,
                      batch_size=8, lr=1e-3, device="cpu", workers=0, seed=3, out=str(tmp_path / "run"),
                      progress=False, max_steps_per_epoch=2)
    first = train(cfg)
    assert list(first.run_dir.glob("events.out.tfevents.*"))
    events = _events(first.run_dir)
    assert set(SCALARS.values()) <= set(events.Tags()["scalars"])
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    for key, tag in SCALARS.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1], tag
        assert scalars[0].value == pytest.approx(rows[0][key], rel=1e-6), tag  # stored as float32
    images = set(events.Tags()["images"])
    assert {"validation/confusion_matrix", "train/augmented_images"} <= images
    grid = events.Images("train/augmented_images")[-1]
    assert grid.width > 32 and grid.height > 32  # a grid of several 32 px images

    resumed = resume(first.run_dir, {"epochs": 2})
    events = _events(resumed.run_dir)
    for tag in SCALARS.values():
        assert sorted(s.step for s in events.Scalars(tag)) == [1, 2], tag  # each epoch once after resuming
