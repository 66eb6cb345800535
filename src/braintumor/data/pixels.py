"""What every image reader shares: the read error, the per-image memory budget, and the conversion to 8 bit.

Memory is bounded per image: an image whose decoded pixels (width x height x bytes per pixel of the file's own
mode, before any conversion) exceed :data:`MAX_DECODED_BYTES` is refused before decoding; high bit depths are
scaled to 8 bit in row chunks (never the whole image in float64); images longer than :data:`MAX_DECODED_SIDE`
on a side are shrunk by an integer box filter right after decoding, so no conversion ever holds a full-size
float or RGB copy. The readers are :mod:`braintumor.data.io` (PIL formats) and :mod:`braintumor.data.dicom`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from braintumor.errors import UserError

MAX_DECODED_BYTES = 256 * 2**20  # per image, in the file's own mode: a 9000x9000 16-bit slice is 155 MiB
MAX_DECODED_SIDE = 4096  # longer images are box-shrunk by an integer factor right after decoding
_ROW_CHUNK_PIXELS = 1 << 18  # high-bit-depth conversion works on about this many pixels at a time
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16L": 2, "I;16B": 2,
                    "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4,
                    "CMYK": 4, "I": 4, "F": 4}


class ImageReadError(UserError):
    """An image that cannot be read; the message names the file and the reason on one line."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read image {source}: {reason}")


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space: for one-line error reasons."""
    return " ".join(str(text).split())


def too_large_reason(pixels: str) -> str:
    """The reason given for an image over PIL's decompression-bomb limit (``pixels`` says how many it has)."""
    return (
        f"too large: {pixels} exceeds the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


def check_pixel_limit(width: int, height: int, label: str) -> None:
    """Refuse an image with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, before decoding it."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageReadError(label, too_large_reason(f"{width}x{height} pixels"))


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Bytes of an image's decoded pixels in its own mode (what the decoder must hold at once)."""
    return int(width) * int(height) * _BYTES_PER_PIXEL.get(mode, 4)


def check_byte_budget(width: int, height: int, mode: str, label: str) -> None:
    """Refuse an image whose decoded pixels would exceed :data:`MAX_DECODED_BYTES`, before decoding it."""
    needed = decoded_bytes(width, height, mode)
    if needed > MAX_DECODED_BYTES:
        raise ImageReadError(label, f"too large: {width}x{height} pixels of mode {mode} decode to "
                                    f"{needed / 2**20:.0f} MiB, over the limit of {MAX_DECODED_BYTES // 2**20} MiB "
                                    "per image (braintumor.data.pixels.MAX_DECODED_BYTES)")


def shrink_factor(width: int, height: int) -> int:
    """The integer factor that brings the longer side to at most :data:`MAX_DECODED_SIDE` (1: none needed)."""
    return max(1, -(-max(width, height) // MAX_DECODED_SIDE))


def shrink(image: Image.Image) -> Image.Image:
    """Box-shrink an image longer than MAX_DECODED_SIDE by an integer factor (before any colour conversion)."""
    factor = shrink_factor(image.width, image.height)
    if factor == 1:
        return image
    if image.mode not in ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F"):
        image = image.convert("RGBA" if image.mode in ("P", "PA") else "RGB")
    return image.reduce(factor)


def _row_chunks(values: np.ndarray):
    """Slices of leading rows covering about _ROW_CHUNK_PIXELS pixels each (bounded temporaries)."""
    flat = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(-1, 1)
    step = max(1, _ROW_CHUNK_PIXELS // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        yield slice(start, start + step)


def finite_range(values: np.ndarray, transform=None) -> tuple[float, float] | None:
    """(min, max) of the finite values of ``transform(values)``, computed chunk by chunk; None if none."""
    low, high = np.inf, -np.inf
    for rows in _row_chunks(values):
        chunk = values[rows] if transform is None else transform(values[rows])
        if chunk.dtype.kind in "iub":
            if chunk.size:
                low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
            continue
        finite = chunk[np.isfinite(chunk)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return None if low > high else (low, high)


def minmax_to_uint8(values: np.ndarray, transform=None) -> np.ndarray:
    """Scale finite values linearly so min -> 0 and max -> 255; constant or empty input gives zeros.

    Works in row chunks (float64 within a chunk, so results do not depend on the chunking), with an optional
    per-chunk ``transform`` (e.g. a DICOM modality LUT) applied first.
    """
    values = np.asarray(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    span = finite_range(values, transform)
    if span is None or span[1] <= span[0]:
        return out
    low, high = span
    for rows in _row_chunks(values):
        chunk = np.asarray(values[rows] if transform is None else transform(values[rows]), dtype=np.float64)
        finite = np.isfinite(chunk)
        scaled = (np.where(finite, chunk, low) - low) / (high - low) * 255.0
        out[rows] = np.where(finite, np.clip(np.rint(scaled), 0, 255), 0).astype(np.uint8)
    return out


def gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """An 8-bit grayscale array as a shrunk RGB image."""
    return shrink(Image.fromarray(np.ascontiguousarray(gray), mode="L")).convert("RGB")
