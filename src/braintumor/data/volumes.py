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

**Memory.** A volume is never held in floating point: its voxels are read in blocks of rows (NIfTI through a
stream, gzip included; DICOM frame by frame with ``pydicom.pixels.iter_pixels``; a deflated DICOM is inflated to
disk first), each block's modality rescale is applied in float32 and the block is spooled to an anonymous
temporary file. The window's percentiles are exact order statistics found by histogram passes over the spool
(:func:`volume_percentiles`); a second pass windows block by block to uint8. Planes with a side longer than
:data:`MAX_SIDE`, or volumes with more than :data:`MAX_STORED_VOXELS` voxels, are box-reduced in-plane by an
integer factor while they are windowed, so what stays in memory is at most :data:`MAX_STORED_VOXELS` bytes.
Volumes with more than :data:`MAX_VOXELS` voxels, in-plane voxel sizes more than :data:`MAX_ANISOTROPY`-fold
apart, or no finite voxel at all are refused with one line.

**Non-finite voxels** (NaN, ±inf) never enter the window; after it NaN and -inf become 0 and +inf 255, and
:attr:`Volume.nonfinite` counts them per slice, so that a surface can flag those slices (they are not MRI
signal: the status layer calls such slices ``not_mri``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from braintumor.errors import UserError
from braintumor.utils.optional import require
from braintumor.data.dicom import has_dicom_magic, inflate_to_temporary, missing_decoder_reason, read_header
from braintumor.data.pixels import ImageReadError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
MAX_VOXELS = 2**28  # 256 Mi voxels read (spooled to disk as float32: 1 GiB): far above any clinical MRI volume
MAX_STORED_VOXELS = 2**26  # voxels kept (uint8, 64 MiB); larger volumes are box-reduced in-plane while windowed
MAX_SIDE = 1024  # longer planes are box-reduced in-plane (the model sees 224 px or so)
MAX_ANISOTROPY = 16.0  # in-plane voxel sizes further apart than this are refused (not an MRI slice geometry)
_BLOCK_VOXELS = 1 << 20  # voxels per block read, windowed or histogrammed at once (4 MiB as float32)
_GATHER_VOXELS = 1 << 22  # candidates for a percentile collected and sorted in memory at most
_HISTOGRAM_BINS = 1 << 16


@dataclass
class Volume:
    """Axial slices of one volume, windowed to 0..255, inferior → superior."""

    source: str
    kind: str  # "nifti", "dicom-multiframe" or "dicom-series"
    slices: np.ndarray  # uint8 (Z, H, W): anterior at the top, patient's right on the left
    spacing: tuple[float, float, float]  # mm: row, column, between slices (after resampling in-plane)
    window: tuple[float, float]  # the voxel values mapped to 0 and 255
    nonfinite: np.ndarray | None = None  # int64 (Z,): NaN/inf voxels per slice (before any in-plane reduction)
    reduced_by: int = 1  # the in-plane box-reduction factor applied while reading (1: full resolution)

    def __post_init__(self):
        if self.nonfinite is None:
            self.nonfinite = np.zeros(len(self.slices), dtype=np.int64)

    def images(self) -> "SliceImages":
        """Every slice as an RGB PIL image, ready for ``Classifier.predict``: a sequence that makes each image
        when it is indexed (a list of all of them would hold the volume three times over in RGB)."""
        return SliceImages(self.slices)

    @property
    def stem(self) -> str:
        """A file-name stem: the file name without .nii/.nii.gz/.dcm, or the series folder's name."""
        name = Path(self.source).name
        for suffix in (".nii.gz", ".nii", ".dcm"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)] or "volume"
        return name or "volume"


