"""One pass over a data set's files: check that each decodes, hash it for duplicate groups, keep it decoded.

Each file is decoded at most once per run, with :func:`braintumor.data.io.read_image` (the reference reader), and
that one image serves every purpose asked for: the validity check, the exact and perceptual hashes of
:mod:`braintumor.data.dedup` (cached on disk, so a later run neither hashes nor decodes an unchanged file just to check
it), and the uint8 images at training size for the decoded cache. The cached pixels are those
:func:`braintumor.data.transforms.eval_transform` computes from the same image, so validation on the cache and
``braintumor evaluate`` see the same tensors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from braintumor.data.io import ImageReadError, read_image
from braintumor.data.transforms import resize_to_uint8
from braintumor.data.dedup import hash_files, record_from_image


@dataclass
class Scan:
    """What one pass found: per file the reason it cannot be read (None when it can), its hash record when
    hashes were asked for, and per requested size the decoded uint8 images (N, 3, S, S) (zeros for bad files)."""

    errors: list[str | None]
    records: list[dict] | None = None
    images: dict[int, torch.Tensor] = field(default_factory=dict)

    def keep(self, indices: Sequence[int], size: int) -> torch.Tensor:
        """The decoded images of ``indices`` at ``size``."""
        return self.images[size][torch.as_tensor(list(indices), dtype=torch.long)]


def scan_files(paths: Sequence[str | os.PathLike], *, hashes: bool = False, sizes: Sequence[int] = (),
               cache_dir=None, progress: bool = False, workers: int | None = None) -> Scan:
    """Check every file, hashing it (``hashes``) and keeping it decoded at each of ``sizes``, in one decode.

    With ``hashes``, a file whose hash record is cached (unchanged size and mtime) is decoded only when ``sizes``
    asks for its pixels; its cached record also says whether it was readable.
    """
    paths = [Path(p) for p in paths]
    sizes = sorted({int(s) for s in sizes})
    images = {s: torch.zeros((len(paths), 3, s, s), dtype=torch.uint8) for s in sizes}
    done: set[int] = set()

    def decode(index: int) -> dict:
        try:
            image = read_image(paths[index])
        except ImageReadError as error:
            return {"error": error.reason}
        for size, out in images.items():
            out[index] = resize_to_uint8(image, size)
        done.add(index)
        return record_from_image(paths[index], image) if hashes else {}

    if hashes:
        index_of = {os.path.abspath(p): i for i, p in enumerate(paths)}
        records, _ = hash_files(paths, cache_dir=cache_dir, progress=progress,
                                compute=lambda name: decode(index_of[name]))
    else:
        records = _map(decode, range(len(paths)), workers, progress and "checking images")
    if images:  # files whose hashes came from the cache still need their pixels
        _map(decode, [i for i, r in enumerate(records) if "error" not in r and i not in done], workers,
             progress and "decoding images")
    return Scan([r.get("error") for r in records], records if hashes else None, images)


def _map(function, items, workers: int | None, bar: str | bool = False) -> list:
    """``function`` over ``items`` in threads (PIL decodes and torch resizes without the GIL), in order; a
    progress bar named ``bar`` on a terminal."""
    from tqdm import tqdm

    items = list(items)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(function, items), total=len(items), desc=bar or "", unit="img", leave=False,
                         disable=not (bar and sys.stderr.isatty())))
