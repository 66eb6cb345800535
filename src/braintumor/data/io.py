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

Memory is bounded per image: an image whose decoded pixels (width x height x bytes per pixel of the file's own
mode, before any conversion) exceed :data:`MAX_DECODED_BYTES` is refused before decoding; high bit depths are
scaled to 8 bit in row chunks (never the whole image in float64); images longer than :data:`MAX_DECODED_SIDE`
on a side are shrunk by an integer box filter right after decoding (JPEG: during decoding, by DCT scaling), so
no conversion ever holds a full-size float or RGB copy. Classification resizes far below that size anyway.

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

from braintumor.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})
# What PIL may decode (by content, whatever the extension says); MPO is a multi-picture JPEG from cameras.
PIL_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF"})
MAX_DECODED_BYTES = 256 * 2**20  # per image, in the file's own mode: a 9000x9000 16-bit slice is 155 MiB
MAX_DECODED_SIDE = 4096  # longer images are box-shrunk by an integer factor right after decoding
_ROW_CHUNK_PIXELS = 1 << 18  # high-bit-depth conversion works on about this many pixels at a time
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16L": 2, "I;16B": 2,
                    "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4,
                    "CMYK": 4, "I": 4, "F": 4}

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
            return _read_by_rules(io.BytesIO(data), data[: _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)], suffix, label)
        if has_dicom_magic(data[: _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)]):
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
    return _read_by_rules(path, header, path.suffix.lower(), label)


def _suffix(name: str) -> str:
    return os.path.splitext(name.replace("\\", "/").rsplit("/", 1)[-1])[1].lower()


def _read_by_rules(file: Path | io.BytesIO, header: bytes, suffix: str, label: str) -> Image.Image:
    """The one rule for files and named uploads: DICOM magic, then the extension, then PIL by content."""
    # DICOM exports often carry no extension (IM000001) or a wrong one, so the magic decides first.
    if has_dicom_magic(header):
        return _read_dicom(file, label, force=False)
    if suffix == ".dcm":
        # DICOM without the 128-byte preamble is still valid on some scanners' exports.
        return _read_dicom(file, label, force=True)
    if suffix not in IMAGE_EXTENSIONS:
        raise ImageReadError(label, unsupported_type_reason(suffix))
    return _read_pil(file, label)


def unsupported_type_reason(suffix: str) -> str:
    """The reason given for a file whose extension is not read (e.g. '.gif', '.nii')."""
    shown = f"'{suffix}'" if suffix else "(no extension)"
    return f"unsupported file type {shown}; supported: {', '.join(sorted(IMAGE_EXTENSIONS))}"


def has_dicom_magic(header: bytes) -> bool:
    """True when ``header`` (the first 132 bytes or more) carries the DICOM magic at byte 128."""
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


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Bytes of an image's decoded pixels in its own mode (what the decoder must hold at once)."""
    return int(width) * int(height) * _BYTES_PER_PIXEL.get(mode, 4)


def _check_byte_budget(width: int, height: int, mode: str, label: str) -> None:
    needed = decoded_bytes(width, height, mode)
    if needed > MAX_DECODED_BYTES:
        raise ImageReadError(label, f"too large: {width}x{height} pixels of mode {mode} decode to "
                                    f"{needed / 2**20:.0f} MiB, over the limit of {MAX_DECODED_BYTES // 2**20} MiB "
                                    "per image (braintumor.data.io.MAX_DECODED_BYTES)")


