"""volumes.py and volume_verdict.py: NIfTI, DICOM series and multi-frame DICOM back as ordered axial slices,
reorientation, the verdict rule, and the predict/explain commands on phantom volumes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from braintumor.cli import main
from braintumor.errors import UserError
from braintumor.synthetic.volumes import (make_phantom_volume, write_dicom_series, write_multiframe_dicom,
                                        write_nifti)
from braintumor.inference.service import predict_volume
from braintumor.inference.volume_verdict import NO_FINDING, VerdictRule, decide, no_tumour_class, volume_status
from braintumor.data.volumes import is_volume, partition_inputs, read_volume, window_volume

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
SLICES, SIZE = 12, 48


class OracleClassifier:
    """Knows each expected slice by its pixels: checks the slices arrive complete and in order, and answers
    the phantom's lesion class on lesion slices (p 0.9) and notumor elsewhere (as logits, for the service)."""

    classes = CLASSES
    tta, temperature, min_confidence, trust_tiers = False, 1.0, 0.0, ()

    def __init__(self, expected: np.ndarray, lesion: np.ndarray, label: str):
        self.index = {expected[z].tobytes(): z for z in range(len(expected))}
        self.lesion, self.label, self.seen = lesion, label, []

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor([self.index[np.asarray(image)[..., 0].tobytes()]])

    def infer(self, batch: torch.Tensor) -> tuple[np.ndarray, None]:
        rows = []
        for z in batch[:, 0].tolist():
            self.seen.append(z)
            row = np.full(len(CLASSES), 0.1 / 3)
            row[CLASSES.index(self.label if self.lesion[z] else "notumor")] = 0.9
            rows.append(row)
        return np.log(np.array(rows, dtype=np.float32)), None


@pytest.fixture(scope="module")
def phantom():
    volume, lesion = make_phantom_volume("meningioma", SIZE, SLICES, seed=5)
    expected, _ = window_volume(volume.astype(np.float32))
    return volume, lesion, expected


def _check_volume(path, phantom, kind):
    volume, lesion, expected = phantom
    read = read_volume(path)
    assert read.kind == kind and read.slices.shape == (SLICES, SIZE, SIZE)
    np.testing.assert_array_equal(read.slices, expected)  # every slice, in order inferior → superior
    oracle = OracleClassifier(expected, lesion, "meningioma")
    result = predict_volume(oracle, read, batch_size=5)
    assert oracle.seen == list(range(SLICES))
    assert result.verdict == "meningioma" and result.votes == {"meningioma": int(lesion.sum())}
    assert result.status == "ok" and all(p.status == "ok" for p in result.predictions)
    assert set(np.flatnonzero(lesion)) <= set(result.suspicious)  # the montage shows every lesion slice
    return result


def test_nifti_volume_comes_back_in_order_with_the_lesion_class_winning(tmp_path, phantom):
    path = write_nifti(tmp_path / "case.nii.gz", phantom[0], spacing=(1.0, 1.0, 3.0))
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "P", "S")  # stored non-canonically on purpose
    result = _check_volume(path, phantom, "nifti")
    assert result.spacing == (1.0, 1.0, 3.0)
    rows = result.to_dict()["slices"]
    assert len(rows) == SLICES and [r["slice_index"] for r in rows] == list(range(SLICES))
    assert all(r["volume"] == str(path) and r["source"] == f"{path}#slice{k:03d}" for k, r in enumerate(rows))
    assert "meningioma" in result.rule or "tumour class" in result.rule


def test_dicom_series_is_sorted_by_position_not_file_name(tmp_path, phantom):
    folder = write_dicom_series(tmp_path / "series", phantom[0], seed=3, slope=1.0, intercept=-1000.0)
    positions = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in sorted(folder.iterdir())]
    assert positions != sorted(positions)  # file names are out of position order
    assert is_volume(folder)
    _check_volume(folder, phantom, "dicom-series")


def test_multiframe_dicom_uses_per_frame_positions(tmp_path, phantom):
    path = write_multiframe_dicom(tmp_path / "enhanced.dcm", phantom[0])
    assert is_volume(path)
    _check_volume(path, phantom, "dicom-multiframe")


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "A", "I"), ("A", "S", "R"), ("P", "I", "L")])
def test_flipped_or_permuted_nifti_header_gives_the_same_slices(tmp_path, phantom, codes):
    reference = write_nifti(tmp_path / "lps.nii.gz", phantom[0])
    image = nib.load(reference)
    transform = nib.orientations.ornt_transform(nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(codes))
    reoriented = image.as_reoriented(transform)  # the same anatomy, stored in another voxel order
    assert nib.aff2axcodes(reoriented.affine) == codes
    assert not np.array_equal(np.asarray(reoriented.dataobj), np.asarray(image.dataobj))
    path = tmp_path / f"{''.join(codes)}.nii"
    nib.save(reoriented, path)
    np.testing.assert_array_equal(read_volume(path).slices, read_volume(reference).slices)


def test_window_is_robust_percentiles_per_volume():
    values = np.zeros((4, 10, 10), np.float32)
    values[:, :, 5:] = 100.0
    values[0, 0, 0] = 1e6  # one hot voxel must not darken the whole volume
    windowed, (low, high) = window_volume(values)
    assert low == 0.0 and high == 100.0
    assert windowed[1, 0, 9] == 255 and windowed[1, 0, 0] == 0 and windowed[0, 0, 0] == 255
    eight_bit = np.array([[[0, 7, 180]]], np.float32)  # an 8-bit volume is used as it is, like 8-bit slices
    assert window_volume(eight_bit)[0].tolist() == [[[0, 7, 180]]]


