"""Helpers shared by test modules (import them from here, not from other test files)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from braintumor.models.checkpoint import random_checkpoint
from braintumor.training.config import TrainConfig
from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom


def tiny_config(data, out, **overrides) -> TrainConfig:
    """A resnet18 run at 32 px on the CPU that finishes in seconds."""
    values = dict(data=str(data), arch="resnet18", weights="none", image_size=32, epochs=2, batch_size=8,
                  lr=1e-3, device="cpu", workers=0, seed=7, out=str(out), progress=False)
    values.update(overrides)
    return TrainConfig(**values)


make_checkpoint = random_checkpoint  # an untrained (seeded) checkpoint with everything predict needs


# ---------------------------------------------------------------- planted duplicate folders (test_dedup, test_audit)

SIZE = 128  # phantom side: big enough that a 2 % crop removes whole pixels


def phantom_pixels(index: int, size: int = SIZE) -> np.ndarray:
    return make_phantom(PHANTOM_CLASSES[index % 4], size, rng=index)


def as_jpeg(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def brightened(image: Image.Image, amount: int = 20) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + amount, 0, 255).astype(np.uint8))


def cropped_by(image: Image.Image, fraction: float, corner: bool = False) -> Image.Image:
    """Remove ``fraction`` of each side's length: split over both ends, or all from the top-left."""
    width, height = image.size
    dx, dy = round(width * fraction), round(height * fraction)
    if corner:
        return image.crop((dx, dy, width, height))
    return image.crop((dx // 2, dy // 2, width - (dx - dx // 2), height - (dy - dy // 2)))


COPIES = {
    "resized to 0.7x": lambda im: im.resize((round(im.width * 0.7),) * 2, Image.Resampling.BILINEAR),
    "resized to 1.5x": lambda im: im.resize((round(im.width * 1.5),) * 2, Image.Resampling.BICUBIC),
    "JPEG quality 70": as_jpeg,
    "brightness +20": brightened,
    "cropped 2 %": lambda im: cropped_by(im, 0.02),
    "cropped 3 %": lambda im: cropped_by(im, 0.03),
    "cropped 3 % at a corner": lambda im: cropped_by(im, 0.03, corner=True),
    "all of them": lambda im: as_jpeg(brightened(cropped_by(im, 0.03)).resize((100, 100))),
}


def save_image(path: Path, image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.save(path, **options)
    return path


def planted_folder(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    """A two-class folder with one exact pair across classes, one near-duplicate family and distinct slices."""
    root = tmp_path / "data"
    source = Image.fromarray(phantom_pixels(1))
    files = {
        "exact": [save_image(root / "glioma" / "a.png", phantom_pixels(0)), save_image(root / "notumor" / "a_copy.bmp", phantom_pixels(0))],
        "near": [save_image(root / "glioma" / "b.png", source)]
        + [save_image(root / "glioma" / f"b_{k}.{'jpg' if 'JPEG' in name else 'png'}", edit(source))
           for k, name in enumerate(["resized to 0.7x", "JPEG quality 70", "brightness +20", "cropped 3 %"])
           for edit in [COPIES[name]]],
        "distinct": [save_image(root / PHANTOM_CLASSES[2 * (i % 2)] / f"c{i}.png", phantom_pixels(i)) for i in range(2, 8)]
        + [save_image(root / "notumor" / "rgb.png", np.stack([phantom_pixels(8)] * 3, axis=-1) // 2)],
    }
    broken = root / "notumor" / "broken.png"
    broken.write_bytes((root / "glioma" / "b.png").read_bytes()[:300])  # truncated PNG
    files["broken"] = [broken]
    return root, {key: sorted(str(p.resolve()) for p in paths) for key, paths in files.items()}


def train_and_test_folders(tmp_path) -> tuple[Path, Path, list[Path]]:
    """Six training phantoms; seven test images of which the first and the last two duplicate training images."""
    train, test = tmp_path / "train", tmp_path / "test"
    for i in range(6):
        save_image(train / PHANTOM_CLASSES[i % 2] / f"t{i}.png", phantom_pixels(i))
    leaked_exact = save_image(test / "glioma" / "x.png", phantom_pixels(0))  # same pixels, new name
    leaked_near = save_image(test / "glioma" / "y.jpg", as_jpeg(Image.fromarray(phantom_pixels(1))))  # other label
    leaked_edit = save_image(test / "meningioma" / "z.png", brightened(cropped_by(Image.fromarray(phantom_pixels(3)), 0.03)))
    clean = [save_image(test / PHANTOM_CLASSES[i % 2] / f"s{i}.png", phantom_pixels(i)) for i in range(10, 14)]
    return train, test, [leaked_exact, *clean, leaked_near, leaked_edit]


def two_tier_trust(model, images, temperature: float = 1.7, seed: int = 0) -> dict:
    """A synthetic two-tier ``trust`` entry for ``model`` (no fitting: random whitened coordinates), with each
    threshold at the median score of ``images`` so that about half of them flag each tier. Built from the trust
    modules' own ``state()``, so it follows their format."""
    from braintumor.trust.ood import (AtypicalTier, GaussianBlock, MahalanobisDetector, NotMriTier, TrustHead,
                                      backbone_features)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pooled, statistics = backbone_features(model.eval(), images)
        logits = model.fc(pooled)
    classes, rank, width = logits.shape[1], 8, statistics.shape[1]
    block = GaussianBlock(0, width, statistics.mean(dim=0), torch.randn(width, rank, generator=generator), 1.0)
    not_mri = NotMriTier([block])
    atypical = AtypicalTier(MahalanobisDetector(torch.randn(pooled.shape[1], rank, generator=generator),
                                                torch.randn(classes, rank, generator=generator)), torch.ones(classes))
    with torch.no_grad():
        scores = TrustHead(not_mri, atypical)(pooled, statistics, logits)
    block.threshold.fill_(float(scores[:, 0].median()))
    atypical.thresholds.fill_(float(scores[:, 1].median()))
    return {"not_mri": not_mri.state(), "atypical": atypical.state(), "temperature": temperature,
            "n_train": len(images), "n_val": len(images)}


def make_trusted_checkpoint(path, image_size=64, seed=0, legacy: bool = False):
    """``make_checkpoint`` with a synthetic trust entry: both tiers, or (``legacy``) the one-tier ``trust["ood"]``
    of checkpoints written before the not-MRI tier."""
    from braintumor.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    make_checkpoint(path, image_size=image_size, seed=seed)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    images = torch.randn(16, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    trust = two_tier_trust(model, images, seed=seed)
    if legacy:
        from braintumor.trust.ood import MahalanobisDetector

        atypical = trust.pop("atypical")
        trust.pop("not_mri")
        trust["ood"] = MahalanobisDetector(atypical["whitening"], atypical["centers"],
                                           float(atypical["thresholds"][0])).state()
    ckpt["trust"] = trust
    ckpt.pop("format_version", None)
    save_checkpoint(ckpt, path)
    return path
