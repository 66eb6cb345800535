"""What inference accepts as an image, and the one image discovery.

An image input is a path, encoded bytes, a PIL image, a numpy array (H×W or H×W×C, C in 1/3/4, uint8 or any
number type) or a torch tensor (the same shapes, or C×H×W). :func:`find_files` is how every command finds
images in a folder (``predict``, ``explain``, ``evaluate``, training's index, the volume partition): recursive,
sorted by path, hidden files and folders skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from braintumor.errors import UserError
from braintumor.data.io import IMAGE_EXTENSIONS, read_image
from braintumor.data.pixels import ImageReadError, gray_to_rgb, minmax_to_uint8

# numpy arrays and torch tensors are accepted too (see to_image); typed loosely so torch stays optional here.
ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, Any]


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_files(folder: str | os.PathLike, *, include: Callable[[Path], bool] = _is_image_file,
               as_unit: Callable[[Path], bool] | None = None) -> list[Path]:
    """Files below ``folder`` that ``include`` accepts (default: image extensions), recursively, sorted by path,
    hidden files and folders (names starting with ".") skipped. A sub-folder for which ``as_unit`` is true (e.g. a
    DICOM series) is returned as one entry instead of being walked."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        kept = []
        for name in subdirs:
            if name.startswith("."):
                continue
            if as_unit is not None and as_unit(Path(directory) / name):
                found.append(Path(directory) / name)
            else:
                kept.append(name)
        subdirs[:] = kept  # pruning in place stops os.walk from descending into hidden folders and units
        found.extend(Path(directory) / name for name in files
                     if not name.startswith(".") and include(Path(directory) / name))
    return sorted(found)


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their images (:func:`find_files`); a file given twice (also through
    its folder) is kept once, where it first appears."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = find_files(path)
            if not images:
                raise UserError(f"no images found in folder {path}")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"file or folder not found: {path}")
    return unique_paths(found)


def unique_paths(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without repeats of the same file (compared by resolved path), first occurrence kept."""
    seen, kept = set(), []
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def describe_source(item: ImageInput) -> str:
    """A short printable name for an input."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    if isinstance(item, Image.Image):
        return "<image>"
    shape = getattr(item, "shape", None)
    return f"<array {'x'.join(str(int(s)) for s in shape)}>" if shape is not None else "<image>"


def to_image(item: ImageInput, name: str | None = None) -> tuple[Image.Image, bool]:
    """Any image input as an RGB PIL image, and whether all its values were finite (False: NaN/inf were set to 0;
    such a slice is never ``ok``).

    Arrays and tensors: uint8 is used as it is; other number types whose values are all whole numbers in 0..255
    as well (as volumes are read); floats within 0..1 are scaled by 255; anything else is scaled linearly from
    its finite minimum and maximum to 0..255. Shapes: H×W, H×W×C or (tensors, as torch stores images) C×H×W,
    with C = 1, 3 or 4 (alpha dropped); leading axes of length 1 are dropped.
    """
    if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return read_image(item, name=name), True
    label = name or describe_source(item)
    is_tensor = type(item).__module__.startswith("torch")
    if is_tensor:
        item = item.detach().cpu()
        item = item.numpy() if item.dtype.is_floating_point is False else item.float().numpy()
    if not isinstance(item, np.ndarray):
        raise TypeError(f"expected a path, bytes, a PIL image, a numpy array or a torch tensor, "
                        f"not {type(item).__name__}")
    values = item
    while values.ndim > 2 and values.shape[0] == 1 and not (values.ndim == 3 and values.shape[-1] not in (1, 3, 4)):
        values = values[0]
    if values.ndim == 3 and values.shape[-1] not in (1, 3, 4) and values.shape[0] in (1, 3, 4):
        values = np.moveaxis(values, 0, -1)  # channels first (torch) -> last
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim == 3 and values.shape[-1] == 4:
        values = values[..., :3]
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[-1] != 3) or min(values.shape[:2]) < 1:
        raise ImageReadError(label, f"an image array must be HxW, HxWxC or CxH... with C in 1, 3, 4; "
                                    f"got shape {tuple(item.shape)}")
    if values.dtype.kind not in "uifb":
        raise ImageReadError(label, f"an image array must hold numbers, got dtype {values.dtype}")
    finite = bool(np.isfinite(values).all()) if values.dtype.kind == "f" else True
    pixels = _to_uint8(values)
    if pixels.ndim == 2:
        return gray_to_rgb(pixels), finite
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB"), finite


def _to_uint8(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind == "b":
        return values.astype(np.uint8) * 255
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size and finite.min() >= 0 and finite.max() <= 255 and np.all(finite == np.rint(finite)) \
            and not (values.dtype.kind == "f" and finite.max() <= 1):
        return np.where(np.isfinite(values), values, 0).astype(np.uint8) if values.dtype.kind == "f" \
            else values.astype(np.uint8)
    if values.dtype.kind == "f" and finite.size and finite.min() >= 0 and finite.max() <= 1:
        return np.clip(np.rint(np.where(np.isfinite(values), values, 0) * 255.0), 0, 255).astype(np.uint8)
    return minmax_to_uint8(values)


__all__ = ["ImageInput", "ImageReadError", "describe_source", "expand_inputs", "find_files", "to_image",
           "unique_paths"]
