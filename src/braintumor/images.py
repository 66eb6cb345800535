"""Read any supported image or DICOM slice as a fully decoded 3-channel RGB PIL image.

Formats: JPEG, PNG, BMP, TIFF (8- and 16-bit; modes 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, I, F)
and DICOM (by the ``.dcm`` extension or the ``DICM`` magic at byte 128, from a path or from bytes).

Conversion rules:
- 16-bit, 32-bit integer and float grayscale are scaled min–max to 0..255 (a constant image becomes zeros).
- Alpha (RGBA, LA, PA, transparent palettes) is composited on black.
- Multi-frame files (TIFF stacks, animated PNG) give their first frame; multi-frame DICOM volumes are refused
  here, because no single frame is the obvious one to classify (``braintumor.volumes`` reads them as volumes).
- EXIF orientation is not applied (torchvision's decoder does not apply it either; pixels stay as stored).
- DICOM: pydicom's Modality LUT (sequence or RescaleSlope/Intercept) and VOI LUT (VOI LUT Sequence, else
  WindowCenter/WindowWidth with LINEAR, LINEAR_EXACT or SIGMOID; first preset), scaled to 8 bit over the VOI's
  output range, or min–max when the file has no VOI (see ``dicom_gray_to_uint8``); MONOCHROME1 inverted; colour
  DICOM (SamplesPerPixel 3, palette colour) kept as RGB. Compressed pixel data whose decoder plug-in is missing
  gives one line naming the package to install. Multi-frame DICOM volumes are read by ``braintumor.volumes``.

Truncated files are detected by decoding fully (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed), and
images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused as too large.
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

from braintumor.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_HIGH_BIT_DEPTH_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageReadError(UserError):
    """An image that cannot be read; the message names the file and the reason on one line."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read image {source}: {reason}")


def read_image(
    source: str | os.PathLike | bytes | bytearray | memoryview | Image.Image,
    *,
    name: str | None = None,
) -> Image.Image:
    """Decode ``source`` (path, encoded bytes or PIL image) fully into a new mode-"RGB" PIL image.

    ``name`` labels the source in error messages (e.g. an uploaded file's name); by default the path, or
    "<image bytes>" / "<PIL image>".
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
        if _has_dicom_magic(data[: _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)]):
            return _read_dicom(io.BytesIO(data), label, force=False)
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
        raise ImageReadError(label, f"cannot access file ({_one_line(error.strerror or error)})") from None
    if path.is_dir():
        raise ImageReadError(label, "is a directory, not an image file")
    if size == 0:
        raise ImageReadError(label, "empty file (0 bytes)")
    try:
        with path.open("rb") as handle:
            header = handle.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except OSError as error:
        raise ImageReadError(label, f"cannot open file ({_one_line(error.strerror or error)})") from None
    suffix = path.suffix.lower()
    # DICOM exports often carry no extension (IM000001) or a wrong one, so the magic decides first.
    if _has_dicom_magic(header):
        return _read_dicom(path, label, force=False)
    if suffix == ".dcm":
        # DICOM without the 128-byte preamble is still valid on some scanners' exports.
        return _read_dicom(path, label, force=True)
    if suffix not in IMAGE_EXTENSIONS:
        shown = f"'{suffix}'" if suffix else "(no extension)"
        supported = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ImageReadError(label, f"unsupported file type {shown}; supported: {supported}")
    return _read_pil(path, label)


def _has_dicom_magic(header: bytes) -> bool:
    return header[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)] == _DICOM_MAGIC


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _too_large_reason(pixels: str) -> str:
    return (
        f"too large: {pixels} exceeds the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )


def _check_pixel_limit(width: int, height: int, label: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageReadError(label, _too_large_reason(f"{width}x{height} pixels"))


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
        raise ImageReadError(label, _too_large_reason(f"{match.group(1)} pixels" if match else "the image")) from None
    except UnidentifiedImageError:
        raise ImageReadError(label, "not an image") from None
    except Exception as error:  # noqa: BLE001 - corrupt headers surface as many exception types
        raise ImageReadError(label, f"corrupt image header ({_one_line(error)})") from None
    with image:
        _check_pixel_limit(image.width, image.height, label)
        image = _load_pil(image, label)
        return _pil_to_rgb(image, label)


def _load_pil(image: Image.Image, label: str) -> Image.Image:
    """Force a full decode so that truncated or corrupt pixel data fails here, not later in a DataLoader."""
    try:
        image.load()
    except Exception as error:  # noqa: BLE001 - decoders raise OSError, SyntaxError, EOFError, zlib.error...
        message = _one_line(error)
        if "truncated" in message.lower() or isinstance(error, EOFError):
            raise ImageReadError(label, "truncated image") from None
        raise ImageReadError(label, f"corrupt image data ({message})") from None
    return image


def _pil_to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Convert a loaded PIL image of any supported mode to a new RGB image."""
    mode = image.mode
    if mode in _HIGH_BIT_DEPTH_GRAY_MODES:
        return _gray_array_to_rgb(np.asarray(image))
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
        raise ImageReadError(label, f"unsupported colour mode {mode} ({_one_line(error)})") from None


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale finite values linearly so min -> 0 and max -> 255; constant or empty input gives zeros."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if not finite.any():
        return out
    low = values[finite].min()
    high = values[finite].max()
    if high <= low:
        return out
    scaled = (values[finite] - low) / (high - low) * 255.0
    out[finite] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    gray = values if values.dtype == np.uint8 else _minmax_to_uint8(values)
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


