"""Progressive resizing: the planned schedule, and both data paths building batches at the planned size."""

from __future__ import annotations

import torch

from braintumor.training.config import TrainConfig
from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform
from braintumor.training.distributed import DistInfo
from braintumor.data.pipeline import CachedBatches, LoaderBatches


def test_schedule_grows_in_steps_of_16_and_reaches_full_size_on_time():
    cfg = TrainConfig(data="x", image_size=128, progressive_resize=96, progressive_until=0.5, epochs=20)
    sizes = [cfg.train_image_size(epoch) for epoch in range(20)]
    assert sizes[0] == 96 and all(size == 128 for size in sizes[10:])
    assert sizes == sorted(sizes) and all(size % 16 == 0 for size in sizes)
    assert set(sizes) == {96, 112, 128}
    assert [TrainConfig(data="x", image_size=64).train_image_size(e) for e in range(3)] == [64, 64, 64]


def test_both_data_paths_build_batches_at_the_planned_size(phantom_dir):
    from braintumor.data.index import discover
    from braintumor.data.cache import decode_to_tensor

    index = discover(phantom_dir)
    paths, labels = index.paths[:8], index.labels[:8]
    loader = LoaderBatches(paths, labels, transform=train_transform(48, 10.0), batch_size=4, shuffle=True,
                           seed=0, workers=0, dist=DistInfo(), pin_memory=False, training=True,
                           transform_for_size=lambda size: train_transform(size, 10.0))
    cached = CachedBatches(decode_to_tensor(paths, 48, torch.device("cpu")), labels, 4, shuffle=True,
                           augment=True, rotation=10.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for batches in (loader, cached):
        for size in (32, 48):
            batches.set_image_size(size)
            batches.set_epoch(0)
            images, _ = next(iter(batches))
            assert images.shape == (4, 3, size, size)
