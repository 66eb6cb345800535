"""The cached path (data.transforms, data.pipeline) on the CPU, against the CPU transforms / torchvision as the
reference: augmentation distributions and geometry, cache choice, determinism and DDP sharding of CachedBatches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch.utils.data import DistributedSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import braintumor.data.cache as cache
import braintumor.data.transforms as transforms
from braintumor.data.cache import choose_cache
from braintumor.data.pipeline import CachedBatches, shard_indices
from braintumor.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, augment_batch, eval_transform, normalize_batch,
                                        train_transform)
from braintumor.errors import UserError
from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std that leave pixels in [0, 1]


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


# --- augmentation: distributions ----------------------------------------------------------------------------------


def test_flip_rate_is_one_half():
    image = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    image[..., :2] = 255
    image[..., 0, 3] = 90  # asymmetric in both axes
    batch = image.expand(20000, -1, -1, -1)
    out = augment_batch(batch, 0.0, torch.Generator().manual_seed(0), *IDENTITY)
    original = image.float() / 255
    is_identity = (out - original).abs().amax(dim=(1, 2, 3)) < 1e-6
    is_flipped = (out - original.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert torch.all(is_identity ^ is_flipped)
    rate = is_flipped.float().mean().item()
    assert abs(rate - 0.5) < 4 * (0.25 / 20000) ** 0.5  # 4 binomial standard deviations (0.014)


def test_sampled_angles_are_uniform_in_range():
    flip, angle = transforms._sample_params(4000, 10.0, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert flip.dtype == torch.bool
    assert angle.min() >= -10 and angle.max() <= 10
    assert stats.kstest(angle.numpy(), stats.uniform(loc=-10, scale=20).cdf).pvalue > 1e-3
    assert stats.kstest(angle.numpy(), stats.uniform(loc=-8, scale=16).cdf).pvalue < 1e-6  # the test has power


def test_augment_batch_applies_the_sampled_flip_and_angle_like_torchvision():
    size = 32
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disk = (xx**2 + yy**2) < (0.4 * size) ** 2  # content stays inside the frame under any rotation
    images = torch.from_numpy((rng.integers(0, 256, (16, 3, size, size)) * disk).astype(np.uint8))

    out = augment_batch(images, 25.0, torch.Generator().manual_seed(5), *IDENTITY)
    flip, angle = transforms._sample_params(16, 25.0, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert 0 < flip.sum() < 16

    for i in range(16):
        x = images[i].float() / 255
        if flip[i]:
            x = TF.horizontal_flip(x)
        reference = TF.rotate(x, angle[i].item(), interpolation=InterpolationMode.BILINEAR, fill=0)
        torch.testing.assert_close(out[i], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("angle", [30.0, -12.5])
def test_rotation_direction_and_centre_match_torchvision(angle):
    image = torch.zeros(3, 33, 33, dtype=torch.uint8)
    image[:, 10, 24] = 255  # an off-centre dot: up and to the right
    image[:, 11, 24] = 128
    theta = transforms._flip_rotate_theta(torch.tensor([False]), torch.tensor([angle]), 33, 33)
    grid = torch.nn.functional.affine_grid(theta, [1, 3, 33, 33], align_corners=False)
    ours = torch.nn.functional.grid_sample(image[None].float() / 255, grid, align_corners=False)[0]

    tensor_reference = TF.rotate(image.float() / 255, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    torch.testing.assert_close(ours, tensor_reference, atol=1e-5, rtol=0)

    # The CPU transform rotates PIL images: same position, pixels within PIL's uint8 rounding.
    pil = TF.rotate(TF.to_pil_image(image), angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    pil_reference = TF.to_dtype(TF.pil_to_tensor(pil), torch.float32, scale=True)
    assert (ours - pil_reference).abs().max() < 2 / 255

    def centroid(x):
        ys, xs = torch.nonzero(x[0] > 0, as_tuple=True)
        weights = x[0][ys, xs]
        return torch.stack([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()

    torch.testing.assert_close(centroid(ours), centroid(pil_reference), atol=0.05, rtol=0)
    # Positive angles turn counter-clockwise about the image centre (16, 16).
    radians = np.radians(angle)
    dx, dy = 24 - 16, 10 + 128 / 383 - 16
    expected = (16 + dx * np.cos(radians) + dy * np.sin(radians), 16 - dx * np.sin(radians) + dy * np.cos(radians))
    torch.testing.assert_close(centroid(ours), torch.tensor(expected, dtype=torch.float32), atol=0.3, rtol=0)


def test_pixel_statistics_match_the_cpu_transform_on_phantoms():
    size, repeats = 32, 256
    rng = np.random.default_rng(0)
    pils = [Image.fromarray(make_phantom(label, size, rng)).convert("RGB") for label in PHANTOM_CLASSES * 2]
    batch = torch.stack([to_uint8_tensor(p) for p in pils])

    torch.manual_seed(0)
    transform = train_transform(size, 10.0)
    cpu = torch.stack([torch.stack([transform(p) for _ in range(repeats)]) for p in pils])
    device = augment_batch(batch.repeat_interleave(repeats, 0), 10.0, torch.Generator().manual_seed(1),
                           IMAGENET_MEAN, IMAGENET_STD).view(cpu.shape)

    # Per image and pixel, the mean and spread over augmentations; a missing flip or a rotation range off by
    # 5 degrees gives differences of >= 0.03 / 0.025, sampling noise ~0.013 / 0.006.
    assert (cpu.mean(1) - device.mean(1)).abs().mean() < 0.02
    assert (cpu.std(1) - device.std(1)).abs().mean() < 0.012
    assert abs(cpu.mean() - device.mean()) < 0.02
    assert abs(cpu.std() - device.std()) < 0.01


def test_normalize_batch_matches_the_cpu_transform():
    array = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    expected = eval_transform(12)(Image.fromarray(array))
    out = normalize_batch(torch.from_numpy(array).permute(2, 0, 1)[None], IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


# --- cache choice -------------------------------------------------------------------------------------------------


def test_choose_cache_branches():
    need = 1000 * 3 * 64 * 64  # bytes of the decoded set
    assert choose_cache("auto", 1000, 64, "cuda", free_gpu_bytes=4 * need, available_ram_bytes=0) == "gpu"
    assert choose_cache("auto", 1000, 64, "cuda", free_gpu_bytes=4 * need - 1, available_ram_bytes=4 * need) == (
        "memory"
    )
    assert choose_cache("auto", 1000, 64, "cuda", free_gpu_bytes=need, available_ram_bytes=need) == "none"
    assert choose_cache("auto", 1000, 64, "cpu", free_gpu_bytes=100 * need, available_ram_bytes=4 * need) == "memory"
    assert choose_cache("auto", 1000, 64, "cpu", available_ram_bytes=4 * need - 1) == "none"
    assert choose_cache("memory", 1000, 64, "cpu", available_ram_bytes=0) == "memory"
    assert choose_cache("none", 1000, 64, "cuda", free_gpu_bytes=100 * need) == "none"
    assert choose_cache("gpu", 1000, 64, "cuda", free_gpu_bytes=0) == "gpu"
    with pytest.raises(UserError) as error:
        choose_cache("gpu", 1000, 64, "cpu")
    assert str(error.value) == "--data-cache gpu needs a CUDA device, but the device is cpu: use memory or auto"
    with pytest.raises(UserError) as error:
        choose_cache("disk", 1000, 64, "cpu")
    assert str(error.value) == "unknown data cache 'disk': choose one of auto, none, memory, gpu"


def test_choose_cache_measures_ram_when_not_given():
    assert cache._available_ram_bytes() > 0
    assert choose_cache("auto", 1, 8, "cpu") == "memory"


# --- CachedBatches ------------------------------------------------------------------------------------------------


def cached_images(n=23, size=8):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def collect(batches):
    return [(images.clone(), labels.clone()) for images, labels in batches]


def test_cached_batches_are_deterministic_and_resume_at_epoch_boundaries():
    images = cached_images()
    labels = list(range(23))

    def make():
        return CachedBatches(images, labels, 5, shuffle=True, seed=11, augment=True, rotation=10.0)

    first, second = make(), make()
    runs = []
    for loader in (first, second):
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            epochs.append(collect(loader))
        runs.append(epochs)
    for (a_images, a_labels), (b_images, b_labels) in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)

    epoch0_labels = torch.cat([labels for _, labels in runs[0][0]])
    epoch1_labels = torch.cat([labels for _, labels in runs[0][1]])
    assert sorted(epoch0_labels.tolist()) == labels and not torch.equal(epoch0_labels, epoch1_labels)
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])

    resumed = make()
    resumed.set_epoch(1)  # a fresh process resuming at epoch 1 sees what the uninterrupted run saw
    for (a_images, a_labels), (b_images, b_labels) in zip(runs[0][1], collect(resumed)):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)

    other_seed = CachedBatches(images, labels, 5, shuffle=True, seed=12, augment=True, rotation=10.0)
    assert not torch.equal(next(iter(other_seed))[1], runs[0][0][0][1])


def test_cached_batches_without_augmentation_normalize_in_order():
    images = cached_images(7)
    loader = CachedBatches(images, [1, 0, 1, 0, 1, 0, 1], 3, shuffle=False)
    batches = collect(loader)
    assert len(loader) == 3 and [len(labels) for _, labels in batches] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), normalize_batch(images))
    assert torch.cat([y for _, y in batches]).tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert batches[0][1].dtype == torch.int64

    dropped = CachedBatches(images, [0] * 7, 3, shuffle=False, drop_last=True)
    assert len(dropped) == 2 and dropped.num_samples == 6 and len(collect(dropped)) == 2


@pytest.mark.parametrize("n, world_size", [(23, 3), (10, 4), (3, 4), (12, 2)])
def test_sharding_pads_like_distributed_sampler_and_covers_every_sample(n, world_size):
    seen, order = [], shard_indices(n, shuffle=True, seed=4, epoch=2)  # one rank: the epoch's permutation
    assert sorted(order.tolist()) == list(range(n))
    for rank in range(world_size):
        # Unshuffled, the padding and the rank-strided shards are DistributedSampler's.
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=False)
        unshuffled = shard_indices(n, shuffle=False, seed=4, epoch=2, rank=rank, world_size=world_size)
        assert unshuffled.tolist() == list(sampler)
        ours = shard_indices(n, shuffle=True, seed=4, epoch=2, rank=rank, world_size=world_size)
        # Shuffled, every rank shards the same permutation.
        padded = torch.cat([order, order.repeat(world_size)])[: -(-n // world_size) * world_size]
        assert ours.tolist() == padded[rank::world_size].tolist()

        loader = CachedBatches(cached_images(n), list(range(n)), 4, shuffle=True, seed=4, rank=rank,
                               world_size=world_size, augment=True, rotation=5.0)
        loader.set_epoch(2)
        labels = torch.cat([y for _, y in loader]).tolist()
        assert labels == ours.tolist() and len(labels) == -(-n // world_size)
        seen += labels
    assert set(seen) == set(range(n))
    assert not torch.equal(order, shard_indices(n, shuffle=True, seed=4, epoch=3)) or n < 4

    unpadded = [shard_indices(n, shuffle=True, seed=4, epoch=2, rank=r, world_size=world_size, pad=False)
                for r in range(world_size)]
    assert sorted(torch.cat(unpadded).tolist()) == list(range(n))


def test_ranks_draw_different_augmentations():
    images = torch.full((8, 3, 16, 16), 200, dtype=torch.uint8)
    images[..., :4] = 0
    outputs = []
    for rank in range(2):
        loader = CachedBatches(images, [0] * 8, 4, shuffle=False, augment=True, rotation=30.0, rank=rank,
                               world_size=2)
        outputs.append(next(iter(loader))[0])
    assert not torch.equal(outputs[0], outputs[1])


def test_cached_batches_validate_inputs():
    with pytest.raises(ValueError, match="uint8"):
        CachedBatches(torch.zeros(2, 3, 4, 4), [0, 1], 1, shuffle=False)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        CachedBatches(cached_images(2), [0, 1, 2], 1, shuffle=False)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        CachedBatches(cached_images(2), [0, 1], 1, shuffle=False, rank=2, world_size=2)
