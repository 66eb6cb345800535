"""Hostile inputs for tests and benchmarks: small files that decode to very large images.

Each stays under PIL's pixel limit, so only a bound on decoded bytes and bounded conversions keep memory in
check. Generated here so that no test or benchmark ships such a file.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png16_bomb(side: int = 9000) -> bytes:
    """A 16-bit grayscale PNG of ``side`` x ``side`` (mostly zeros: about 250 KB at 9000 px)."""
    values = np.zeros((side, side), dtype=np.uint16)
    values[side // 4: side // 2, side // 4: side // 2] = 40000
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def dicom_deflate_bomb(side: int = 9000) -> bytes:
    """A deflate-compressed 16-bit MONOCHROME2 DICOM slice of ``side`` x ``side`` (about 170 KB at 9000 px)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    dataset.Rows = dataset.Columns = side
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    values = np.zeros((side, side), dtype=np.uint16)
    values[side // 4: side // 2, side // 4: side // 2] = 40000
    dataset.PixelData = values.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _gzip_stream(head: bytes, fill, total: int, chunk: int = 1 << 22) -> bytes:
    """gzip of ``head`` followed by ``total`` bytes made by ``fill(offset, size)``, never all in memory."""
    import zlib

    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    parts = [compressor.compress(head)]
    for offset in range(0, total, chunk):
        parts.append(compressor.compress(fill(offset, min(chunk, total - offset))))
    parts.append(compressor.flush())
    return b"".join(parts)


def nifti_bomb(shape: tuple[int, int, int] = (16384, 16384, 1), dtype: str = "uint8") -> bytes:
    """A gzipped NIfTI-1 volume of ``shape`` (x, y, z) and ``dtype``: zeros with one bright block per slice, a
    few MB on the wire (16384 x 16384 x 1 uint8: about 0.3 MB; 512 x 512 x 1024 int16: about 2 MB)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.dtype(dtype))
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    header.set_xyzt_units("mm")
    head = header.binaryblock + b"\0" * 4
    item = np.dtype(dtype).itemsize
    plane = shape[0] * shape[1] * item
    bright = np.array([200], dtype=dtype).tobytes()

    def fill(offset: int, size: int) -> bytes:
        block = bytearray(size)
        start = -(-offset // plane) * plane + plane // 3  # a bright run a third into every plane
        for at in range(start, offset + size, plane):
            first = at - offset
            block[first:first + 64 * item] = bright * 64
        return bytes(block)

    return _gzip_stream(head, fill, plane * shape[2])


def multiframe_dicom_deflate_bomb(frames: int = 1024, side: int = 512) -> bytes:
    """A Deflated Explicit VR Little Endian multi-frame 16-bit MR DICOM (``frames`` x ``side``²; 1024 x 512²
    inflates to 512 MiB), written as a stream: the pixels are never all in memory."""
    import struct
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "MR"
    dataset.NumberOfFrames = frames
    dataset.Rows = dataset.Columns = side
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    pixel_bytes = frames * side * side * 2
    body.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    parts = [head.getvalue(), compressor.compress(body.getvalue())]
    frame = np.zeros((side, side), dtype=np.uint16)
    frame[side // 4: side // 2, side // 4: side // 2] = 40000
    for _ in range(frames):
        parts.append(compressor.compress(frame.tobytes()))
    parts.append(compressor.flush())
    return b"".join(parts)
