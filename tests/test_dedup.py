"""dedup.py: the hash against references, the neighbour search against brute force, duplicate groups, leak masks."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from braintumor.data.dedup import (
    DEFAULT_THRESHOLD,
    HASH_BITS,
    content_box,
    duplicate_groups,
    hamming,
    image_hashes,
    leak_free_mask,
    near_pairs,
    phash,
)
from braintumor.errors import UserError
from braintumor.data.io import ImageReadError
from braintumor.synthetic.phantom import make_phantom

from helpers import COPIES, SIZE, phantom_pixels, planted_folder, train_and_test_folders

def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    """A full-frame smooth random texture: 'a different generated image' unlike any head."""
    values = gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), size / 16)
    return np.round(255 * (values - values.min()) / np.ptp(values)).astype(np.uint8)




def _gray_hash(image: Image.Image) -> int:
    return phash(np.asarray(image.convert("L")))


# ---------------------------------------------------------------- the hash against references


def _reference_phash(gray: np.ndarray, box=None) -> int:
    """pHash with an explicit DCT-II matrix (numpy only, no scipy), bits built one by one."""
    small = Image.fromarray(gray.astype(np.float32)).resize((64, 64), Image.Resampling.LANCZOS, box=box)
    n = 64
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    basis = np.sqrt(2 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    basis[0] /= np.sqrt(2)
    coefficients = basis @ np.asarray(small, dtype=np.float64) @ basis.T
    low = coefficients[:16, :16].ravel()
    median = np.median(low[1:])
    return sum(1 << (HASH_BITS - 1 - i) for i, value in enumerate(low) if value > median)


def test_phash_equals_matrix_dct_reference():
    rng = np.random.default_rng(0)
    images = [phantom_pixels(i) for i in range(4)] + [_texture(7), rng.integers(0, 256, (40, 70)).astype(np.uint8)]
    for gray in images:
        assert phash(gray, crop_to_content=False) == _reference_phash(gray)
        assert phash(gray) == _reference_phash(gray, box=content_box(gray))
        assert 0 <= phash(gray) < 2**HASH_BITS
        assert phash(gray).bit_count() == 128  # DC bit + half of the 255 AC bits


def test_content_box_of_a_rectangle_matches_hand_computed_mass_quantiles():
    image = np.zeros((80, 100), np.uint8)
    image[10:50, 20:70] = 200  # uniform mass: the 0.5 % / 99.5 % quantiles are linear in the edges
    x0, y0, x1, y1 = content_box(image)
    assert (x0, x1) == pytest.approx((20 + 0.005 * 50, 70 - 0.005 * 50))
    assert (y0, y1) == pytest.approx((10 + 0.005 * 40, 50 - 0.005 * 40))
    padded = np.pad(image, ((7, 0), (3, 0)))
    assert content_box(padded) == pytest.approx((x0 + 3, y0 + 7, x1 + 3, y1 + 7))
    assert content_box(image + 20) == pytest.approx((x0, y0, x1, y1))  # brightness moves the background too
    assert content_box(np.full((30, 40), 9, np.uint8)) == (0.0, 0.0, 40.0, 30.0)  # flat: the whole frame


def test_brightness_shift_without_clipping_leaves_the_hash_unchanged():
    gray = (phantom_pixels(3).astype(np.int16) * 200 // 255).astype(np.uint8)  # headroom below 255
    assert phash(gray + 20) == phash(gray)
    assert phash(gray + 20, crop_to_content=False) == phash(gray, crop_to_content=False)


def test_default_threshold_separates_edited_copies_from_different_images():
    """The validation behind DEFAULT_THRESHOLD: every edited copy within it, every other image beyond."""
    originals = [phantom_pixels(i) for i in range(24)]
    hashes = [phash(gray) for gray in originals]
    copy_distance = {name: max(hamming(h, _gray_hash(edit(Image.fromarray(gray))))
                               for gray, h in zip(originals, hashes)) for name, edit in COPIES.items()}
    assert max(copy_distance.values()) <= DEFAULT_THRESHOLD, copy_distance
    # Different slices: other phantoms, the same head with another lesion, full-frame textures.
    different = [hamming(a, b) for a, b in combinations(hashes, 2)]
    same_head = [hamming(phash(make_phantom("notumor", SIZE, rng=seed)), phash(make_phantom(label, SIZE, rng=seed)))
                 for seed in range(6) for label in ("glioma", "meningioma", "pituitary")]
    textures = [phash(_texture(seed)) for seed in range(12)]
    other = [hamming(a, b) for a, b in combinations(textures, 2)] + [hamming(t, h) for t in textures for h in hashes]
    assert min(different) > 2 * DEFAULT_THRESHOLD, sorted(different)[:5]
    assert min(same_head) > DEFAULT_THRESHOLD, sorted(same_head)[:5]
    assert min(other) > 2 * DEFAULT_THRESHOLD, sorted(other)[:5]


# ---------------------------------------------------------------- neighbour search


def _brute_force(hashes, threshold):
    return {(i, j) for i, j in combinations(range(len(hashes)), 2) if hamming(hashes[i], hashes[j]) <= threshold}


def _flip(value: int, count: int, rng) -> int:
    for bit in rng.choice(HASH_BITS, size=count, replace=False):
        value ^= 1 << int(bit)
    return value


def test_multi_index_search_equals_brute_force():
    rng = np.random.default_rng(42)
    random_hashes = [int.from_bytes(rng.bytes(HASH_BITS // 8), "big") for _ in range(150)]
    planted = [_flip(random_hashes[i], int(rng.integers(0, 30)), rng) for i in range(60)]
    # A tight cluster (all within ~24 bits of one centre) makes long runs of equal block keys.
    centre = random_hashes[0]
    cluster = [_flip(centre, int(rng.integers(0, 13)), rng) for _ in range(80)]
    hashes = random_hashes + planted + cluster + random_hashes[:5]  # exact repeats too
    for threshold in (0, 1, 5, DEFAULT_THRESHOLD, 24):
        found = {tuple(pair) for pair in near_pairs(hashes, threshold).tolist()}
        assert found == _brute_force(hashes, threshold), threshold
    assert near_pairs([], 4).shape == (0, 2)
    assert near_pairs([5], 4).shape == (0, 2)


@pytest.mark.slow
def test_multi_index_search_scales_to_a_hundred_thousand_hashes():
    """10^5 hashes: 5 * 10^9 pairs by brute force; the index verifies only a few candidates per hash."""
    rng = np.random.default_rng(1)
    hashes = [int.from_bytes(rng.bytes(HASH_BITS // 8), "big") for _ in range(100_000)]
    hashes += [_flip(hashes[i], 8, rng) for i in range(50)]
    pairs = near_pairs(hashes, DEFAULT_THRESHOLD)
    assert {tuple(p) for p in pairs.tolist()} == {(i, 100_000 + i) for i in range(50)}


@pytest.mark.parametrize("threshold", [-1, 65, 2.5, True])
def test_invalid_threshold_is_a_user_error(threshold):
    with pytest.raises(UserError, match="threshold"):
        near_pairs([1, 2], threshold)


def test_duplicate_groups_merge_planted_exact_and_near_copies(tmp_path):
    root, files = planted_folder(tmp_path)
    paths = [p for key in ("distinct", "near", "exact", "broken") for p in files[key]]
    groups = dict(zip(paths, duplicate_groups(paths)))
    assert len({groups[p] for p in files["exact"]}) == 1
    assert len({groups[p] for p in files["near"]}) == 1
    singles = files["distinct"] + files["broken"] + files["exact"][:1] + files["near"][:1]
    assert len({groups[p] for p in singles}) == len(singles)


def test_leak_free_mask_flags_test_images_that_duplicate_training_images(tmp_path):
    train, _, test_paths = train_and_test_folders(tmp_path)
    train_paths = sorted(train.rglob("*.png"))
    assert leak_free_mask(test_paths, train_paths) == [False, True, True, True, True, False, False]
    without_sources = [p for p in train_paths if p.name not in ("t0.png", "t1.png", "t3.png")]
    assert leak_free_mask(test_paths, without_sources) == [True] * 7


# ---------------------------------------------------------------- hashes of files


def test_image_hashes_of_an_unreadable_file_raise(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        image_hashes(path)
