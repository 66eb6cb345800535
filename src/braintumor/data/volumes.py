"""MRI volumes (NIfTI, multi-frame DICOM, a folder holding one DICOM series) as axial 8-bit slices.

The model was trained on 2-D slices, so a volume is cut into axial slices and each is classified on its own:

1. **Read.** NIfTI (``.nii``, ``.nii.gz``) with nibabel, scaled by its ``scl_slope``/``scl_inter``. DICOM with
   pydicom: every frame or file through ``apply_modality_lut``; a series folder is sorted by the slices'
   position along their normal (Image Position Patient · the cross product of Image Orientation Patient), never
   by file name; a multi-frame file by its per-frame Plane Position. Every source becomes a nibabel image with
   its affine (DICOM's LPS turned into NIfTI's RAS).
2. **Orient.** ``nibabel.as_closest_canonical`` reorients to RAS+, so the third axis runs inferior → superior
   and slices along it are axial whatever the acquisition (a sagittal series is resliced to its closest axial
   axis; no interpolation, so an oblique acquisition keeps its tilt). Each slice is shown like a DICOM viewer
   shows it: anterior at the top, the patient's right on the image's left. Non-square in-plane voxels are
   resampled to square pixels.
3. **Normalise per volume.** A volume whose values are all whole numbers in 0..255 (an 8-bit volume, e.g. a
   stack of exported slices) is used as it is, as 8-bit slices are. Any other volume is windowed linearly
   between its 0.5th and 99.5th percentiles (over the whole volume, so slices keep their relative brightness)
   to 0..255; values outside saturate, so a few very bright voxels (vessels, fat, artefacts) cannot darken it.

A multi-frame DICOM without per-frame positions keeps its frames in stored order and is assumed axial.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from braintumor.errors import UserError
from braintumor.utils.optional import require
from braintumor.data.dicom import has_dicom_magic, missing_decoder_reason

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
MAX_VOXELS = 2**28  # 256 Mi voxels (1 GiB as float32): far above any clinical MRI volume


@dataclass
class Volume:
    """Axial slices of one volume, windowed to 0..255, inferior → superior."""

    source: str
    kind: str  # "nifti", "dicom-multiframe" or "dicom-series"
    slices: np.ndarray  # uint8 (Z, H, W): anterior at the top, patient's right on the left
    spacing: tuple[float, float, float]  # mm: row, column, between slices (after resampling in-plane)
    window: tuple[float, float]  # the voxel values mapped to 0 and 255

    def images(self) -> list[Image.Image]:
        """Every slice as an RGB PIL image, ready for ``Classifier.predict``."""
        return [Image.fromarray(s, mode="L").convert("RGB") for s in self.slices]

    @property
    def stem(self) -> str:
        """A file-name stem: the file name without .nii/.nii.gz/.dcm, or the series folder's name."""
        name = Path(self.source).name
        for suffix in (".nii.gz", ".nii", ".dcm"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)] or "volume"
        return name or "volume"


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _dicom_header(path: Path):
    """The dataset without pixel data, or None when the file is not DICOM."""
    import pydicom

    try:
        with path.open("rb") as handle:
            if not has_dicom_magic(handle.read(132)) and path.suffix.lower() != ".dcm":
                return None
        return pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() == ".dcm")
    except Exception:  # noqa: BLE001 - anything unreadable is "not a DICOM volume"; data/io.py reports it
        return None


def _series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def is_volume(path: str | os.PathLike) -> bool:
    """A NIfTI file, a multi-frame DICOM, or a folder whose files are all DICOM slices of one series."""
    path = Path(path)
    if path.is_file():
        if is_nifti(path):
            return True
        header = _dicom_header(path)
        return header is not None and int(header.get("NumberOfFrames", 1) or 1) > 1
    if not path.is_dir():
        return False
    files = _series_files(path)
    if len(files) < 2 or any(p.is_dir() for p in path.iterdir() if not p.name.startswith(".")):
        return False
    series = set()
    for file in files:
        header = _dicom_header(file)
        if header is None or "ImagePositionPatient" not in header:
            return False
        series.add(str(header.get("SeriesInstanceUID", "")))
    return len(series) == 1


