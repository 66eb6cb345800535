"""Shared fixtures: small generated data sets and an untrained tiny checkpoint (no downloads, CPU only)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import make_checkpoint

# Nothing a test runs writes under the user's home: the caches and configs of braintumor, matplotlib and torch
# (hub, inductor) go to one folder for this session, removed at exit; subprocesses inherit it. The hash cache
# moves further, into each test's own tmp_path (private_cache below).
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="braintumor-tests-"))
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)
for _variable, _folder in (("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config"), ("MPLCONFIGDIR", "matplotlib"),
                           ("TORCH_HOME", "torch"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ[_variable] = str(_SESSION_HOME / _folder)
os.environ.pop("BRAINTUMOR_CACHE_DIR", None)

# Tests share 2 cores with other processes in CI; one intra-op thread keeps timings stable and avoids
# oversubscription when several torch processes (DDP test, servers) run at once.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test hashes into its own cache under tmp_path: returns the folder the hash cache will use."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("BRAINTUMOR_CACHE_DIR", raising=False)
    return tmp_path / "xdg" / "braintumor" / "audit"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """A folder-per-class phantom set: 4 classes x 6 slices of 64 px."""
    from braintumor.synthetic.phantom import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("phantoms"), per_class=6, size=64, seed=123)


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
    from braintumor.synthetic.phantom import write_phantom_set
    from braintumor.trust.fitting import fit_trust, store_trust

    root = tmp_path_factory.mktemp("trusted")
    path = shutil.copy(tiny_checkpoint, root / "trusted.pt")
    train, val = discover(phantom_dir), discover(write_phantom_set(root / "val", per_class=6, size=64, seed=321))
    store_trust(path, fit_trust(path, train.paths, train.labels, val.paths, val.labels))
    return path
