"""Scale / shift / intensity augmentation: geometry and arithmetic against torchvision, and the DataLoader path
(data.transforms.train_transform) against the cached path (data.transforms.augment_batch) in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import braintumor.data.transforms as transforms
from braintumor.data.augment import Augmentation, RandomIntensity, apply_intensity, sample_intensity
from braintumor.data.transforms import augment_batch, train_transform
from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("angle,scale,shift", [(0.0, 1.2, (0, 0)), (0.0, 1.0, (3, -2)), (20.0, 0.85, (-2, 4))])
def test_affine_matrix_matches_torchvision_affine(angle, scale, shift):
    size = 33
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disk = (xx**2 + yy**2) < (0.3 * size) ** 2
    image = torch.from_numpy(np.random.default_rng(1).random((3, size, size)) * disk).float()
    for flip in (False, True):
        theta = transforms._affine_theta(torch.tensor([flip]), torch.tensor([angle]), torch.tensor([scale]),
                                       torch.tensor([float(shift[0])]), torch.tensor([float(shift[1])]), size, size)
        grid = torch.nn.functional.affine_grid(theta, [1, 3, size, size], align_corners=False)
        ours = torch.nn.functional.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                                               align_corners=False)[0]
        source = TF.horizontal_flip(image) if flip else image
        # TF.affine turns clockwise for positive angles (TF.rotate counter-clockwise, as we do); RandomAffine
        # draws angles symmetric about 0, so the direction does not change the distribution.
        reference = TF.affine(source, angle=-angle, translate=list(shift), scale=scale, shear=[0.0, 0.0],
                              interpolation=InterpolationMode.BILINEAR, fill=0)
        # Interpolation details differ at the disk's rim; the bulk must agree.
        assert (ours - reference).abs().mean() < 0.01, flip


def test_intensity_arithmetic_matches_torchvision_functionals():
    gray = (0.7 * torch.rand(1, 16, 16)).expand(3, -1, -1)  # brightness 1.4 keeps it below 1: no clipping
    factors = torch.tensor([[1.3, 1.4, 0.7]])  # gamma, brightness, contrast
    ours = apply_intensity(gray[None], factors)[0]
    reference = TF.adjust_contrast(TF.adjust_brightness(TF.adjust_gamma(gray, 1.3), 1.4), 0.7)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)  # grey weights sum to 0.9999


def test_intensity_factors_are_drawn_in_range():
    factors = sample_intensity(5000, 0.2, 0.3, 0.1, torch.Generator().manual_seed(0), torch.device("cpu"))
    gamma, brightness, contrast = factors.T
    assert gamma.log().abs().max() <= 0.1 + 1e-6 and abs(gamma.log().mean()) < 0.01  # log-uniform, centred
    assert brightness.min() >= 0.8 and brightness.max() <= 1.2 and abs(brightness.mean() - 1) < 0.01
    assert contrast.min() >= 0.7 and contrast.max() <= 1.3
    with pytest.raises(ValueError):
        RandomIntensity(brightness=1.5)


def _augment_both_paths(augmentation: Augmentation, size: int = 32, repeats: int = 200):
    rng = np.random.default_rng(0)
    pils = [Image.fromarray(make_phantom(label, size, rng)).convert("RGB") for label in PHANTOM_CLASSES]
    batch = torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in pils])
    torch.manual_seed(0)
    transform = train_transform(size, augmentation.rotation, *IDENTITY, augmentation=augmentation)
    cpu = torch.stack([torch.stack([transform(p) for _ in range(repeats)]) for p in pils])
    cached = augment_batch(batch.repeat_interleave(repeats, 0), augmentation.rotation,
                           torch.Generator().manual_seed(1), *IDENTITY, **augmentation.batch_kwargs()).view(cpu.shape)
    return cpu, cached


def _distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean over pixels of |difference| in the per-pixel mean and spread over augmentations."""
    return (a.mean(1) - b.mean(1)).abs().mean().item(), (a.std(1) - b.std(1)).abs().mean().item()