def _shrink_factor(width: int, height: int) -> int:
    return max(1, -(-max(width, height) // MAX_DECODED_SIDE))


def estimate_decode_bytes(data: bytes, name: str | None = None) -> int:
    """Rough peak memory of decoding ``data`` (header only; nothing is decoded); 0 when the header is unreadable.

    The server weighs its in-flight decode budget with this before decoding.
    """
    try:
        head = data[: _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)]
        if has_dicom_magic(head) or (name and _suffix(name) == ".dcm"):
            import pydicom

            inflated = _deflated_size(io.BytesIO(data), MAX_DECODED_BYTES * 2 + (1 << 20))
            if inflated is not None:  # pydicom would inflate everything just to read the header
                return 3 * inflated

            dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
            samples, bits = int(dataset.get("SamplesPerPixel", 1)), int(dataset.get("BitsAllocated", 8))
            native = rows * columns * samples * max(1, -(-bits // 8))
            return 2 * native + rows * columns * 4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height, mode = image.width, image.height, image.mode
    except Exception:  # noqa: BLE001 - unreadable headers are refused by read_image itself, cheaply
        return 0
    # The decoded image, one working copy of high bit depths, and the 8-bit result before shrinking.
    native = decoded_bytes(width, height, mode)
    extra = native if mode in _HIGH_BIT_DEPTH_GRAY_MODES else 0
    return native + extra + width * height * 3 // _shrink_factor(width, height) ** 2 + width * height


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
        if image.format not in PIL_FORMATS:
            raise ImageReadError(label, f"unsupported image format {image.format or 'unknown'}; supported: "
                                        "JPEG, PNG, BMP, TIFF and DICOM")
        _check_pixel_limit(image.width, image.height, label)
        factor = _shrink_factor(image.width, image.height)
        if factor > 1 and image.format in ("JPEG", "MPO"):
            # DCT scaling: the decoder itself produces a 1/2, 1/4 or 1/8 size image, never the full one.
            image.draft(image.mode, (-(-image.width // factor), -(-image.height // factor)))
        _check_byte_budget(image.width, image.height, image.mode, label)
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
        values = np.asarray(image)
        image.close()  # frees the decoder's copy: only the array and the 8-bit result live at once
        return _gray_array_to_rgb(values)
    image = _shrink(image)
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
        raise ImageReadError(label, f"unsupported colour mode {mode} ({_one_line(error)})") from None


def _shrink(image: Image.Image) -> Image.Image:
    """Box-shrink an image longer than MAX_DECODED_SIDE by an integer factor (before any colour conversion)."""
    factor = _shrink_factor(image.width, image.height)
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


def _finite_range(values: np.ndarray, transform=None) -> tuple[float, float] | None:
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


def _minmax_to_uint8(values: np.ndarray, transform=None) -> np.ndarray:
    """Scale finite values linearly so min -> 0 and max -> 255; constant or empty input gives zeros.

    Works in row chunks (float64 within a chunk, so results do not depend on the chunking), with an optional
    per-chunk ``transform`` (e.g. a DICOM modality LUT) applied first.
    """
    values = np.asarray(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    span = _finite_range(values, transform)
    if span is None or span[1] <= span[0]:
        return out
    low, high = span
    for rows in _row_chunks(values):
        chunk = np.asarray(values[rows] if transform is None else transform(values[rows]), dtype=np.float64)
        finite = np.isfinite(chunk)
        scaled = (np.where(finite, chunk, low) - low) / (high - low) * 255.0
        out[rows] = np.where(finite, np.clip(np.rint(scaled), 0, 255), 0).astype(np.uint8)
    return out


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    gray = values if values.dtype == np.uint8 else _minmax_to_uint8(values)
    del values
    return _shrink(Image.fromarray(np.ascontiguousarray(gray), mode="L")).convert("RGB")


# --- DICOM ---------------------------------------------------------------------------------------------------


def _read_dicom(file: Path | io.BytesIO, label: str, *, force: bool) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_deflated_size(file, label)
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
    samples_per_pixel = int(dataset.get("SamplesPerPixel", 1) or 1)
    bytes_per_sample = max(1, -(-int(dataset.get("BitsAllocated", 8) or 8) // 8))
    _check_byte_budget(columns, rows, {1: "L", 2: "I;16", 4: "I"}.get(bytes_per_sample * samples_per_pixel, "RGB")
                       if samples_per_pixel == 1 else ("RGB" if bytes_per_sample == 1 else "RGBA"), label)
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
    return _shrink(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB"))


_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


def _deflated_size(file: Path | io.BytesIO, limit: int) -> int | None:
    """Bytes a deflated DICOM's data set inflates to (counted up to just past ``limit``, in O(1 MiB) memory);
    None when the file is not a deflated DICOM or its meta group cannot be read."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    handle = file.open("rb") if isinstance(file, Path) else file
    try:
        if _DEFLATED_UID not in handle.read(4096):
            return None
        handle.seek(0)
        try:
            read_preamble(handle, True)
            meta = _read_file_meta_info(handle)
        except Exception:  # noqa: BLE001 - a broken meta group: pydicom's own reading gives the reason
            return None
        if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED_UID.decode():
            return None
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while total <= limit and not inflater.eof:
            piece = inflater.unconsumed_tail or handle.read(1 << 16)
            if not piece:
                break
            try:
                total += len(inflater.decompress(piece, 1 << 20))
            except zlib.error:
                return None  # corrupt: pydicom reports it
        return total
    finally:
        if isinstance(file, Path):
            handle.close()
        else:
            file.seek(0)


def _check_deflated_size(file: Path | io.BytesIO, label: str) -> None:
    """Refuse a deflated DICOM whose data would inflate past the budget, before pydicom inflates all of it."""
    limit = MAX_DECODED_BYTES * 2 + (1 << 20)  # the pixels plus the other elements, with room to spare
    total = _deflated_size(file, limit)
    if total is not None and total > limit:
        raise ImageReadError(label, f"too large: the deflated DICOM data inflate to more than "
                                    f"{limit // 2**20} MiB (limit: {MAX_DECODED_BYTES // 2**20} MiB per image)")


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
        np.subtract(255, gray, out=gray)  # MONOCHROME1: low values are bright
    return _shrink(Image.fromarray(np.ascontiguousarray(gray), mode="L")).convert("RGB")


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
