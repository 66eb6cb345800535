"""What inference accepts as an image (a path, bytes, a PIL image), folders expanded to their image files."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Union

from PIL import Image

from braintumor.errors import UserError
from braintumor.data.io import IMAGE_EXTENSIONS

ImageInput = Union[str, os.PathLike, bytes, Image.Image]


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted, hidden entries skipped) to their images."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not images:
                raise UserError(f"no images found in folder {path}")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"file or folder not found: {path}")
    return found


def describe_source(item: ImageInput) -> str:
    """A short printable name for an input."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, bytes):
        return f"<{len(item)} bytes>"
    return "<image>"