@pytest.mark.parametrize("augmentation, repeats", [
    (Augmentation(rotation=10.0, scale=0.2), 200),
    (Augmentation(rotation=0.0, translate=0.1), 200),
    (Augmentation(rotation=0.0, brightness=0.3, contrast=0.3, gamma=0.3), 200),
    (Augmentation(rotation=0.0, erasing=0.5), 200),
    # A crop moves whole slices around: 4x the draws bring its sampling noise down to the others' (0.014 -> 0.007).
    (Augmentation(rotation=0.0, crop_area=0.25), 800),
    (Augmentation(rotation=10.0, crop_area=0.5, translate=0.05), 800),
    (Augmentation(rotation=10.0, scale=0.1, translate=0.05, brightness=0.1, contrast=0.1, gamma=0.1), 200),
], ids=["scale", "translate", "intensity", "erasing", "crop", "crop-rotate-shift", "recipe"])
@pytest.mark.slow
def test_both_data_paths_agree_in_distribution(augmentation, repeats):
    cpu, cached = _augment_both_paths(augmentation, repeats=repeats)
    mean_gap, spread_gap = _distance(cpu, cached)
    # The test has power: switching the augmentation off on one side moves the statistics far more.
    plain_cpu, _ = _augment_both_paths(Augmentation(rotation=augmentation.rotation), repeats=repeats)
    off_mean, off_spread = _distance(plain_cpu, cached)
    assert mean_gap < 0.01 and spread_gap < 0.01, (mean_gap, spread_gap)
    assert max(off_mean, off_spread) > 2 * max(mean_gap, spread_gap), (off_mean, off_spread, mean_gap, spread_gap)


def test_switching_nothing_on_replays_the_flip_and_rotation_stream():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    plain = augment_batch(images, 15.0, torch.Generator().manual_seed(3))
    zeros = augment_batch(images, 15.0, torch.Generator().manual_seed(3), scale=0.0, translate=0.0,
                          brightness=0.0, contrast=0.0, gamma=0.0, erasing=0.0, crop_area=0.0)
    assert torch.equal(plain, zeros)