def partition_inputs(paths) -> tuple[list[Path], list[Path]]:
    """Split command-line paths into 2-D image files (folders expanded) and volumes, each in input order.

    Inside folders (walked recursively, sorted, hidden entries skipped), a sub-folder that :func:`is_volume`
    calls a DICOM series is one volume; NIfTI files and multi-frame DICOMs are volumes; the rest are images.
    """
    from braintumor.data.io import IMAGE_EXTENSIONS
    from braintumor.inference.classifier import expand_inputs

    images: list[Path] = []
    volumes: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if is_volume(path):
            volumes.append(path)
        elif not path.is_dir():
            images.extend(expand_inputs([path]))
        else:
            found = 0
            for folder, subfolders, files in os.walk(path):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                kept = []
                for name in subfolders:
                    if is_volume(Path(folder) / name):
                        volumes.append(Path(folder) / name)
                        found += 1
                    else:
                        kept.append(name)
                subfolders[:] = kept
                for name in sorted(f for f in files if not f.startswith(".")):
                    file = Path(folder) / name
                    if is_nifti(file) or (file.suffix.lower() == ".dcm" and is_volume(file)):
                        volumes.append(file)
                    elif file.suffix.lower() in IMAGE_EXTENSIONS:
                        images.append(file)
                    else:
                        continue
                    found += 1
            if not found:
                raise UserError(f"no images or volumes found in folder {path}")
    return images, volumes


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file, a multi-frame DICOM or a DICOM series folder as windowed axial slices."""
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")

    path = Path(path)
    if not path.exists():
        raise UserError(f"file or folder not found: {path}")
    if path.is_dir():
        image, kind = _read_dicom_series(path), "dicom-series"
    elif is_nifti(path):
        image, kind = _read_nifti(path), "nifti"
    else:
        image, kind = _read_multiframe(path), "dicom-multiframe"
    return _to_volume(image, str(path), kind)


def read_volume_bytes(data: bytes, name: str) -> Volume | None:
    """An uploaded NIfTI (``.nii``/``.nii.gz`` name or NIfTI header) or multi-frame DICOM as a Volume, else None.

    None means "not a volume": the caller reads the bytes as a 2-D image. Gzip streams are inflated only up to
    the voxel limit, so a small upload cannot expand without bound.
    """
    import gzip
    import zlib

    raw = data
    if data[:2] == b"\x1f\x8b":
        inflater = zlib.decompressobj(wbits=31)
        limit = MAX_VOXELS * 8 + 2**20
        try:
            raw = inflater.decompress(data, limit)
        except (zlib.error, gzip.BadGzipFile) as error:
            raise UserError(f"cannot read volume {name}: corrupt gzip data ({error})") from None
        if inflater.unconsumed_tail:
            raise UserError(f"cannot read volume {name}: more than {MAX_VOXELS} voxels once decompressed")
    if is_nifti(name) or raw[344:348] in (b"n+1\0", b"ni1\0") or raw[4:8] == b"n+2\0":
        return _to_volume(_nifti_from_bytes(raw, name), name, "nifti")
    if has_dicom_magic(data[:132]):
        import pydicom

        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not our concern here: the 2-D reader gives the message
            return None
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            return _to_volume(_multiframe_image(pydicom.dcmread(io.BytesIO(data)), name), name, "dicom-multiframe")
    return None


def _to_volume(image, source: str, kind: str) -> Volume:
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")

    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    # RAS+ array (x: left→right, y: posterior→anterior, z: inferior→superior) to viewer slices (Z, rows, cols):
    # rows anterior→posterior, columns the patient's right→left.
    slices = np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))
    windowed, window = window_volume(slices)
    windowed, spacing = _square_pixels(windowed, row_mm=zooms[1], col_mm=zooms[0])
    return Volume(source=source, kind=kind, slices=windowed, spacing=(*spacing, zooms[2]), window=window)


def window_volume(values: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """8-bit volumes as they are; others windowed between their 0.5th and 99.5th percentiles to uint8."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8), (0.0, 0.0)
    if finite.size == values.size and finite.min() >= 0 and finite.max() <= 255 and np.all(finite == np.rint(finite)):
        return values.astype(np.uint8), (0.0, 255.0)
    low, high = (float(v) for v in np.percentile(finite, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if not high > low:
        low, high = float(finite.min()), float(finite.max())
    if not high > low:
        return np.zeros(values.shape, np.uint8), (low, high)
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), (low, high)


def _square_pixels(slices: np.ndarray, *, row_mm: float, col_mm: float):
    """Resample in-plane to square pixels at the finer spacing when rows and columns differ by over 1 %."""
    if row_mm <= 0 or col_mm <= 0 or abs(row_mm - col_mm) <= 0.01 * min(row_mm, col_mm):
        return slices, (row_mm, col_mm)
    fine = min(row_mm, col_mm)
    height = max(1, round(slices.shape[1] * row_mm / fine))
    width = max(1, round(slices.shape[2] * col_mm / fine))
    resized = [np.asarray(Image.fromarray(s, mode="L").resize((width, height), Image.BILINEAR)) for s in slices]
    return np.stack(resized), (fine, fine)


def _check_size(shape, label: str) -> None:
    voxels = int(np.prod([int(s) for s in shape]))
    if voxels > MAX_VOXELS:
        raise UserError(f"cannot read volume {label}: {voxels} voxels exceeds the limit of {MAX_VOXELS}")


# --- NIfTI ------------------------------------------------------------------------------------------------


def _nifti_from_bytes(raw: bytes, name: str):
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")

    try:
        image = (nib.Nifti2Image if raw[4:8] == b"n+2\0" else nib.Nifti1Image).from_bytes(raw)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"cannot read volume {name}: not a readable NIfTI file ({' '.join(str(error).split())})") \
            from None
    return _nifti_3d(image, name)