class SliceImages(Sequence):
    """The slices of a volume as RGB PIL images, made on access (indexing and slicing as a list)."""

    def __init__(self, slices: np.ndarray):
        self._slices = slices

    def __len__(self) -> int:
        return len(self._slices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return Image.fromarray(np.ascontiguousarray(self._slices[index]), mode="L").convert("RGB")


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _dicom_header(path: Path):
    """The dataset without pixel data, or None when the file is not DICOM (or not one this tool can read: a
    deflated file over the inflate limit is refused by the 2-D reader, before anything inflates it)."""
    try:
        with path.open("rb") as handle:
            if not has_dicom_magic(handle.read(132)) and path.suffix.lower() != ".dcm":
                return None
        return read_header(path, str(path), force=path.suffix.lower() == ".dcm")
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
    from braintumor.data.inputs import expand_inputs, find_files
    from braintumor.data.io import IMAGE_EXTENSIONS

    def volume_file(file: Path) -> bool:
        return is_nifti(file) or (file.suffix.lower() == ".dcm" and is_volume(file))

    def wanted(file: Path) -> bool:
        return file.suffix.lower() in IMAGE_EXTENSIONS or is_nifti(file)

    images: list[Path] = []
    volumes: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if is_volume(path):
            volumes.append(path)
        elif not path.is_dir():
            images.extend(expand_inputs([path]))
        else:
            found = find_files(path, include=wanted, as_unit=is_volume)
            if not found:
                raise UserError(f"no images or volumes found in folder {path}")
            for file in found:
                (volumes if file.is_dir() or volume_file(file) else images).append(file)
    return images, volumes


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file, a multi-frame DICOM or a DICOM series folder as windowed axial slices."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file or folder not found: {path}")
    if path.is_dir():
        return _to_volume(_dicom_series_source(path), str(path), "dicom-series")
    if is_nifti(path):
        return _to_volume(_nifti_source(path, str(path)), str(path), "nifti")
    return _to_volume(_multiframe_source(path, str(path)), str(path), "dicom-multiframe")


def read_volume_bytes(data: bytes, name: str) -> Volume | None:
    """An uploaded NIfTI (``.nii``/``.nii.gz`` name or NIfTI header) or multi-frame DICOM as a Volume, else None.

    None means "not a volume": the caller reads the bytes as a 2-D image. A NIfTI upload is written to a
    temporary file and streamed from there like a file (gzip included), so a small upload that inflates to a
    large one is never inflated in memory; only the voxels its header declares are read.
    """
    import zlib

    head = data[:352]
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(wbits=31).decompress(data[:1 << 16], 352)
        except zlib.error as error:
            raise UserError(f"cannot read volume {name}: corrupt gzip data ({error})") from None
    if is_nifti(name) or head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] == b"n+2\0":
        with tempfile.TemporaryDirectory(prefix="braintumor-upload-") as folder:
            path = Path(folder) / ("upload.nii.gz" if data[:2] == b"\x1f\x8b" else "upload.nii")
            path.write_bytes(data)
            return _to_volume(_nifti_source(path, name), name, "nifti")
    if has_dicom_magic(data[:132]):
        try:
            header = read_header(io.BytesIO(data), name)
        except ImageReadError as error:
            raise UserError(str(error)) from None
        except Exception:  # noqa: BLE001 - not our concern here: the 2-D reader gives the message
            return None
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            return _to_volume(_multiframe_source(io.BytesIO(data), name), name, "dicom-multiframe")
    return None


# --- from blocks of voxels to windowed slices ---------------------------------------------------------------


@dataclass
class _Source:
    """A volume as its reader streams it: planes of ``rows`` x ``columns`` voxels, ``count`` of them.

    ``blocks()`` yields ``(stored plane index, first row, float32 (rows in block, columns))`` covering every
    voxel once, planes in stored order; ``order`` lists the stored planes in slice order (the order of the
    affine's third axis), and ``affine`` maps (column, row, plane) voxel indices to RAS millimetres.
    """

    label: str
    columns: int
    rows: int
    count: int
    affine: np.ndarray
    order: np.ndarray
    blocks: object  # () -> Iterator[tuple[int, int, np.ndarray]]


