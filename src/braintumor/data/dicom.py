"""DICOM slices: reading one into an RGB image, the memory guards around pydicom, and its LUTs.

A file is DICOM when it carries the ``DICM`` magic at byte 128, or (read with ``force``) when its name ends in
``.dcm``: :func:`braintumor.data.io.read_image` decides, for paths and named uploads alike. Grayscale pixels go
through pydicom's Modality LUT (sequence or RescaleSlope/Intercept) and VOI LUT (VOI LUT Sequence, else
WindowCenter/WindowWidth with LINEAR, LINEAR_EXACT or SIGMOID; first preset), scaled to 8 bit over the VOI's
output range, or min–max when the file has no VOI (:func:`dicom_gray_to_uint8`); MONOCHROME1 is inverted; colour
(SamplesPerPixel 3, palette colour) stays RGB. Compressed pixel data whose decoder plug-in is missing gives one
line naming the package to install; multi-frame files are volumes (:mod:`braintumor.data.volumes` reads those).

Memory: a deflated file is inflated to an anonymous temporary file through a 1 MiB window and refused once it
passes the inflate limit (:func:`inflate_to_temporary`; pydicom would inflate it whole in memory, even for a
header); headers are read with :func:`read_header`, which does the same, so the volume probe never inflates a
bomb either. The LUTs run on row chunks, and the encoded pixel bytes are dropped once decoded.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from braintumor.data import pixels
from braintumor.data.pixels import (ImageReadError, check_byte_budget, check_pixel_limit, gray_to_rgb,
                                    minmax_to_uint8, one_line, shrink)

MAGIC_OFFSET = 128
MAGIC = b"DICM"
HEADER_BYTES = MAGIC_OFFSET + len(MAGIC)  # enough of a file's start to tell DICOM by its magic
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"
# Transfer syntaxes whose decoders are optional plug-ins (pydicom decodes RLE and deflate itself).
_DECODER_PACKAGES = (("1.2.840.10008.1.2.4.9", "pylibjpeg pylibjpeg-openjpeg"),  # JPEG 2000
                     ("1.2.840.10008.1.2.4.20", "pylibjpeg pylibjpeg-openjpeg"),  # HTJ2K
                     ("1.2.840.10008.1.2.4.", "pylibjpeg pylibjpeg-libjpeg"))  # JPEG, JPEG-LS


def has_dicom_magic(header: bytes) -> bool:
    """True when ``header`` (the first 132 bytes or more) carries the DICOM magic at byte 128."""
    return header[MAGIC_OFFSET:HEADER_BYTES] == MAGIC


def read_dicom(file: Path | io.BytesIO, label: str, *, force: bool) -> Image.Image:
    """Decode one DICOM slice (a path or an open binary buffer) into an RGB image; ``force`` reads files without
    the preamble and magic. Raises ImageReadError with one line for anything it cannot read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    inflated = inflate_to_temporary(file, label)
    try:
        dataset = pydicom.dcmread(inflated if inflated is not None else file, force=force)
    except ImageReadError:
        raise
    except InvalidDicomError:
        raise ImageReadError(label, "not a valid DICOM file") from None
    except EOFError:
        raise ImageReadError(label, "truncated DICOM file") from None
    except Exception as error:  # noqa: BLE001 - malformed elements raise many exception types
        raise ImageReadError(label, f"corrupt DICOM file ({one_line(error)})") from None
    finally:
        if inflated is not None:
            inflated.close()
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
    check_pixel_limit(columns, rows, label)
    samples_per_pixel = int(dataset.get("SamplesPerPixel", 1) or 1)
    bytes_per_sample = max(1, -(-int(dataset.get("BitsAllocated", 8) or 8) // 8))
    check_byte_budget(columns, rows, {1: "L", 2: "I;16", 4: "I"}.get(bytes_per_sample * samples_per_pixel, "RGB")
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
        values = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - missing codecs, short pixel data, bad attributes
        message = one_line(error)
        # pydicom: "The number of bytes of pixel data is less than expected (668 vs 768 bytes) ..."
        if "truncated" in message.lower() or "less than expected" in message.lower():
            raise ImageReadError(label, "truncated DICOM pixel data") from None
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({message})") from None
    # pixel_array is a decoded copy: the encoded bytes can go before the conversion allocates its result.
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in dataset:
            delattr(dataset, keyword)

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1))
    try:
        if samples == 1 and photometric == "PALETTE COLOR":
            rgb = _palette_to_uint8(values, dataset)
        elif samples == 1:
            return _gray_to_rgb(values, dataset, photometric)
        elif samples == 3:
            rgb = _color_to_uint8(values, dataset)
        else:
            raise ImageReadError(label, f"unsupported DICOM SamplesPerPixel {samples}")
    except ImageReadError:
        raise
    except ValueError as error:
        raise ImageReadError(label, f"cannot convert DICOM pixel data ({one_line(error)})") from None
    return shrink(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB"))


def deflated_size(file: Path | io.BytesIO, limit: int) -> int | None:
    """Bytes a deflated DICOM's data set inflates to (counted up to just past ``limit``, in O(1 MiB) memory);
    None when the file is not a deflated DICOM or its meta group cannot be read."""
    # pydicom's public read_file_meta_info opens a path; the private reader it wraps reads the open handle, which
    # uploads (bytes) need too (tests/test_hostile_inputs.py reads deflated files from bytes and from paths).
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


def inflate_to_temporary(file: Path | io.BytesIO, label: str, limit: int | None = None, *,
                         head_only: int | None = None):
    """A deflated DICOM's inflated copy (Explicit VR Little Endian) in an anonymous temporary file, open for
    reading at its start; None when ``file`` is not a deflated DICOM.

    pydicom inflates a deflated data set whole in memory, and does so even to read only its header; this copies
    it to disk through a 1 MiB window instead, and refuses (ImageReadError) a file that inflates past ``limit``
    (default: the per-image inflate limit) before writing more than that. With ``head_only`` (bytes), only that
    much of the start is copied (enough for a header read with ``stop_before_pixels``), and nothing is refused.
    """
    import tempfile

    from pydicom.filebase import DicomFileLike
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    limit = _inflate_limit() if limit is None else limit
    if head_only is None:
        size = deflated_size(file, limit)  # counted first (CPU only), so a bomb never writes its limit to disk
        if size is None:
            return None
        if size > limit:
            raise ImageReadError(label, _inflate_reason(limit))
    handle = file.open("rb") if isinstance(file, Path) else file
    copy = None
    try:
        if _DEFLATED_UID not in handle.read(4096):
            return None
        handle.seek(0)
        try:
            preamble = read_preamble(handle, True) or b"\0" * 128
            meta = _read_file_meta_info(handle)
        except Exception:  # noqa: BLE001 - a broken meta group: pydicom's own reading gives the reason
            return None
        if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED_UID.decode():
            return None
        copy = tempfile.TemporaryFile(prefix="braintumor-inflated-")
        copy.write(preamble + MAGIC)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        writer = DicomFileLike(copy)
        writer.is_little_endian, writer.is_implicit_VR = True, False
        write_file_meta_info(writer, meta, enforce_standard=False)
        inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while not inflater.eof:
            piece = inflater.unconsumed_tail or handle.read(1 << 16)
            if not piece:
                break
            try:
                out = inflater.decompress(piece, 1 << 20)
            except zlib.error as error:
                raise ImageReadError(label, f"corrupt deflated DICOM data ({one_line(error)})") from None
            total += len(out)
            if head_only is not None and total >= head_only:
                copy.write(out)
                break
            if head_only is None and total > limit:
                raise ImageReadError(label, _inflate_reason(limit))
            copy.write(out)
        copy.seek(0)
        result, copy = copy, None
        return result
    finally:
        if copy is not None:
            copy.close()
        if isinstance(file, Path):
            handle.close()
        else:
            file.seek(0)


def _inflate_reason(limit: int) -> str:
    return (f"too large: the deflated DICOM data inflate to more than {limit // 2**20} MiB (limit: "
            f"{pixels.MAX_DECODED_BYTES // 2**20} MiB per image)")


def read_header(file: Path | io.BytesIO, label: str, *, force: bool = False):
    """The data set without its pixel data (a deflated file is inflated to disk first, within the limit; the
    volume probe reads headers with this so that it never inflates a bomb in memory)."""
    import pydicom

    inflated = inflate_to_temporary(file, label, head_only=_HEADER_INFLATE_BYTES)
    if inflated is None:
        return pydicom.dcmread(file, stop_before_pixels=True, force=force)
    try:
        return pydicom.dcmread(inflated, stop_before_pixels=True, force=force)
    except Exception:  # noqa: BLE001 - a header longer than the head read: inflate it all (within the limit)
        inflated.close()
        inflated = inflate_to_temporary(file, label)
        return pydicom.dcmread(inflated, stop_before_pixels=True, force=force)
    finally:
        inflated.close()


_HEADER_INFLATE_BYTES = 8 << 20  # a header read inflates this much of a deflated file's start (and more if needed)


def _inflate_limit() -> int:
    """Bytes a deflated DICOM may inflate to: the pixels' budget plus the other elements, with room to spare."""
    return pixels.MAX_DECODED_BYTES * 2 + (1 << 20)


def estimate_decode_bytes(data: bytes) -> int:
    """Rough peak memory of reading the DICOM ``data`` (header only; no pixels are decoded)."""
    import pydicom

    inflated = deflated_size(io.BytesIO(data), _inflate_limit())
    if inflated is not None:  # pydicom would inflate everything just to read the header
        return 3 * inflated
    dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    samples, bits = int(dataset.get("SamplesPerPixel", 1)), int(dataset.get("BitsAllocated", 8))
    native = rows * columns * samples * max(1, -(-bits // 8))
    return 2 * native + rows * columns * 4


def dicom_gray_to_uint8(values: np.ndarray, dataset) -> np.ndarray:
    """Grayscale DICOM pixels to 0..255 the way pydicom reads the file's LUTs (not MONOCHROME1-inverted here).

    ``pydicom.pixels.apply_modality_lut`` (Modality LUT Sequence or RescaleSlope/Intercept), then
    ``apply_voi_lut`` (the VOI LUT Sequence when present, else Window Center/Width with its VOI LUT Function; the
    first preset of each). The VOI output is scaled linearly to 0..255 over its full output range, which pydicom
    itself gives when it is applied to the extreme inputs (the window's y_min/y_max, or the LUT's lowest and
    highest entry). A file without a VOI, or with an invalid one, is scaled min–max instead.

    Both LUTs are elementwise, so they run on row chunks (:func:`braintumor.data.pixels.minmax_to_uint8`'s):
    memory beyond the stored pixels and the 8-bit result is a chunk's float64, never the image's.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    def modality(chunk: np.ndarray) -> np.ndarray:
        return np.asarray(apply_modality_lut(chunk, dataset))

    has_lut = bool(dataset.get("VOILUTSequence"))
    if not has_lut and not ("WindowCenter" in dataset and "WindowWidth" in dataset):
        return minmax_to_uint8(values, modality)

    def voi(chunk: np.ndarray) -> np.ndarray:
        chunk = modality(chunk)
        if has_lut and not np.issubdtype(chunk.dtype, np.integer):
            chunk = np.rint(chunk).astype(np.int64)  # a LUT is indexed by whole numbers (a rescale gives floats)
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(apply_voi_lut(chunk, dataset), dtype=np.float64)

    voi_errors = (ValueError, NotImplementedError, AttributeError, TypeError, IndexError, KeyError)
    try:
        with np.errstate(over="ignore"):
            if has_lut:
                descriptor = dataset.VOILUTSequence[0].LUTDescriptor
                entries = int(descriptor[0]) or 2**16
                first = int(descriptor[1])
                probe = np.arange(first, first + entries, dtype=np.int64)
            else:
                probe = np.array([-1e300, 1e300])
            low_high = np.asarray(apply_voi_lut(probe, dataset), dtype=np.float64)
        low, high = float(low_high.min()), float(low_high.max())
        if not high > low:
            return minmax_to_uint8(values, modality)
        out = np.empty(values.shape, dtype=np.uint8)
        for rows in pixels._row_chunks(values):
            scaled = (voi(values[rows]) - low) * (255.0 / (high - low))
            out[rows] = np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)
        return out
    except voi_errors:
        return minmax_to_uint8(values, modality)  # an invalid VOI in the file: min–max rather than refuse the slice


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


def _gray_to_rgb(values: np.ndarray, dataset, photometric: str) -> Image.Image:
    gray = dicom_gray_to_uint8(values, dataset)
    if photometric == "MONOCHROME1":
        np.subtract(255, gray, out=gray)  # MONOCHROME1: low values are bright
    return gray_to_rgb(gray)


def _color_to_uint8(values: np.ndarray, dataset) -> np.ndarray:
    # pydicom >= 3 (required) converts YBR to RGB in pixel_array; colour is scaled by the stored bit depth, not
    # min–max, so hues keep their balance.
    bits = int(dataset.get("BitsStored", 8))
    if values.dtype == np.uint8:
        return values
    if np.issubdtype(values.dtype, np.integer) and bits > 8:
        scaled = values.astype(np.float64) * (255.0 / (2**bits - 1))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return values.astype(np.uint8)


def _palette_to_uint8(values: np.ndarray, dataset) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    rgb = np.asarray(apply_color_lut(values, dataset))
    if rgb.dtype == np.uint8:
        return rgb
    # 16-bit palette entries: keep the high byte's scale.
    return np.clip(np.rint(rgb.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
