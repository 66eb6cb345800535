"""Tests for braintumor.synthetic.phantom: determinism, files on disk, anatomy and lesion placement, separability."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from braintumor.synthetic import phantom
from braintumor.errors import UserError
from braintumor.synthetic.phantom import PHANTOM_CLASSES, make_phantom, write_phantom_set

TUMOUR_CLASSES = ("glioma", "meningioma", "pituitary")
SEEDS = range(8)


def _ring(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """Pixels more than `inner` and at most `outer` pixels (city-block) away from a mask."""
    # scipy reads iterations=0 as "dilate until nothing changes", so the zero-width case is the mask itself
    hole = ndimage.binary_dilation(mask, iterations=inner) if inner else mask
    return ndimage.binary_dilation(mask, iterations=outer) & ~hole


def _head_frame(rendered, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions in the head's own axes (x across, y towards the skull base), pixels from its centre."""
    center_x, center_y = rendered.center
    cos_r, sin_r = np.cos(rendered.angle), np.sin(rendered.angle)
    dx, dy = cols - center_x, rows - center_y
    return cos_r * dx + sin_r * dy, -sin_r * dx + cos_r * dy


def test_classes_are_the_public_dataset_names():
    assert PHANTOM_CLASSES == ("glioma", "meningioma", "notumor", "pituitary")


@pytest.mark.parametrize("label", PHANTOM_CLASSES)
@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_dtype_shape_and_range(label, size):
    image, mask = make_phantom(label, size, rng=3, return_mask=True)
    assert image.dtype == np.uint8 and image.shape == (size, size)
    assert mask.dtype == bool and mask.shape == (size, size)
    assert image[0, :].mean() < 30 and image[:, 0].mean() < 30  # dark background at the border
    assert image.max() > 120  # bright scalp (and lesion)
    # a head, not a flat field: it covers a good part of the frame and leaves background around it
    assert 0.25 < (image > 40).mean() < 0.8


def test_same_seed_gives_identical_images_and_different_seeds_differ():
    for label in PHANTOM_CLASSES:
        first, first_mask = make_phantom(label, 96, rng=11, return_mask=True)
        again, again_mask = make_phantom(label, 96, rng=np.random.default_rng(11), return_mask=True)
        np.testing.assert_array_equal(first, again)
        np.testing.assert_array_equal(first_mask, again_mask)
        other = make_phantom(label, 96, rng=12)
        assert np.mean(first != other) > 0.3
    # no seed: fresh entropy, still a valid image
    assert make_phantom("glioma", 64).shape == (64, 64)


def test_a_generator_is_advanced_so_consecutive_draws_differ():
    rng = np.random.default_rng(5)
    assert not np.array_equal(make_phantom("notumor", 64, rng), make_phantom("notumor", 64, rng))


def test_same_seed_with_two_labels_shares_the_head_and_differs_only_near_the_lesion():
    healthy = phantom._render("notumor", 128, 21)
    for label in TUMOUR_CLASSES:
        sick = phantom._render(label, 128, 21)
        near_lesion = ndimage.binary_dilation(sick.lesion | sick.edema, iterations=4)
        changed = healthy.image != sick.image
        assert changed[near_lesion].any()
        assert not changed[~near_lesion].any(), label


def test_mask_is_empty_for_notumor_and_not_for_tumours():
    for seed in SEEDS:
        _, mask = make_phantom("notumor", 128, seed, return_mask=True)
        assert not mask.any()
        for label in TUMOUR_CLASSES:
            _, mask = make_phantom(label, 128, seed, return_mask=True)
            assert mask.sum() >= 20, (label, seed)
            # one compact lesion, not scattered pixels
            labelled, count = ndimage.label(mask)
            assert count == 1, (label, seed)


