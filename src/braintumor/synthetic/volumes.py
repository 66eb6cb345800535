"""Synthetic MRI volumes for the demo and the tests, and writers for NIfTI, DICOM series and multi-frame DICOM.

A phantom volume stacks one phantom head (``phantom.make_phantom``, the same seed on every slice) scaled like
the cross-sections of an ellipsoid, so the head grows from the bottom slice to the middle and shrinks again;
the lesion of its class is present on the middle slices only (a third of them). Values stay in the phantom's
8-bit range (times a gain rising from 0.85 at the bottom to 1 at the top, so no slice is the mirror image of
another), stored as 16-bit integers: read back, they are used as they are, like the 2-D phantom slices a demo
model is trained on (``volumes`` windows only volumes outside 0..255).

Arrays handed to the writers are viewer-ordered ``(Z, rows, columns)``: slice 0 the most inferior, rows from
anterior to posterior, columns from the patient's right to left (what ``volumes.read_volume`` returns). The
NIfTI file stores them in LPS voxel order and the DICOM files list their slices out of order on purpose, so
reading them back exercises reorientation and sorting by position.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from braintumor.errors import UserError
from braintumor.utils.optional import require
from braintumor.synthetic.phantom import PHANTOM_CLASSES, check_label, make_phantom, removed_on_failure

LESION_SLICES = 1 / 3  # the middle third of the slices shows the lesion


def make_phantom_volume(label: str, size: int = 64, slices: int = 24, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A viewer-ordered int16 volume (slices, size, size) and a bool per slice: does it show the lesion."""
    check_label(label)
    if slices < 3:
        raise UserError(f"a phantom volume needs at least 3 slices, got {slices}")
    healthy = make_phantom("notumor", size, seed)
    sick = make_phantom(label, size, seed) if label != "notumor" else healthy
    volume = np.zeros((slices, size, size), np.int16)
    lesion = np.zeros(slices, bool)
    # Around a shrunken head: background noise drawn from the phantom's own background (its corners), so no
    # square edge shows where the smaller head was pasted.
    corner = max(2, size // 10)
    background = np.concatenate([healthy[:corner, :corner].ravel(), healthy[-corner:, -corner:].ravel()])
    rng = np.random.default_rng(seed)
    for z in range(slices):
        t = (z - (slices - 1) / 2) / ((slices - 1) / 2)  # -1 (bottom) .. 1 (top)
        shows_lesion = label != "notumor" and abs(t) <= LESION_SLICES + 1e-9
        scale = float(np.sqrt(1.0 - (0.8 * t) ** 2))
        side = max(8, round(size * scale))
        picture = Image.fromarray(sick if shows_lesion else healthy).resize((side, side), Image.BILINEAR)
        canvas = rng.choice(background, size=(size, size)).astype(np.uint8)
        offset = (size - side) // 2
        canvas[offset:offset + side, offset:offset + side] = np.asarray(picture)
        gain = 0.85 + 0.15 * z / (slices - 1)  # a coil's bias along z: no two slices are mirror images
        volume[z] = np.rint(canvas * gain).astype(np.int16)
        lesion[z] = shows_lesion
    return volume, lesion


def write_nifti(path: str | os.PathLike, volume: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Path:
    """Write a viewer-ordered volume as NIfTI, voxels in LPS order (x: right→left, y: anterior→posterior)."""
    nib = require("nibabel", "volumes", "writing NIfTI volumes")

    row_mm, col_mm, slice_mm = spacing
    data = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))  # (columns, rows, slices): L, P, S
    columns, rows, _ = data.shape
    affine = np.diag([-col_mm, -row_mm, slice_mm, 1.0])
    affine[:3, 3] = [col_mm * (columns - 1) / 2, row_mm * (rows - 1) / 2, 0.0]
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path = Path(path)
    nib.save(image, str(path))
    return path


def _dataset(path: Path, sop_class, *, rows: int, columns: int, series_uid: str, study_uid: str):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.PatientName, dataset.PatientID = "MR", "Phantom^Synthetic", "PHANTOM"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    return dataset


def write_dicom_series(folder: str | os.PathLike, volume: np.ndarray, spacing=(1.0, 1.0, 2.0), seed: int = 0,
                       slope: float = 1.0, intercept: float = 0.0) -> Path:
    """One axial DICOM file per slice in ``folder``; file names and instance numbers in shuffled order."""
    from pydicom.uid import MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row_mm, col_mm, slice_mm = spacing
    count, rows, columns = volume.shape
    series_uid, study_uid = generate_uid(), generate_uid()
    shuffled = np.random.default_rng(seed).permutation(count)
    for number, z in enumerate(shuffled):
        path = folder / f"IM{number:04d}.dcm"
        dataset = _dataset(path, MRImageStorage, rows=rows, columns=columns, series_uid=series_uid,
                           study_uid=study_uid)
        dataset.InstanceNumber = number + 1
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # rows → patient left, columns → posterior
        dataset.ImagePositionPatient = [-col_mm * (columns - 1) / 2, -row_mm * (rows - 1) / 2, float(z) * slice_mm]
        dataset.PixelSpacing = [row_mm, col_mm]
        dataset.SliceThickness = slice_mm
        dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
        stored = np.rint((volume[z].astype(np.float64) - intercept) / slope).astype(np.int16)
        dataset.PixelData = np.ascontiguousarray(stored).tobytes()
        dataset.save_as(path, enforce_file_format=True)
    return folder


def write_multiframe_dicom(path: str | os.PathLike, volume: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Path:
    """An Enhanced MR multi-frame file, frames stored top slice first, each with its Plane Position."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedMRImageStorage, generate_uid

    path = Path(path)
    row_mm, col_mm, slice_mm = spacing
    count, rows, columns = volume.shape
    dataset = _dataset(path, EnhancedMRImageStorage, rows=rows, columns=columns, series_uid=generate_uid(),
                       study_uid=generate_uid())
    dataset.NumberOfFrames = count
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [row_mm, col_mm], slice_mm
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, 0, "US"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    dataset.SharedFunctionalGroupsSequence = Sequence([shared])
    order = list(range(count))[::-1]
    frames = []
    for z in order:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [-col_mm * (columns - 1) / 2, -row_mm * (rows - 1) / 2, float(z) * slice_mm]
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
    dataset.PerFrameFunctionalGroupsSequence = Sequence(frames)
    dataset.PixelData = np.ascontiguousarray(volume[order].astype(np.int16)).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_phantom_volumes(out_dir: str | os.PathLike, per_class: int = 1, size: int = 64, slices: int = 24,
                          seed: int = 0, classes=PHANTOM_CLASSES) -> list[Path]:
    """Per class and index: ``<class>_<i>.nii.gz``, ``<class>_<i>_series/`` and ``<class>_<i>_multiframe.dcm``."""
    out = Path(out_dir)
    written = []
    for name in classes:
        check_label(name)
    try:
        with removed_on_failure(out):
            out.mkdir(parents=True, exist_ok=True)
            for class_index, name in enumerate(classes):
                for i in range(per_class):
                    volume, _ = make_phantom_volume(name, size, slices, seed=seed * 1_000 + class_index * 100 + i)
                    stem = f"{name}_{i:03d}"
                    written.append(write_nifti(out / f"{stem}.nii.gz", volume))
                    written.append(write_dicom_series(out / f"{stem}_series", volume, seed=i))
                    written.append(write_multiframe_dicom(out / f"{stem}_multiframe.dcm", volume))
    except OSError as exc:
        raise UserError(f"cannot write phantom volumes to {out}: {exc.strerror or exc}") from None
    return written
