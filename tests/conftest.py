"""Shared fixtures: small generated data sets and an untrained tiny checkpoint (no downloads, CPU only)."""

from __future__ import annotations

import os

import pytest
import torch

# Tests share 2 cores with other processes in CI; one intra-op thread keeps timings stable and avoids
# oversubscription when several torch processes (DDP test, servers) run at once.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """A folder-per-class phantom set: 4 classes x 6 slices of 64 px."""
    from braintumor.phantom import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("phantoms"), per_class=6, size=64, seed=123)


def make_checkpoint(path, arch="resnet18", classes=("glioma", "meningioma", "notumor", "pituitary"),
                    image_size=64, seed=0):
    """Save an untrained (seeded) checkpoint with everything predict needs."""
    from braintumor.checkpoint import ModelSpec, inference_payload, save_checkpoint
    from braintumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from braintumor.model import build_model

    torch.manual_seed(seed)
    model = build_model(arch, num_classes=len(classes), weights="none").eval()
    spec = ModelSpec(arch=arch, classes=classes, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    save_checkpoint(inference_payload(model.state_dict(), spec, config={}, epoch=0, best_val_accuracy=0.0), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of an untrained resnet18 checkpoint at 64 px with the four phantom classes."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def trusted_checkpoint(tmp_path_factory, tiny_checkpoint, phantom_dir):
    """The tiny checkpoint with an OOD detector and temperature fitted on phantoms (train: phantom_dir,
    validation: 6 other phantoms per class). Untrained, but its features still tell phantoms from photos."""
    import shutil

    from braintumor.data.index import discover
    from braintumor.phantom import write_phantom_set
    from braintumor.trust import fit_trust, store_trust

    root = tmp_path_factory.mktemp("trusted")
    path = shutil.copy(tiny_checkpoint, root / "trusted.pt")
    train, val = discover(phantom_dir), discover(write_phantom_set(root / "val", per_class=6, size=64, seed=321))
    store_trust(path, fit_trust(path, train.paths, train.labels, val.paths, val.labels))
    return path