def test_anatomy_has_skull_csf_gap_ventricles_and_brighter_scalp():
    for seed in SEEDS:
        rendered = phantom._render("notumor", 128, seed)
        image = rendered.image.astype(float)
        assert rendered.skull.any() and rendered.brain.any()
        assert not (rendered.skull & rendered.brain).any()
        gap = rendered.head & ~rendered.skull & ~rendered.brain  # the CSF between skull and brain
        assert gap.sum() > 100
        parenchyma = image[rendered.brain].mean()
        assert image[rendered.skull].mean() > parenchyma  # scalp fat is the brightest normal tissue
        assert image[gap].mean() < parenchyma - 30
        # ventricles: a dark region near the head centre, within the brain
        rows, cols = np.nonzero(rendered.brain)
        head_x, head_y = _head_frame(rendered, rows, cols)
        central = (np.abs(head_x) < 12) & (np.abs(head_y) < 20)
        assert np.mean(image[rows[central], cols[central]] < parenchyma - 40) > 0.15


def test_pituitary_sits_on_the_midline_in_the_lower_part_of_the_head():
    for seed in SEEDS:
        rendered = phantom._render("pituitary", 128, seed)
        rows, cols = np.nonzero(rendered.lesion)
        head_x, head_y = _head_frame(rendered, rows.mean(), cols.mean())
        head_rows, head_cols = np.nonzero(rendered.head)
        _, head_ys = _head_frame(rendered, head_rows, head_cols)
        half_height = head_ys.max()
        assert abs(head_x) < 0.04 * 128, seed  # on the vertical midline of the (rotated) head
        assert 0.35 * half_height < head_y < 0.85 * half_height, seed  # skull base: lower part, inside
        # also in plain image coordinates: below the head's centre
        assert rows.mean() > rendered.center[1] + 0.25 * half_height
        assert rendered.lesion.sum() < 0.02 * 128 * 128  # small


def test_meningioma_abuts_the_inner_skull_and_is_homogeneous():
    meningioma_spread, glioma_spread = [], []
    for seed in SEEDS:
        rendered = phantom._render("meningioma", 128, seed)
        lesion = rendered.lesion
        assert (ndimage.binary_dilation(lesion, iterations=2) & rendered.skull).any(), seed
        assert not (lesion & rendered.skull).any()  # extra-axial but intracranial
        assert not (lesion & ~rendered.head).any()
        # round: its area fills most of the disc spanned by its farthest pixel from the centroid
        rows, cols = np.nonzero(lesion)
        reach = np.hypot(rows - rows.mean(), cols - cols.mean()).max()
        assert lesion.sum() > 0.45 * np.pi * reach**2, seed
        core = ndimage.binary_erosion(lesion, iterations=1)
        meningioma_spread.append(rendered.image[core].std())
        glioma = phantom._render("glioma", 128, seed)
        glioma_spread.append(glioma.image[ndimage.binary_erosion(glioma.lesion, iterations=1)].std())
    assert np.mean(meningioma_spread) < 0.6 * np.mean(glioma_spread)  # homogeneous vs heterogeneous


def test_glioma_is_intra_axial_inside_an_edema_ring():
    for seed in SEEDS:
        rendered = phantom._render("glioma", 128, seed)
        lesion = rendered.lesion
        assert not (lesion & ~rendered.brain).any(), seed
        assert not (ndimage.binary_dilation(lesion, iterations=3) & rendered.skull).any(), seed
        ring = _ring(lesion, 0, 2)
        assert np.mean(rendered.edema[ring]) > 0.9, seed
        assert not (rendered.edema & lesion).any()
        assert rendered.edema.sum() > 0.5 * lesion.sum()
        image = rendered.image.astype(float)
        beyond = _ring(lesion | rendered.edema, 2, 6) & rendered.brain
        # the halo is visible against the tissue around it (medians: a ventricle nearby is no tissue)
        assert abs(np.median(image[rendered.edema]) - np.median(image[beyond])) > 8, seed


@pytest.mark.parametrize("label", TUMOUR_CLASSES)
def test_lesion_is_clearly_brighter_than_its_surroundings(label):
    for seed in range(12):
        rendered = phantom._render(label, 128, seed)
        image = rendered.image.astype(float)
        around = _ring(rendered.lesion, 1, 4) & rendered.head
        contrast = image[rendered.lesion].mean() - image[around].mean()
        noise = image[~rendered.head].std()  # background is pure (Rician) noise
        assert contrast > 20 and contrast > 3 * noise, (label, seed, contrast, noise)


