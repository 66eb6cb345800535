"""Read any supported image or DICOM slice as a fully decoded 3-channel RGB PIL image.

Formats: JPEG, PNG, BMP, TIFF (8- and 16-bit; modes 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, I, F)
and DICOM (by the ``.dcm`` extension or the ``DICM`` magic at byte 128, from a path or from bytes).

Conversion rules:
- 16-bit, 32-bit integer and float grayscale are scaled min–max to 0..255 (a constant image becomes zeros).
- Alpha (RGBA, LA, PA, transparent palettes) is composited on black.
- Multi-frame files (TIFF stacks, animated PNG) give their first frame; multi-frame DICOM volumes are refused
  here, because no single frame is the obvious one to classify (``braintumor.data.volumes`` reads them as volumes).
- EXIF orientation is not applied (torchvision's decoder does not apply it either; pixels stay as stored).
- DICOM: read by :mod:`braintumor.data.dicom` (LUTs, MONOCHROME1, colour, missing decoder plug-ins).

Truncated files are detected by decoding fully (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed), and
images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused as too large.

Memory is bounded per image as :mod:`braintumor.data.pixels` describes (JPEGs longer than
:data:`~braintumor.data.pixels.MAX_DECODED_SIDE` are shrunk while decoding, by DCT scaling); classification
resizes far below that size anyway.

Which files are read is decided the same way for paths and for named bytes (an upload with its file name):
the DICOM magic first, then the extension (``.dcm`` without preamble is still read as DICOM), then the
content must be one of :data:`PIL_FORMATS` (a GIF renamed ``.png`` is refused as it is under its own name).
"""

from __future__ import annotations

import io
import os
import re
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from braintumor.data.dicom import HEADER_BYTES, has_dicom_magic, read_dicom
from braintumor.data.dicom import estimate_decode_bytes as _estimate_dicom_bytes
from braintumor.data.pixels import (ImageReadError, check_byte_budget, check_pixel_limit, decoded_bytes,
                                    finite_range, gray_to_rgb, minmax_to_uint8, one_line, shrink, shrink_factor,
                                    too_large_reason)

__all__ = ["IMAGE_EXTENSIONS", "PIL_FORMATS", "ImageReadError", "check_image", "estimate_decode_bytes",
           "find_bad_images", "read_image", "unsupported_type_reason"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})
# What PIL may decode (by content, whatever the extension says); MPO is a multi-picture JPEG from cameras.
PIL_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF"})
_HIGH_BIT_DEPTH_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def read_image(
    source: str | os.PathLike | bytes | bytearray | memoryview | Image.Image,
    *,
    name: str | None = None,
) -> Image.Image:
    """Decode ``source`` (path, encoded bytes or PIL image) fully into a new mode-"RGB" PIL image.

    ``name`` labels the source in error messages (e.g. an uploaded file's name); by default the path, or
    "<image bytes>" / "<PIL image>". Bytes with a ``name`` that has an extension are read by exactly the rules
    of a file of that name (so the server reads what the command line reads); unnamed bytes by content alone.
    Raises ImageReadError (a UserError) for missing, empty, unsupported, corrupt, truncated or too large inputs.
    """
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        return _pil_to_rgb(_load_pil(source, label), label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "<image bytes>"
        if not data:
            raise ImageReadError(label, "empty file (0 bytes)")
        suffix = _suffix(name) if name else ""
        if suffix:
            return _read_by_rules(io.BytesIO(data), data[:HEADER_BYTES], suffix, label)
        if has_dicom_magic(data[:HEADER_BYTES]):
            return read_dicom(io.BytesIO(data), label, force=False)
        return _read_pil(io.BytesIO(data), label)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source), name or str(source))
    raise TypeError(f"read_image expects a path, bytes or a PIL image, not {type(source).__name__}")


def check_image(path: str | os.PathLike) -> str | None:
    """Return None when ``path`` decodes fully with read_image, else a short reason such as "truncated image"."""
    try:
        read_image(path)
    except ImageReadError as error:
        return error.reason
    return None