def _read_nifti(path: Path):
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")

    try:
        image = nib.load(str(path))
    except Exception as error:  # noqa: BLE001 - nibabel raises ImageFileError, OSError, EOFError, gzip errors
        raise UserError(f"cannot read volume {path}: not a readable NIfTI file ({' '.join(str(error).split())})") \
            from None
    return _nifti_3d(image, str(path))


def _nifti_3d(image, path: str):
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")

    try:
        shape = image.shape
    except Exception as error:  # noqa: BLE001
        raise UserError(f"cannot read volume {path}: not a readable NIfTI file ({' '.join(str(error).split())})") \
            from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise UserError(f"cannot read volume {path}: {len(image.shape)}-D NIfTI {image.shape}; give one 3-D volume")
    _check_size(shape, path)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as error:  # noqa: BLE001 - truncated gzip streams, short files
        raise UserError(f"cannot read volume {path}: truncated or corrupt NIfTI data "
                        f"({' '.join(str(error).split())})") from None
    return nib.Nifti1Image(data, image.affine)


# --- DICOM ------------------------------------------------------------------------------------------------

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _affine(row_cosine, column_cosine, pixel_spacing, first_position, slice_step) -> np.ndarray:
    """RAS affine of an array indexed (column, row, slice) from DICOM's LPS geometry (PS3.3 C.7.6.2.1.1)."""
    row_spacing, column_spacing = (float(v) for v in pixel_spacing)
    lps = np.column_stack([np.asarray(row_cosine, float) * column_spacing,
                           np.asarray(column_cosine, float) * row_spacing,
                           np.asarray(slice_step, float), np.asarray(first_position, float)])
    affine = np.eye(4)
    affine[:3, :] = _LPS_TO_RAS @ lps
    return affine