def test_erasing_rectangles_are_drawn_as_torchvision_draws_them():
    """sample_erasing (vectorised) against torchvision's RandomErasing.get_params (per image): the same
    distributions of height, width, top and left, and of how often an image is erased."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomErasing

    from braintumor.data.augment import ERASING_AREA, ERASING_RATIO, sample_erasing

    height, width, n, probability = 24, 40, 4000, 0.7
    ours = sample_erasing(n, height, width, probability, torch.Generator().manual_seed(0), torch.device("cpu"))
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    reference = []
    for _ in range(n):
        if torch.rand(1).item() < probability:
            top, left, h, w, _ = RandomErasing.get_params(image, scale=ERASING_AREA, ratio=ERASING_RATIO, value=[0])
            reference.append((top, left, h, w) if (h, w) != (height, width) else (0, 0, 0, 0))  # (H, W): no fit
        else:
            reference.append((0, 0, 0, 0))
    reference = torch.tensor(reference)
    top, left, h, w = ours.T
    erased, erased_reference = h > 0, reference[:, 2] > 0
    assert abs(erased.float().mean() - erased_reference.float().mean()) < 0.03
    assert ((top + h <= height) & (left + w <= width) & (top >= 0) & (left >= 0)).all()
    for k in range(4):
        assert ks_2samp(ours[erased, k].numpy(), reference[erased_reference, k].numpy()).pvalue > 1e-3, k
    # The test has power: a narrower area range is told apart.
    narrow = sample_erasing(n, height, width, probability, torch.Generator().manual_seed(1), torch.device("cpu"))
    narrow_area = (narrow[:, 2] * narrow[:, 3])[narrow[:, 2] > 0].float() * 0.5
    assert ks_2samp(narrow_area.numpy(), (h * w)[erased].float().numpy()).pvalue < 1e-3


def test_erasing_blacks_out_exactly_the_drawn_rectangle_before_normalizing():
    from braintumor.data.augment import random_erasing, sample_erasing

    batch = torch.rand(64, 3, 20, 30) * 0.5 + 0.5  # nowhere black before
    out = random_erasing(batch, 1.0, torch.Generator().manual_seed(4))
    boxes = sample_erasing(64, 20, 30, 1.0, torch.Generator().manual_seed(4), torch.device("cpu"))
    for image, (top, left, h, w) in zip(out, boxes.tolist()):
        expected = torch.zeros(20, 30, dtype=torch.bool)
        expected[top:top + h, left:left + w] = True
        assert torch.equal((image == 0).all(dim=0), expected)
    assert torch.equal(random_erasing(batch, 0.0, torch.Generator().manual_seed(4)), batch)


def test_cutmix_pastes_the_neighbours_rectangle_and_shares_labels_by_its_area():
    from braintumor.data.augment import batch_mixer

    assert batch_mixer(0.0, 0.0, 4) is None
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 20, 30).contiguous()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(0)
    pasted_somewhere = 0
    for _ in range(20):
        mixed, shares = batch_mixer(1.0, 0.0, 4)(images, labels)
        pasted_somewhere += int((mixed[:, 0] != images[:, 0]).any())
        assert shares.shape == (6, 4) and torch.allclose(shares.sum(1), torch.ones(6))
        for i in range(6):
            pasted = (mixed[i, 0] == (i - 1) % 6).float().mean().item()  # the neighbour's share of the pixels
            own = labels[i].item()
            expected = torch.zeros(4)
            expected[own] += 1 - pasted
            expected[labels[(i - 1) % 6]] += pasted
            assert torch.allclose(shares[i], expected, atol=1e-6), (i, shares[i], pasted)
            assert torch.equal(mixed[i, 0] == i, mixed[i, 1] == i)  # one rectangle through every channel
    assert pasted_somewhere >= 15  # the rectangle is empty only when the Beta(1, 1) share rounds to nothing


def test_mixup_blends_with_the_labels_weight_and_both_take_turns():
    from braintumor.data.augment import batch_mixer

    images, labels = torch.rand(8, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    torch.manual_seed(1)
    mixed, shares = batch_mixer(0.0, 0.2, 4)(images, labels)
    weight = shares[torch.arange(8), labels]  # own class share (neighbours always differ in class here)
    torch.testing.assert_close(mixed, weight.view(-1, 1, 1, 1) * images
                               + (1 - weight).view(-1, 1, 1, 1) * images.roll(1, 0))
    torch.manual_seed(2)
    both = batch_mixer(1.0, 0.2, 4)
    kinds = set()
    for _ in range(40):
        mixed, _ = both(images, labels)
        # CutMix keeps each pixel of one of the two slices; MixUp blends (almost) every pixel.
        kept = ((mixed == images) | (mixed == images.roll(1, 0))).float().mean().item()
        kinds.add("cutmix" if kept == 1.0 else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_crop_boxes_are_drawn_as_torchvision_draws_them():
    """sample_crop (vectorised) against torchvision's RandomResizedCrop.get_params (per image): the same
    distributions of top, left, height and width, on a square and on a wide slice (whose fallback differs)."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    from braintumor.data.augment import CROP_RATIO, sample_crop

    for height, width, min_area in ((32, 32, 0.25), (20, 48, 0.1)):
        n = 4000
        ours = sample_crop(n, height, width, min_area, torch.Generator().manual_seed(0), torch.device("cpu"))
        torch.manual_seed(0)
        image = torch.zeros(3, height, width)
        reference = torch.tensor([RandomResizedCrop.get_params(image, scale=(min_area, 1.0), ratio=list(CROP_RATIO))
                                  for _ in range(n)])
        top, left, h, w = ours.T
        assert ((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width) & (h > 0) & (w > 0)).all()
        for k in range(4):
            assert ks_2samp(ours[:, k].numpy(), reference[:, k].numpy()).pvalue > 1e-3, (height, width, k)
    # The test has power: a larger smallest area is told apart.
    larger = sample_crop(n, 32, 32, 0.6, torch.Generator().manual_seed(1), torch.device("cpu"))
    area = lambda boxes: (boxes[:, 2] * boxes[:, 3]).float().numpy()  # noqa: E731
    smaller = sample_crop(n, 32, 32, 0.25, torch.Generator().manual_seed(2), torch.device("cpu"))
    assert ks_2samp(area(larger), area(smaller)).pvalue < 1e-3


def test_crop_geometry_is_torchvision_resized_crop():
    """The cached path's crop (an affine_grid box) samples what TF.resized_crop of the same box gives."""
    size = 24
    image = torch.rand(1, 3, size, size)
    boxes = torch.tensor([[3, 5, 12, 16], [0, 0, size, size], [10, 2, 14, 9]])
    theta = transforms._crop_theta(boxes, size, size)
    grid = torch.nn.functional.affine_grid(theta, [3, 3, size, size], align_corners=False)
    ours = torch.nn.functional.grid_sample(image.expand(3, -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        reference = TF.resized_crop(image[0], top, left, h, w, [size, size], antialias=False)
        # Inside: the same bilinear samples. The outermost output pixels of an enlarged box differ: resized_crop
        # clamps to the box's own edge pixels, the cached path blends in the next pixel beyond the box (the black
        # fill at the slice's edge).
        assert (ours[k] - reference)[:, 1:-1, 1:-1].abs().max() < 1e-4, k
    assert torch.allclose(ours[1], image[0], atol=1e-5)  # the whole slice: unchanged