def find_bad_images(paths: Iterable[str | os.PathLike], progress: bool = False,
                    workers: int | None = None) -> list[tuple[Path, str]]:
    """Check every file and return ``(path, reason)`` for those that cannot be read, in input order.

    Files are decoded in a thread pool (PIL releases the GIL while decoding), ``workers`` threads, by default
    one per core. A tqdm progress bar is shown when ``progress`` is true and stderr is a terminal.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    paths = [Path(path) for path in paths]
    show_bar = progress and sys.stderr.isatty()
    workers = workers or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(tqdm(pool.map(check_image, paths), total=len(paths), desc="checking images",
                            unit="img", disable=not show_bar, leave=False))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


# --- paths -------------------------------------------------------------------------------------------------


def _read_path(path: Path, label: str) -> Image.Image:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(label, "file not found") from None
    except OSError as error:
        raise ImageReadError(label, f"cannot access file ({one_line(error.strerror or error)})") from None
    if path.is_dir():
        raise ImageReadError(label, "is a directory, not an image file")
    if size == 0:
        raise ImageReadError(label, "empty file (0 bytes)")
    try:
        with path.open("rb") as handle:
            header = handle.read(HEADER_BYTES)
    except OSError as error:
        raise ImageReadError(label, f"cannot open file ({one_line(error.strerror or error)})") from None
    return _read_by_rules(path, header, path.suffix.lower(), label)


def _suffix(name: str) -> str:
    return os.path.splitext(name.replace("\\", "/").rsplit("/", 1)[-1])[1].lower()


def _read_by_rules(file: Path | io.BytesIO, header: bytes, suffix: str, label: str) -> Image.Image:
    """The one rule for files and named uploads: DICOM magic, then the extension, then PIL by content."""
    # DICOM exports often carry no extension (IM000001) or a wrong one, so the magic decides first.
    if has_dicom_magic(header):
        return read_dicom(file, label, force=False)
    if suffix == ".dcm":
        # DICOM without the 128-byte preamble is still valid on some scanners' exports.
        return read_dicom(file, label, force=True)
    if suffix not in IMAGE_EXTENSIONS:
        raise ImageReadError(label, unsupported_type_reason(suffix))
    return _read_pil(file, label)


def unsupported_type_reason(suffix: str) -> str:
    """The reason given for a file whose extension is not read (e.g. '.gif', '.nii')."""
    shown = f"'{suffix}'" if suffix else "(no extension)"
    return f"unsupported file type {shown}; supported: {', '.join(sorted(IMAGE_EXTENSIONS))}"


def estimate_decode_bytes(data: bytes, name: str | None = None) -> int:
    """Rough peak memory of decoding ``data`` (header only; nothing is decoded); 0 when the header is unreadable.

    The server weighs its in-flight decode budget with this before decoding.
    """
    try:
        if has_dicom_magic(data[:HEADER_BYTES]) or (name and _suffix(name) == ".dcm"):
            return _estimate_dicom_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height, mode = image.width, image.height, image.mode
    except Exception:  # noqa: BLE001 - unreadable headers are refused by read_image itself, cheaply
        return 0
    # The decoded image, one working copy of high bit depths, and the 8-bit result before shrinking.
    native = decoded_bytes(width, height, mode)
    extra = native if mode in _HIGH_BIT_DEPTH_GRAY_MODES else 0
    return native + extra + width * height * 3 // shrink_factor(width, height) ** 2 + width * height


# --- PIL formats ---------------------------------------------------------------------------------------------


def _read_pil(file: Path | io.BytesIO, label: str) -> Image.Image:
    """Open and fully decode with PIL, mapping every decoder failure to a one-line ImageReadError."""
    try:
        # PIL warns between 1x and 2x MAX_IMAGE_PIXELS and raises above 2x; the warning is silenced here and
        # the limit enforced exactly by _check_pixel_limit so both cases give the same error. catch_warnings
        # is not thread-safe, but the only filter it can leak is this same ignore, which the check makes moot.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError as error:
        match = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageReadError(label, too_large_reason(f"{match.group(1)} pixels" if match else "the image")) from None
    except UnidentifiedImageError:
        raise ImageReadError(label, "not an image") from None
    except Exception as error:  # noqa: BLE001 - corrupt headers surface as many exception types
        raise ImageReadError(label, f"corrupt image header ({one_line(error)})") from None
    with image:
        if image.format not in PIL_FORMATS:
            raise ImageReadError(label, f"unsupported image format {image.format or 'unknown'}; supported: "
                                        "JPEG, PNG, BMP, TIFF and DICOM")
        check_pixel_limit(image.width, image.height, label)
        if image.format in ("JPEG", "MPO"):
            _check_jpeg_data_size(image, _byte_length(file), label)
        factor = shrink_factor(image.width, image.height)
        if factor > 1 and image.format in ("JPEG", "MPO"):
            # DCT scaling: the decoder itself produces a 1/2, 1/4 or 1/8 size image, never the full one.
            image.draft(image.mode, (-(-image.width // factor), -(-image.height // factor)))
        check_byte_budget(image.width, image.height, image.mode, label)
        image = _load_pil(image, label)
        return _pil_to_rgb(image, label)


def _byte_length(file: Path | io.BytesIO) -> int:
    return file.stat().st_size if isinstance(file, Path) else file.getbuffer().nbytes


def _check_jpeg_data_size(image: Image.Image, size: int, label: str) -> None:
    """Refuse a JPEG whose file is far too small for the pixels its header claims (a truncated file that still
    ends in an end-of-image marker, which libjpeg pads with grey instead of failing).

    Every 8x8 block of every component costs at least one bit with Huffman coding (its DC code; progressive DC
    scans too), so ``blocks / 8`` bytes is a hard floor. Arithmetic-coded JPEGs can go below it on flat
    content; the floor used is therefore eight times lower (one bit per 64 blocks), which a real slice never
    approaches and a header claiming 9400x9400 pixels over 1 KB of data fails by a factor of twenty.
    """
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)]
    h_max = max(h for _, h, _, _ in layers) or 1
    v_max = max(v for _, _, v, _ in layers) or 1
    blocks = sum(-(-image.width * max(h, 1) // (8 * h_max)) * -(-image.height * max(v, 1) // (8 * v_max))
                 for _, h, v, _ in layers)
    if size * 8 * 64 < blocks:
        raise ImageReadError(label, f"truncated image ({size} bytes cannot hold the {image.width}x{image.height} "
                                    "pixels its header claims)")


def _load_pil(image: Image.Image, label: str) -> Image.Image:
    """Force a full decode so that truncated or corrupt pixel data fails here, not later in a DataLoader."""
    try:
        image.load()
    except Exception as error:  # noqa: BLE001 - decoders raise OSError, SyntaxError, EOFError, zlib.error...
        message = one_line(error)
        if "truncated" in message.lower() or isinstance(error, EOFError):
            raise ImageReadError(label, "truncated image") from None
        raise ImageReadError(label, f"corrupt image data ({message})") from None
    return image


def _pil_to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Convert a loaded PIL image of any supported mode to a new RGB image."""
    mode = image.mode
    if mode in _HIGH_BIT_DEPTH_GRAY_MODES:
        values = np.asarray(image)
        image.close()  # frees the decoder's copy: only the array and the 8-bit result live at once
        if values.dtype.kind == "f" and finite_range(values) is None:
            # NaN/inf pixels become 0 in the 8-bit image; an image of nothing else must not become a class
            raise ImageReadError(label, "no finite pixel values (every pixel is NaN or infinite)")
        return _gray_array_to_rgb(values)
    image = shrink(image)
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        composited = Image.new("RGB", rgba.size, (0, 0, 0))
        # paste with the alpha band as mask blends src*a + black*(1-a): compositing on black.
        composited.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return composited
    try:
        # CMYK (Adobe-inverted JPEGs are already un-inverted by PIL's decoder), P, 1, L, YCbCr, RGB.
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageReadError(label, f"unsupported colour mode {mode} ({one_line(error)})") from None


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    return gray_to_rgb(values if values.dtype == np.uint8 else minmax_to_uint8(values))