def _block_rows(columns: int, multiple: int = 1) -> int:
    """Rows per block: about _BLOCK_VOXELS voxels, a multiple of ``multiple`` (the in-plane reduction)."""
    rows = max(1, _BLOCK_VOXELS // max(1, columns))
    return max(multiple, rows // multiple * multiple)


class _Spool:
    """Float32 planes in an anonymous temporary file (read back with plain reads, so no page of it counts
    towards this process's memory), with the statistics the window needs gathered while writing."""

    def __init__(self, source: _Source):
        self.source = source
        self.file = tempfile.TemporaryFile(prefix="braintumor-volume-")
        self.finite = 0
        self.low, self.high = math.inf, -math.inf
        self.eight_bit = True  # every voxel a whole number in 0..255
        self.nonfinite = [np.zeros(n, np.int64) for n in (source.columns, source.rows, source.count)]
        written = 0
        with np.errstate(invalid="ignore", over="ignore"):
            for plane, row, block in source.blocks():
                expected = (plane * source.rows + row) * source.columns
                if expected != written:
                    raise RuntimeError(f"volume blocks out of order at plane {plane}, row {row}")
                block = np.ascontiguousarray(block, dtype=np.float32)
                finite = np.isfinite(block)
                bad = ~finite
                if bad.any():
                    self.nonfinite[0] += bad.sum(axis=0)
                    self.nonfinite[1][row:row + block.shape[0]] += bad.sum(axis=1)
                    self.nonfinite[2][plane] += int(bad.sum())
                    values = block[finite]
                    self.eight_bit = False
                else:
                    values = block.reshape(-1)
                if values.size:
                    self.finite += int(values.size)
                    low, high = float(values.min()), float(values.max())
                    self.low, self.high = min(self.low, low), max(self.high, high)
                    if self.eight_bit and (low < 0 or high > 255 or not np.array_equal(values, np.rint(values))):
                        self.eight_bit = False
                self.file.write(block.tobytes())
                written += block.size
        if written != source.columns * source.rows * source.count:
            raise UserError(f"cannot read volume {source.label}: truncated voxel data")

    def read(self, plane: int, row: int, rows: int) -> np.ndarray:
        columns = self.source.columns
        self.file.seek((plane * self.source.rows + row) * columns * 4)
        data = self.file.read(rows * columns * 4)
        return np.frombuffer(data, dtype=np.float32).reshape(rows, columns)

    def chunks(self) -> Iterator[np.ndarray]:
        """Every finite voxel, block by block, in stored order."""
        step = _block_rows(self.source.columns)
        for plane in range(self.source.count):
            for row in range(0, self.source.rows, step):
                block = self.read(plane, row, min(step, self.source.rows - row))
                yield block[np.isfinite(block)]

    def close(self) -> None:
        self.file.close()


def _bin_index(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The histogram bin of each value over [low, high] (float32 arithmetic: monotonic in the value, and the
    same formula decides membership at every later pass, so the bins are consistent)."""
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.floor((values - low) * (_HISTOGRAM_BINS / (high - low)))
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0, _HISTOGRAM_BINS - 1).astype(np.int64)


def _order_statistics(chunks, count: int, low: float, high: float, ranks: list[int]) -> dict[int, float]:
    """The ``ranks``-th smallest (0-based) of ``count`` finite values that ``chunks()`` yields (in [low, high]),
    exactly, in a few passes: each pass histograms a rank's candidates and narrows them to one bin; candidates
    that are few enough are sorted, and candidates that are all equal are the answer."""
    found: dict[int, float] = {}
    # Per rank: the nested bins (low, high, index) a candidate falls in, its rank among them, their count, and
    # the range to histogram next.
    state = {rank: ([], rank, count, low, high) for rank in ranks}
    while len(found) < len(ranks):
        pending = {rank: st for rank, st in state.items() if rank not in found}
        histograms = {rank: np.zeros(_HISTOGRAM_BINS, np.int64) for rank in pending}
        gathered: dict[int, list[np.ndarray]] = {rank: [] for rank in pending}
        extremes = {rank: [math.inf, -math.inf] for rank in pending}
        for values in chunks():
            values = np.asarray(values, dtype=np.float32)
            # Ranks whose candidates lie in the same nested bins (all of them in the first pass, the two ranks
            # around one percentile after it) share the filtering and the histogram of each chunk.
            filtered: dict[tuple, np.ndarray] = {}
            binned: dict[tuple, np.ndarray] = {}
            for rank, (levels, _, candidates, lo, hi) in pending.items():
                key = tuple(levels)
                if key not in filtered:
                    inside = values
                    for level_low, level_high, index in levels:
                        inside = inside[_bin_index(inside, level_low, level_high) == index]
                    filtered[key] = inside
                inside = filtered[key]
                if not inside.size:
                    continue
                extremes[rank][0] = min(extremes[rank][0], float(inside.min()))
                extremes[rank][1] = max(extremes[rank][1], float(inside.max()))
                if candidates <= _GATHER_VOXELS:
                    gathered[rank].append(inside)
                elif hi > lo:
                    if (key, lo, hi) not in binned:
                        binned[key, lo, hi] = np.bincount(_bin_index(inside, lo, hi), minlength=_HISTOGRAM_BINS)
                    histograms[rank] += binned[key, lo, hi]
        for rank, (levels, within, candidates, lo, hi) in pending.items():
            smallest, largest = extremes[rank]
            if smallest == largest:
                found[rank] = smallest  # every candidate is one value
            elif candidates <= _GATHER_VOXELS:
                found[rank] = float(np.sort(np.concatenate(gathered[rank]))[within])
            elif not hi > lo:
                state[rank] = (levels, within, candidates, smallest, largest)
            else:
                cumulative = np.cumsum(histograms[rank])
                index = int(np.searchsorted(cumulative, within, side="right"))
                before = int(cumulative[index - 1]) if index else 0
                width = (hi - lo) / _HISTOGRAM_BINS
                state[rank] = (levels + [(lo, hi, index)], within - before, int(histograms[rank][index]),
                               max(smallest, lo + index * width), min(largest, lo + (index + 1) * width))
    return found


def volume_percentiles(chunks, count: int, low: float, high: float,
                       percentiles=(LOW_PERCENTILE, HIGH_PERCENTILE)) -> list[float]:
    """``numpy.percentile`` (linear method, same arithmetic) of ``count`` finite float32 values streamed by
    ``chunks()``: in memory up to _GATHER_VOXELS values, else from exact order statistics."""
    if count <= _GATHER_VOXELS:
        values = np.concatenate([np.asarray(c, np.float32) for c in chunks()] or [np.zeros(0, np.float32)])
        return [float(v) for v in np.percentile(values, percentiles)]
    # numpy's linear method operation for operation: q = percentile / 100, then the virtual index (n - 1) * q.
    positions = [(count - 1) * (q / 100.0) for q in percentiles]
    ranks = sorted({r for h in positions for r in (math.floor(h), min(count - 1, math.floor(h) + 1))})
    stats = _order_statistics(chunks, count, low, high, ranks)
    result = []
    for h in positions:
        k = math.floor(h)
        below, above = np.float32(stats[k]), np.float32(stats[min(count - 1, k + 1)])
        t = h - k
        difference = float(above - below)  # numpy subtracts in the input's precision, then lerps in float64
        result.append(float(below) + difference * t if t < 0.5 else float(above) - difference * (1 - t))
    return result


def _reduction(columns: int, rows: int, count: int) -> int:
    """The in-plane box-reduction factor that keeps planes within MAX_SIDE and the volume within
    MAX_STORED_VOXELS (1: none)."""
    factor = max(1, -(-max(columns, rows) // MAX_SIDE))
    while -(-columns // factor) * -(-rows // factor) * count > MAX_STORED_VOXELS and factor < max(columns, rows):
        factor += 1
    return factor


def _box_reduce(block: np.ndarray, factor: int) -> np.ndarray:
    """Mean of every ``factor`` x ``factor`` box of a uint8 block (partial boxes at the edges averaged too)."""
    if factor == 1:
        return block
    row_starts, column_starts = np.arange(0, block.shape[0], factor), np.arange(0, block.shape[1], factor)
    sums = np.add.reduceat(np.add.reduceat(block.astype(np.float32), row_starts, axis=0), column_starts, axis=1)
    row_counts = np.diff(np.append(row_starts, block.shape[0])).astype(np.float32)
    column_counts = np.diff(np.append(column_starts, block.shape[1])).astype(np.float32)
    return np.rint(sums / row_counts[:, None] / column_counts[None, :]).astype(np.uint8)


def _window_block(block: np.ndarray, window: tuple[float, float] | None, finite: bool = False) -> np.ndarray:
    """A float32 block to uint8: as it is for 8-bit volumes (``window`` None), else linearly in float32 between
    the window's ends; NaN and -inf give 0, +inf 255. ``finite``: the caller knows the block holds no NaN or
    infinity (then only an overflow can give ±inf, which the clip maps as above, and the NaN pass is skipped)."""
    with np.errstate(invalid="ignore", over="ignore"):
        if window is None:
            return (block if finite else np.nan_to_num(block, nan=0.0, posinf=255.0, neginf=0.0)).astype(np.uint8)
        low, high = window
        if not high > low:
            return np.zeros(block.shape, np.uint8)
        scaled = (block - np.float32(low)) * np.float32(255.0 / (high - low))
        if not finite:
            scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def window_volume(values: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """8-bit volumes as they are; others windowed between their 0.5th and 99.5th percentiles to uint8.

    The in-memory form of what :func:`read_volume` does block by block (same percentiles, same arithmetic).
    """
    values = np.asarray(values, dtype=np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8), (0.0, 0.0)
    low, high = float(finite.min()), float(finite.max())
    if finite.size == values.size and low >= 0 and high <= 255 and np.array_equal(finite, np.rint(finite)):
        return values.astype(np.uint8), (0.0, 255.0)
    window = _window_of(lambda: iter([finite]), finite.size, low, high)
    return _window_block(values, window), window


def _window_of(chunks, count: int, low: float, high: float) -> tuple[float, float]:
    window_low, window_high = volume_percentiles(chunks, count, low, high)
    if not window_high > window_low:
        window_low, window_high = low, high
    return window_low, window_high


def _reduced_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """The affine of a volume whose first two axes were box-reduced by ``factor`` (box centres)."""
    reduced = np.array(affine, dtype=np.float64)
    reduced[:3, 3] += (factor - 1) / 2.0 * (reduced[:3, 0] + reduced[:3, 1])
    reduced[:3, :2] *= factor
    return reduced


def _to_volume(source: _Source, label: str, kind: str) -> Volume:
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")

    _check_size((source.columns, source.rows, source.count), label)
    spool = _Spool(source)
    try:
        if spool.finite == 0:
            raise UserError(f"cannot read volume {label}: no finite voxel values (every voxel is NaN or infinite)")
        if spool.eight_bit:
            window, shown = None, (0.0, 255.0)
        else:
            window = _window_of(spool.chunks, spool.finite, spool.low, spool.high)
            shown = window
        factor = _reduction(source.columns, source.rows, source.count)
        rows_out, columns_out = -(-source.rows // factor), -(-source.columns // factor)
        stored = np.empty((source.count, rows_out, columns_out), np.uint8)  # (slice order, row, column)
        step = _block_rows(source.columns, factor)
        for out_plane, plane in enumerate(source.order):
            finite = spool.nonfinite[2][plane] == 0
            for row in range(0, source.rows, step):
                block = spool.read(int(plane), row, min(step, source.rows - row))
                stored[out_plane, row // factor: row // factor + -(-block.shape[0] // factor)] = \
                    _box_reduce(_window_block(block, window, finite), factor)
    finally:
        spool.close()
    nonfinite = [spool.nonfinite[0], spool.nonfinite[1], spool.nonfinite[2][source.order]]
    for axis in (0, 1):
        if factor > 1:
            nonfinite[axis] = np.add.reduceat(nonfinite[axis], np.arange(0, len(nonfinite[axis]), factor))
    affine = _reduced_affine(source.affine, factor)
    # (column, row, slice) voxel axes, as nibabel indexes them; reoriented to RAS+ with views only.
    data = stored.transpose(2, 1, 0)
    orientation = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(data, orientation)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    canonical_zooms = np.empty(3)
    for axis, (target, _) in enumerate(orientation):
        canonical_zooms[int(target)] = zooms[axis]
    slice_axis = int(np.flatnonzero(orientation[:, 0] == 2)[0])
    per_slice = nonfinite[slice_axis][::-1] if orientation[slice_axis, 1] < 0 else nonfinite[slice_axis]
    # RAS+ array (x: left→right, y: posterior→anterior, z: inferior→superior) to viewer slices (Z, rows, cols):
    # rows anterior→posterior, columns the patient's right→left.
    slices = np.ascontiguousarray(np.transpose(canonical[::-1, ::-1, :], (2, 1, 0)))
    del stored, data, canonical
    slices, spacing = _square_pixels(slices, row_mm=float(canonical_zooms[1]), col_mm=float(canonical_zooms[0]),
                                     label=label)
    return Volume(source=label, kind=kind, slices=slices, spacing=(*spacing, float(canonical_zooms[2])),
                  window=shown, nonfinite=np.asarray(per_slice, np.int64).copy(), reduced_by=factor)


def _square_pixels(slices: np.ndarray, *, row_mm: float, col_mm: float, label: str = "volume"):
    """Resample in-plane to square pixels at the finer spacing when rows and columns differ by over 1 %
    (at the coarser one when the finer would exceed MAX_STORED_VOXELS); spacings more than MAX_ANISOTROPY-fold
    apart are refused, and zero, negative or non-finite ones leave the slices as they are."""
    if not (math.isfinite(row_mm) and math.isfinite(col_mm)) or row_mm <= 0 or col_mm <= 0 \
            or abs(row_mm - col_mm) <= 0.01 * min(row_mm, col_mm):
        return slices, (row_mm, col_mm)
    if max(row_mm, col_mm) > MAX_ANISOTROPY * min(row_mm, col_mm):
        raise UserError(f"cannot read volume {label}: in-plane voxel sizes {row_mm:g} x {col_mm:g} mm are more "
                        f"than {MAX_ANISOTROPY:g}-fold apart (not an MRI slice geometry; check the header's "
                        "pixel dimensions)")
    count, rows, columns = slices.shape
    target = min(row_mm, col_mm)
    if count * round(rows * row_mm / target) * round(columns * col_mm / target) > MAX_STORED_VOXELS:
        target = max(row_mm, col_mm)
    height = max(1, round(rows * row_mm / target))
    width = max(1, round(columns * col_mm / target))
    resized = np.empty((count, height, width), np.uint8)
    for index, plane in enumerate(slices):
        resized[index] = np.asarray(Image.fromarray(plane, mode="L").resize((width, height), Image.BILINEAR))
    return resized, (target, target)


def _check_size(shape, label: str) -> None:
    voxels = int(np.prod([int(s) for s in shape]))
    if voxels > MAX_VOXELS:
        raise UserError(f"cannot read volume {label}: {voxels} voxels exceeds the limit of {MAX_VOXELS}")


# --- NIfTI ------------------------------------------------------------------------------------------------


def _nifti_source(file: Path | io.BytesIO, label: str) -> _Source:
    """A NIfTI-1/2 file (gzip or not) or its bytes, streamed plane by plane from the data offset."""
    nib = require("nibabel", "volumes", "reading volumes (NIfTI, DICOM series)")

    try:
        if isinstance(file, Path):
            image = nib.load(str(file))
        else:
            raw = file.getvalue()
            image = (nib.Nifti2Image if raw[4:8] == b"n+2\0" else nib.Nifti1Image).from_bytes(raw)
        shape = tuple(int(s) for s in image.shape)
        proxy = image.dataobj  # nibabel's ArrayProxy: where the voxels start, their type and scaling
        dtype, offset = np.dtype(proxy.dtype), int(proxy.offset)
        slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # noqa: BLE001 - nibabel raises ImageFileError, OSError, EOFError, gzip errors
        raise UserError(f"cannot read volume {label}: not a readable NIfTI file ({' '.join(str(error).split())})") \
            from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise UserError(f"cannot read volume {label}: {len(image.shape)}-D NIfTI {image.shape}; give one 3-D "
                        "volume")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise UserError(f"cannot read volume {label}: NIfTI voxels of type {dtype} are not grayscale intensities")
    _check_size(shape, label)
    columns, rows, count = shape
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if not np.all(np.isfinite(affine)):
        affine = np.eye(4)

    def blocks():
        step = _block_rows(columns)
        item = dtype.itemsize
        try:
            opener = nib.openers.ImageOpener(str(file)) if isinstance(file, Path) else None
            handle = opener if opener is not None else io.BytesIO(file.getvalue())
            try:
                handle.seek(offset)
                for plane in range(count):
                    for row in range(0, rows, step):
                        n = min(step, rows - row)
                        data = handle.read(n * columns * item)
                        if len(data) != n * columns * item:
                            raise EOFError("the voxel data end early")
                        values = np.frombuffer(data, dtype=dtype).reshape(n, columns).astype(np.float32)
                        if slope != 1.0 or inter != 0.0:
                            with np.errstate(over="ignore", invalid="ignore"):
                                values = values * np.float32(slope) + np.float32(inter)
                        yield plane, row, values
            finally:
                if opener is not None:
                    opener.close()
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - truncated gzip streams, short files
            raise UserError(f"cannot read volume {label}: truncated or corrupt NIfTI data "
                            f"({' '.join(str(error).split())})") from None

    return _Source(label, columns, rows, count, affine, np.arange(count), blocks)


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


def _check_grayscale(dataset, label: str) -> None:
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise UserError(f"cannot read volume {label}: colour DICOM volumes are not supported (grayscale MR only)")


def _frame_blocks(frame: np.ndarray, transform, plane: int, columns: int):
    """A frame's row blocks through its modality LUT (elementwise, so per block), as float32."""
    from pydicom.pixels import apply_modality_lut

    step = _block_rows(columns)
    for row in range(0, frame.shape[0], step):
        with np.errstate(over="ignore", invalid="ignore"):
            yield plane, row, np.asarray(apply_modality_lut(frame[row:row + step], transform), dtype=np.float32)


def _dicom_series_source(folder: Path) -> _Source:
    import pydicom

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
    rows, columns = int(headers[0][0].Rows), int(headers[0][0].Columns)
    _check_size((columns, rows, len(files)), str(folder))

    def blocks():
        for plane, (_, file) in enumerate(headers):
            inflated = inflate_to_temporary(file, str(file))
            try:
                dataset = pydicom.dcmread(inflated if inflated is not None else file, force=True)
            except ImageReadError as error:
                raise UserError(str(error)) from None
            finally:
                if inflated is not None:
                    inflated.close()
            _check_grayscale(dataset, str(file))
            frame = _read_pixels(dataset, str(file))
            if frame.shape != (rows, columns):
                raise UserError(f"cannot read volume {folder}: {file.name} is {frame.shape[-1]}x{frame.shape[0]}, "
                                f"the series {columns}x{rows}")
            yield from _frame_blocks(frame, dataset, plane, columns)

    affine = _affine(orientation[:3], orientation[3:], spacing, positions[order[0]], step)
    return _Source(str(folder), columns, rows, len(files), affine, order, blocks)


def _read_pixels(dataset, label: str) -> np.ndarray:
    reason = missing_decoder_reason(dataset)
    if reason:
        raise UserError(f"cannot read volume {label}: {reason}")
    try:
        return dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - short pixel data, bad attributes
        raise UserError(f"cannot read volume {label}: cannot decode DICOM pixel data "
                        f"({' '.join(str(error).split())})") from None


def _frame_item(dataset, index: int, sequence: str):
    """The per-frame item of a functional group (falling back to the shared one), or None."""
    for group, pick in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = dataset.get(group)
        if groups and len(groups) > pick and sequence in groups[pick] and groups[pick][sequence].value:
            return groups[pick][sequence][0]
    return None


def _multiframe_source(file: Path | io.BytesIO, label: str) -> _Source:
    """A multi-frame DICOM read frame by frame (``pydicom.pixels.iter_pixels``); a deflated one from its
    inflated copy on disk."""
    import pydicom
    from pydicom.pixels import iter_pixels

    force = isinstance(file, Path) and file.suffix.lower() == ".dcm"
    try:
        inflated = inflate_to_temporary(file, label)  # the probe's limit too: one inflate limit for all
    except ImageReadError as error:
        raise UserError(f"cannot read volume {label}: {error.reason}") from None
    readable = inflated if inflated is not None else file
    try:
        header = pydicom.dcmread(readable, stop_before_pixels=True, force=force)
    except Exception as error:  # noqa: BLE001
        if inflated is not None:
            inflated.close()
        raise UserError(f"cannot read volume {label}: not a readable DICOM file ({error})") from None
    _check_grayscale(header, label)
    count = int(header.get("NumberOfFrames", 1) or 1)
    rows, columns = int(header.get("Rows", 0)), int(header.get("Columns", 0))
    _check_size((columns, rows, count), label)
    try:
        positions = np.array([[float(v) for v in _frame_item(header, i, "PlanePositionSequence")
                               .ImagePositionPatient] for i in range(count)])
        orientation_item = _frame_item(header, 0, "PlaneOrientationSequence")
        orientation = np.array([float(v) for v in orientation_item.ImageOrientationPatient])
        measures = _frame_item(header, 0, "PixelMeasuresSequence")
        spacing = [float(v) for v in (measures.PixelSpacing if measures is not None else header.PixelSpacing)]
        order, step = _slice_order(positions, orientation)
        first = positions[order[0]]
    except (AttributeError, TypeError, ValueError):
        log.warning("%s: no per-frame positions; frames kept in stored order and assumed axial", label)
        orientation = np.array([1.0, 0, 0, 0, 1, 0])
        spacing = [float(v) for v in header.get("PixelSpacing", [1.0, 1.0])]
        thickness = float(header.get("SpacingBetweenSlices", header.get("SliceThickness", 1.0)) or 1.0)
        order, step, first = np.arange(count), np.array([0, 0, thickness]), np.zeros(3)

    def blocks():
        reason = missing_decoder_reason(header)
        if reason:
            raise UserError(f"cannot read volume {label}: {reason}")
        try:
            for plane, frame in enumerate(iter_pixels(_rewound(readable))):
                if plane >= count:
                    break
                transform = _frame_item(header, plane, "PixelValueTransformationSequence")
                yield from _frame_blocks(np.asarray(frame).reshape(rows, columns),
                                         transform if transform is not None else header, plane, columns)
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - short pixel data, bad attributes, codecs
            raise UserError(f"cannot read volume {label}: cannot decode DICOM pixel data "
                            f"({' '.join(str(error).split())})") from None
        finally:
            if inflated is not None:
                inflated.close()

    affine = _affine(orientation[:3], orientation[3:], spacing, first, step)
    return _Source(label, columns, rows, count, affine, np.asarray(order), blocks)


def _rewound(file):
    if not isinstance(file, (str, os.PathLike)):
        file.seek(0)
    return file