@pytest.mark.slow
def test_classes_are_separable_by_a_linear_model_on_tiny_images():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(image: np.ndarray) -> np.ndarray:
        tiny = image.reshape(16, 4, 16, 4).mean(axis=(1, 3))  # 64 px -> 16x16 by block means
        return np.concatenate([tiny.ravel(), np.histogram(image, bins=16, range=(0, 256))[0]])

    def dataset(seed: int, per_class: int):
        rows, labels = [], []
        for class_index, label in enumerate(PHANTOM_CLASSES):
            for i in range(per_class):
                rows.append(features(make_phantom(label, 64, np.random.default_rng([seed, class_index, i]))))
                labels.append(class_index)
        return np.array(rows), np.array(labels)

    train_x, train_y = dataset(0, 60)
    test_x, test_y = dataset(1, 25)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    accuracy = model.fit(train_x, train_y).score(test_x, test_y)
    assert accuracy > 0.6, accuracy  # chance is 0.25


def test_write_phantom_set_writes_readable_pngs_per_class(tmp_path):
    root = write_phantom_set(tmp_path / "set", per_class=3, size=48, seed=7)
    assert root == tmp_path / "set"
    assert sorted(entry.name for entry in root.iterdir()) == sorted(PHANTOM_CLASSES)
    for class_index, label in enumerate(PHANTOM_CLASSES):
        files = sorted((root / label).iterdir())
        assert [f.name for f in files] == [f"{label}_{i:04d}.png" for i in range(3)]
        for i, path in enumerate(files):
            with Image.open(path) as png:
                assert png.format == "PNG" and png.mode == "L" and png.size == (48, 48)
                pixels = np.asarray(png)
            expected = make_phantom(label, 48, np.random.default_rng(np.random.SeedSequence([7, class_index, i])))
            np.testing.assert_array_equal(pixels, expected)


def test_write_phantom_set_is_reproducible_and_stable_when_counts_or_classes_change(tmp_path):
    def read(root, label, i):
        with Image.open(root / label / f"{label}_{i:04d}.png") as png:
            return np.asarray(png)

    small = write_phantom_set(tmp_path / "small", per_class=2, size=40, seed=3)
    large = write_phantom_set(tmp_path / "large", per_class=4, size=40, seed=3, classes=("pituitary", "glioma"))
    other = write_phantom_set(tmp_path / "other", per_class=2, size=40, seed=4, classes=["glioma"])
    assert sorted(p.name for p in large.iterdir()) == ["glioma", "pituitary"]
    assert len(list((large / "pituitary").iterdir())) == 4
    for label in ("glioma", "pituitary"):
        for i in range(2):
            np.testing.assert_array_equal(read(small, label, i), read(large, label, i))
    assert not np.array_equal(read(small, "glioma", 0), read(other, "glioma", 0))
    assert not np.array_equal(read(small, "glioma", 0), read(small, "glioma", 1))


def test_unknown_label_names_the_valid_ones(tmp_path):
    with pytest.raises(UserError) as caught:
        make_phantom("astrocytoma")
    message = str(caught.value)
    assert "astrocytoma" in message and all(label in message for label in PHANTOM_CLASSES)
    assert "\n" not in message
    with pytest.raises(UserError, match="glioma, meningioma, notumor, pituitary"):
        write_phantom_set(tmp_path, per_class=1, classes=("glioma", "Glioma"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"per_class": 0}, "at least 1"),
        ({"per_class": 2.5}, "whole number"),
        ({"per_class": 1, "size": 8}, "between 32 and"),
        ({"per_class": 1, "size": "128"}, "whole number"),
        ({"per_class": 1, "seed": -1}, ">= 0"),
        ({"per_class": 1, "classes": ()}, "no phantom classes"),
    ],
)
def test_write_phantom_set_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        write_phantom_set(tmp_path / "out", **kwargs)


def test_make_phantom_rejects_bad_sizes():
    for size in (0, 16, 4096, True, 64.0):
        with pytest.raises(UserError, match="phantom size"):
            make_phantom("glioma", size)


def test_unwritable_output_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write phantoms"):
        write_phantom_set(blocker, per_class=1, size=32)

