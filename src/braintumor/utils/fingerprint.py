"""A short content fingerprint of a file: tells two checkpoints (or an export and its source) apart at a glance."""

from __future__ import annotations

import hashlib
import os


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 12 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
