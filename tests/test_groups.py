"""Patient/series groups (groups.py) and the training split that keeps every group on one side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from braintumor.training.config import TrainConfig
from braintumor.errors import UserError
from braintumor.data.groups import find_groups, merge_groups, read_groups_csv
from braintumor.data.index import prepare_split
from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom


def patient_folders(root: Path, patients: int = 8, slices: int = 3) -> Path:
    """root/<class>/patient<k>/slice<j>.png: every patient's slices are distinct phantoms of one class."""
    for k in range(patients):
        label = PHANTOM_CLASSES[k % 2]
        for j in range(slices):
            folder = root / label / f"patient{k}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(make_phantom(label, 32, 100 * k + j)).save(folder / f"slice{j}.png")
    return root


def sides(split) -> tuple[set[str], set[str]]:
    return ({Path(p).parent.name for p in split.train_paths}, {Path(p).parent.name for p in split.val_paths})


@pytest.mark.parametrize("seed", range(4))
def test_per_patient_sub_folders_never_straddle_the_split(tmp_path, seed):
    data = patient_folders(tmp_path / "data")
    split = prepare_split(TrainConfig(data=str(data), val_split=0.3, seed=seed, group_split=False), progress=False)
    train, val = sides(split)
    assert val and train and not train & val
    assert "groups from per-patient sub-folders" in split.val_source


def test_groups_from_a_csv_never_straddle_and_duplicates_still_group(tmp_path):
    data = tmp_path / "data"
    rows = []
    for k in range(12):  # a flat class folder per class; the CSV says which patient each slice belongs to
        label = PHANTOM_CLASSES[k % 2]
        (data / label).mkdir(parents=True, exist_ok=True)
        for j in range(2):
            name = f"{label}/img_{k}_{j}.png"
            Image.fromarray(make_phantom(label, 32, 1000 * k + j)).save(data / name)
            rows.append(f"{name},P{k}")
    # A pixel copy of a slice of P0 under another name, listed for another patient: duplicates join the groups.
    (data / PHANTOM_CLASSES[0] / "copy.png").write_bytes((data / PHANTOM_CLASSES[0] / "img_0_0.png").read_bytes())
    rows.append(f"{PHANTOM_CLASSES[0]}/copy.png,P2")
    csv_file = tmp_path / "groups.csv"
    csv_file.write_text("path,group\n" + "\n".join(rows) + "\n")
    patient_of = {str(data / line.split(",")[0]): line.split(",")[1] for line in rows}
    for seed in range(4):
        split = prepare_split(TrainConfig(data=str(data), groups=str(csv_file), val_split=0.3, seed=seed),
                              progress=False)
        train = {patient_of[str(p)] for p in split.train_paths}
        val = {patient_of[str(p)] for p in split.val_paths}
        assert val and not train & val, seed
        # P0 and P2 are linked by the duplicate: always together.
        assert {"P0", "P2"} <= train or {"P0", "P2"} <= val
    assert f"groups from {csv_file}" in split.val_source and "duplicates" in split.val_source


def test_merge_groups_joins_images_sharing_any_id():
    assert merge_groups(["a", "a", None, "b", None], [1, 2, 2, 3, 4]) == [0, 0, 0, 1, 2]
    assert merge_groups([None, None]) == [0, 1]


def test_csv_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="groups file not found"):
        read_groups_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,patient\na.png,1\n")
    with pytest.raises(UserError, match="columns path and group"):
        read_groups_csv(bad)


def test_absolute_and_unlisted_paths(tmp_path):
    image = tmp_path / "data" / "glioma" / "a.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    other = image.with_name("b.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(other)
    csv_file = tmp_path / "g.csv"
    csv_file.write_text(f"path,group\n{image},X\n")
    groups, source = find_groups([image, other], tmp_path / "data", csv_file)
    assert groups == ["X", None] and "1 of 2 images not listed" in source
