"""Every random stream of a run comes from its one seed: ``derive_seed(seed, epoch, rank, stream)``.

A run reseeds each stream at each epoch from (seed, epoch, rank), so an epoch's randomness does not depend on
what earlier epochs drew: a resumed run replays an uninterrupted one exactly without saving any RNG state.
The streams:

- ``"global"``: Python's, NumPy's and torch's global generators (:func:`seed_epoch`), for anything that draws
  from them during an epoch;
- ``"loader"``: the generator DataLoader workers seed their own RNGs from (per-image CPU augmentation);
- ``"augment"``: the generator of the batched on-device augmentation of the cached path;
- ``"shuffle"``: the epoch's sample order, shared by all ranks (rank 0 is passed), so that their shards partition
  the data set.

The model's initial weights use ``torch.manual_seed(seed)`` itself (no epoch, one rank's weights broadcast).
"""

from __future__ import annotations

import random

import numpy as np
import torch

STREAMS = ("global", "loader", "augment", "shuffle")
_SEED_MASK = 2**63 - 1  # 63 bits: manual_seed accepts them on every device, and they stay a non-negative int


def derive_seed(seed: int, epoch: int = 0, rank: int = 0, stream: str = "global") -> int:
    """A 63-bit seed for one ``stream`` of one ``epoch`` on one ``rank``.

    NumPy's SeedSequence hashes the four inputs together, so seeds of neighbouring (seed, epoch, rank) give
    unrelated streams (a linear formula such as ``seed * K + epoch`` makes (s, e + K) collide with (s + 1, e)).
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}: one of {', '.join(STREAMS)}")
    if min(epoch, rank) < 0:
        raise ValueError(f"epoch and rank must be >= 0, got epoch {epoch}, rank {rank}")
    entropy = [int(seed) & _SEED_MASK, int(epoch), int(rank), STREAMS.index(stream)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & _SEED_MASK


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed Python's, NumPy's and torch's global generators for one epoch on one rank."""
    value = derive_seed(seed, epoch, rank, "global")
    random.seed(value)
    np.random.seed(value % 2**32)  # NumPy's legacy seeding takes 32 bits
    torch.manual_seed(value)
