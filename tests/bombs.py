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