def test_verdict_rule():
    content = np.ones(5, bool)
    p = np.array([[0.8, 0.1, 0.05, 0.05]] * 2 + [[0.05, 0.05, 0.9, 0.0]] * 2 + [[0.1, 0.6, 0.2, 0.1]])
    assert decide(p, CLASSES, content, VerdictRule()) == ("glioma", {"glioma": 2, "meningioma": 1})
    assert decide(p, CLASSES, content, VerdictRule(min_slices=3))[0] == "notumor"
    assert decide(p, CLASSES, content, VerdictRule(threshold=0.85))[0] == "notumor"
    # Empty slices never vote.
    assert decide(p, CLASSES, np.array([False, False, True, True, True]), VerdictRule(min_slices=1))[0] == \
        "meningioma"
    # Ties go to the class with the highest single-slice probability.
    tie = np.array([[0.6, 0.3, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0], [0.2, 0.0, 0.1, 0.7], [0.0, 0.0, 0.05, 0.95]])
    assert decide(tie, CLASSES, np.ones(4, bool), VerdictRule())[0] == "pituitary"
    assert no_tumour_class(["Glioma", "No_Tumor"]) == "No_Tumor" and no_tumour_class(["a", "b"]) is None
    assert decide(p[:, :2] / p[:, :2].sum(1, keepdims=True), ["a", "b"], content, VerdictRule(threshold=0.99))[0] \
        == NO_FINDING
    with pytest.raises(UserError):
        VerdictRule(threshold=0.0)
    # Only accepted slices (status ok or atypical) vote; NaN rows never do.
    assert decide(p, CLASSES, content, VerdictRule(), accepted=np.array([False, False, True, True, True]))[0] == \
        "notumor"
    nan = p.copy()
    nan[0] = np.nan
    assert decide(nan, CLASSES, content, VerdictRule()) == ("notumor", {"meningioma": 1, "glioma": 1})


def test_volume_status():
    content = np.array([True, True, True, True, False])
    assert volume_status(["not_mri", "not_mri", "ok", "ok", "ok"], content) == "not_mri"  # half of the content
    assert volume_status(["not_mri", "ok", "ok", "ok", "not_mri"], content) == "ok"
    assert volume_status(["atypical", "atypical", "ok", "uncertain", "ok"], content) == "atypical"
    assert volume_status(["not_mri"] * 5, np.zeros(5, bool)) == "not_mri"  # no content: every slice counts


def test_partition_inputs_and_bad_volumes(tmp_path, phantom):
    root = tmp_path / "scans"
    write_dicom_series(root / "patient1" / "t1", phantom[0])
    write_nifti(root / "case.nii.gz", phantom[0])
    Image.fromarray(phantom[2][6]).save(root / "slice.png")
    images, volumes = partition_inputs([root])
    assert images == [root / "slice.png"]
    assert sorted(volumes) == sorted([root / "patient1" / "t1", root / "case.nii.gz"])

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    with pytest.raises(UserError, match=r"^cannot read volume .*broken.nii.gz: not a readable NIfTI file"):
        read_volume(broken)
    mixed = tmp_path / "mixed"
    write_dicom_series(mixed, phantom[0][:4])
    other = write_dicom_series(tmp_path / "other", phantom[0][4:8])
    for i, file in enumerate(sorted(other.iterdir())):
        file.rename(mixed / f"X{i}.dcm")
    assert not is_volume(mixed)  # two series in one folder are not one volume
    with pytest.raises(UserError, match="the folder holds 2 series; give one series per folder"):
        read_volume(mixed)


@pytest.mark.slow
def test_predict_and_explain_volumes_through_the_cli(tiny_checkpoint, tmp_path, capsys):
    assert main(["make-phantoms", str(tmp_path / "vol"), "--volumes", "--size", "32", "--slices", "6",
                 "--per-class", "1"]) == 0
    capsys.readouterr()
    nifti, series = tmp_path / "vol" / "glioma_000.nii.gz", tmp_path / "vol" / "glioma_000_series"
    assert main(["predict", str(tiny_checkpoint), str(nifti), str(series), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in records] == ["nifti", "dicom-series"]
    assert all(len(r["slices"]) == 6 and r["verdict"] in CLASSES and r["rule"] for r in records)
    for a, b in zip(records[0]["slices"], records[1]["slices"]):  # the same phantom in two formats
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6) and a["status"] == b["status"]
        assert a["slice_index"] == b["slice_index"] and a["volume"] != b["volume"]
    assert all(r["status"] in ("ok", "atypical", "not_mri") for r in records)

    assert main(["predict", str(tiny_checkpoint), str(nifti), "--csv", "-q"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 7 and lines[1].startswith(f"{nifti}#slice000,") and captured.err == ""

    out = tmp_path / "cam"
    assert main(["explain", str(tiny_checkpoint), str(nifti), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["glioma_000_montage.png", "glioma_000_slices.csv", "glioma_000_volume.json"]
    summary = json.loads((out / "glioma_000_volume.json").read_text())
    assert summary["montage"] == "glioma_000_montage.png" and len(summary["suspicious_slices"]) == 6
    with Image.open(out / "glioma_000_montage.png") as montage:
        assert montage.width > 2 * montage.height  # six columns of slice above overlay