def _slice_order(positions: np.ndarray, orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices sorting slices along the normal, and the mean step between neighbours (a 3-vector)."""
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort(positions @ normal, kind="stable")
    ordered = positions[order]
    distances = np.diff(ordered @ normal)
    if len(ordered) > 1 and np.any(np.abs(distances) < 1e-4):
        raise ValueError("two slices share one position (several echoes or series in one place?)")
    step = (ordered[-1] - ordered[0]) / (len(ordered) - 1) if len(ordered) > 1 else normal
    return order, step


def _read_pixels(dataset, label: str) -> np.ndarray:
    reason = missing_decoder_reason(dataset)
    if reason:
        raise UserError(f"cannot read volume {label}: {reason}")
    try:
        return dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - short pixel data, bad attributes
        raise UserError(f"cannot read volume {label}: cannot decode DICOM pixel data "
                        f"({' '.join(str(error).split())})") from None


def _check_grayscale(dataset, label: str) -> None:
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise UserError(f"cannot read volume {label}: colour DICOM volumes are not supported (grayscale MR only)")


def _read_dicom_series(folder: Path):
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")
    import pydicom
    from pydicom.pixels import apply_modality_lut

    files = _series_files(folder)
    headers = [(_dicom_header(f), f) for f in files]
    bad = [f.name for h, f in headers if h is None]
    if bad or not headers:
        raise UserError(f"cannot read volume {folder}: not a DICOM series folder ({len(bad)} non-DICOM file(s), "
                        f"e.g. {bad[0] if bad else 'none'})")
    series = {str(h.get("SeriesInstanceUID", "")) for h, _ in headers}
    if len(series) > 1:
        raise UserError(f"cannot read volume {folder}: the folder holds {len(series)} series; give one series "
                        "per folder")
    try:
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h, _ in headers])
        orientation = np.array([float(v) for v in headers[0][0].ImageOrientationPatient])
        spacing = [float(v) for v in headers[0][0].PixelSpacing]
        order, step = _slice_order(positions, orientation)
    except (AttributeError, TypeError, ValueError) as error:
        raise UserError(f"cannot read volume {folder}: slice geometry missing or inconsistent ({error})") from None
    shape = (int(headers[0][0].Rows), int(headers[0][0].Columns))
    _check_size((*shape, len(files)), str(folder))
    frames = []
    for index in order:
        file = headers[index][1]
        dataset = pydicom.dcmread(file, force=True)
        _check_grayscale(dataset, str(file))
        pixels = _read_pixels(dataset, str(file))
        if pixels.shape != shape:
            raise UserError(f"cannot read volume {folder}: {file.name} is {pixels.shape[1]}x{pixels.shape[0]}, "
                            f"the series {shape[1]}x{shape[0]}")
        frames.append(np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32))
    data = np.stack(frames, axis=-1).transpose(1, 0, 2)  # (columns, rows, slices)
    affine = _affine(orientation[:3], orientation[3:], spacing, positions[order[0]], step)
    return nib.Nifti1Image(data, affine)


def _frame_item(dataset, index: int, sequence: str):
    """The per-frame item of a functional group (falling back to the shared one), or None."""
    for group, pick in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = dataset.get(group)
        if groups and len(groups) > pick and sequence in groups[pick] and groups[pick][sequence].value:
            return groups[pick][sequence][0]
    return None


def _read_multiframe(path: Path):
    import pydicom

    try:
        dataset = pydicom.dcmread(path, force=path.suffix.lower() == ".dcm")
    except Exception as error:  # noqa: BLE001
        raise UserError(f"cannot read volume {path}: not a readable DICOM file ({error})") from None
    return _multiframe_image(dataset, str(path))


def _multiframe_image(dataset, label: str):
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")
    from pydicom.pixels import apply_modality_lut

    path = label
    _check_grayscale(dataset, label)
    frames_count = int(dataset.get("NumberOfFrames", 1) or 1)
    _check_size((frames_count, int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))), label)
    pixels = _read_pixels(dataset, label).reshape(frames_count, int(dataset.Rows), int(dataset.Columns))
    frames = []
    for index in range(frames_count):
        transform = _frame_item(dataset, index, "PixelValueTransformationSequence")
        frames.append(np.asarray(apply_modality_lut(pixels[index], transform if transform is not None
                                                    else dataset), dtype=np.float32))
    try:
        positions = np.array([[float(v) for v in _frame_item(dataset, i, "PlanePositionSequence")
                               .ImagePositionPatient] for i in range(frames_count)])
        orientation_item = _frame_item(dataset, 0, "PlaneOrientationSequence")
        orientation = np.array([float(v) for v in orientation_item.ImageOrientationPatient])
        measures = _frame_item(dataset, 0, "PixelMeasuresSequence")
        spacing = [float(v) for v in (measures.PixelSpacing if measures is not None else dataset.PixelSpacing)]
        order, step = _slice_order(positions, orientation)
        first = positions[order[0]]
    except (AttributeError, TypeError, ValueError):
        log.warning("%s: no per-frame positions; frames kept in stored order and assumed axial", path)
        orientation = np.array([1.0, 0, 0, 0, 1, 0])
        spacing = [float(v) for v in dataset.get("PixelSpacing", [1.0, 1.0])]
        thickness = float(dataset.get("SpacingBetweenSlices", dataset.get("SliceThickness", 1.0)) or 1.0)
        order, step, first = np.arange(frames_count), np.array([0, 0, thickness]), np.zeros(3)
    data = np.stack([frames[i] for i in order], axis=-1).transpose(1, 0, 2)
    return nib.Nifti1Image(data, _affine(orientation[:3], orientation[3:], spacing, first, step))