# --- DICOM ---------------------------------------------------------------------------------------------------


def _read_dicom(file: Path | io.BytesIO, label: str, *, force: bool) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(file, force=force)
    except InvalidDicomError:
        raise ImageReadError(label, "not a valid DICOM file") from None
    except EOFError:
        raise ImageReadError(label, "truncated DICOM file") from None
    except Exception as error:  # noqa: BLE001 - malformed elements raise many exception types
        raise ImageReadError(label, f"corrupt DICOM file ({_one_line(error)})") from None
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        # force=True parses almost any bytes into an empty dataset; without the DICM header that means "not DICOM".
        raise ImageReadError(label, "not a valid DICOM file" if force else "DICOM file has no pixel data")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(
            label, f"multi-frame DICOM ({frames} frames) is a volume: braintumor predict and explain read volumes, "
                   "training and evaluation need 2-D slices"
        )
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    _check_pixel_limit(columns, rows, label)
    file_meta = getattr(dataset, "file_meta", None)
    if force and file_meta is not None and "TransferSyntaxUID" not in file_meta:
        # Preamble-less files read with force=True have no meta header; their encoding is what pydicom guessed.
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit = getattr(dataset, "original_encoding", (True, True))[0]
        file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    missing = missing_decoder_reason(dataset)
    if missing:
        raise ImageReadError(label, missing)
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - missing codecs, short pixel data, bad attributes
        message = _one_line(error)
        # pydicom: "The number of bytes of pixel data is less than expected (668 vs 768 bytes) ..."
        if "truncated" in message.lower() or "less than expected" in message.lower():
            raise ImageReadError(label, "truncated DICOM pixel data") from None
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({message})") from None

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1))
    try:
        if samples == 1 and photometric == "PALETTE COLOR":
            rgb = _dicom_palette_to_uint8(pixels, dataset)
        elif samples == 1:
            return _gray_array_to_rgb_dicom(pixels, dataset, photometric)
        elif samples == 3:
            rgb = _dicom_color_to_uint8(pixels, dataset, photometric)
        else:
            raise ImageReadError(label, f"unsupported DICOM SamplesPerPixel {samples}")
    except ImageReadError:
        raise
    except ValueError as error:
        raise ImageReadError(label, f"cannot convert DICOM pixel data ({_one_line(error)})") from None
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def dicom_gray_to_uint8(pixels: np.ndarray, dataset) -> np.ndarray:
    """Grayscale DICOM pixels to 0..255 the way pydicom reads the file's LUTs (not MONOCHROME1-inverted here).

    ``pydicom.pixels.apply_modality_lut`` (Modality LUT Sequence or RescaleSlope/Intercept), then
    ``apply_voi_lut`` (the VOI LUT Sequence when present, else Window Center/Width with its VOI LUT Function; the
    first preset of each). The VOI output is scaled linearly to 0..255 over its full output range, which pydicom
    itself gives when it is applied to the extreme inputs (the window's y_min/y_max, or the LUT's lowest and
    highest entry). A file without a VOI, or with an invalid one, is scaled min–max instead.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(pixels, dataset))
    has_lut = bool(dataset.get("VOILUTSequence"))
    if not has_lut and not ("WindowCenter" in dataset and "WindowWidth" in dataset):
        return _minmax_to_uint8(values)
    if has_lut and not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values).astype(np.int64)  # a LUT is indexed by whole numbers (a rescale gives floats)
    with np.errstate(over="ignore"):
        try:
            if has_lut:
                descriptor = dataset.VOILUTSequence[0].LUTDescriptor
                entries = int(descriptor[0]) or 2**16
                first = int(descriptor[1])
                probe = np.arange(first, first + entries, dtype=np.int64)
            else:
                probe = np.array([-1e300, 1e300])
            low_high = np.asarray(apply_voi_lut(probe, dataset), dtype=np.float64)
            out = np.asarray(apply_voi_lut(values, dataset), dtype=np.float64)
        except (ValueError, NotImplementedError, AttributeError, TypeError, IndexError, KeyError):
            return _minmax_to_uint8(values)  # an invalid VOI in the file: min–max rather than refuse the slice
    low, high = float(low_high.min()), float(low_high.max())
    if not high > low:
        return _minmax_to_uint8(values)
    return np.clip(np.rint((out - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


# Transfer syntaxes whose decoders are optional plug-ins (pydicom decodes RLE and deflate itself).
_DECODER_PACKAGES = (("1.2.840.10008.1.2.4.9", "pylibjpeg pylibjpeg-openjpeg"),  # JPEG 2000
                     ("1.2.840.10008.1.2.4.20", "pylibjpeg pylibjpeg-openjpeg"),  # HTJ2K
                     ("1.2.840.10008.1.2.4.", "pylibjpeg pylibjpeg-libjpeg"))  # JPEG, JPEG-LS


def missing_decoder_reason(dataset) -> str | None:
    """None when pydicom can decode this dataset's pixel data, else one line naming the plug-in to install."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return None
    from pydicom.pixels.decoders.base import get_decoder

    try:
        if get_decoder(syntax).is_available:
            return None
    except NotImplementedError:
        return f"DICOM transfer syntax {syntax.name} ({syntax}) is not supported by pydicom"
    packages = next((names for prefix, names in _DECODER_PACKAGES if str(syntax).startswith(prefix)),
                    "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
    return (f"DICOM pixel data compressed as {syntax.name} needs a decoder plug-in: pip install {packages} "
            "(or pip install 'braintumor[dicom-codecs]')")


def _gray_array_to_rgb_dicom(pixels: np.ndarray, dataset, photometric: str) -> Image.Image:
    gray = dicom_gray_to_uint8(pixels, dataset)
    if photometric == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: low values are bright
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


def _dicom_color_to_uint8(pixels: np.ndarray, dataset, photometric: str) -> np.ndarray:
    if photometric.startswith("YBR") and photometric not in ("YBR_ICT", "YBR_RCT"):
        # pydicom >= 3 converts YBR to RGB in pixel_array by default; older versions leave it to the caller.
        import pydicom

        if int(pydicom.__version__.split(".")[0]) < 3:
            from pydicom.pixel_data_handlers.util import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
    bits = int(dataset.get("BitsStored", 8))
    if pixels.dtype == np.uint8:
        return pixels
    if np.issubdtype(pixels.dtype, np.integer) and bits > 8:
        # Colour is scaled by the stored bit depth, not min–max, so hues keep their balance.
        scaled = pixels.astype(np.float64) * (255.0 / (2**bits - 1))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return pixels.astype(np.uint8)


def _dicom_palette_to_uint8(pixels: np.ndarray, dataset) -> np.ndarray:
    try:
        from pydicom.pixels import apply_color_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_color_lut
    rgb = np.asarray(apply_color_lut(pixels, dataset))
    if rgb.dtype == np.uint8:
        return rgb
    # 16-bit palette entries: keep the high byte's scale.
    return np.clip(np.rint(rgb.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
