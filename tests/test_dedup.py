"""dedup.py: the hash against references, the neighbour search against brute force, duplicate groups, leak masks."""

from __future__ import annotations

import io
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from braintumor.dedup import (
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
from braintumor.phantom import PHANTOM_CLASSES, make_phantom

SIZE = 128  # phantom side: big enough that a 2 % crop removes whole pixels


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test hashes into its own cache under tmp_path (never the user's ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("BRAINTUMOR_CACHE_DIR", raising=False)
    return tmp_path / "xdg" / "braintumor" / "audit"


def _phantom(index: int, size: int = SIZE) -> np.ndarray:
    return make_phantom(PHANTOM_CLASSES[index % 4], size, rng=index)


def _texture(seed: int, size: int = SIZE) -> np.ndarray:
    """A full-frame smooth random texture: 'a different generated image' unlike any head."""
    values = gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), size / 16)
    return np.round(255 * (values - values.min()) / np.ptp(values)).astype(np.uint8)


def _jpeg(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _brighter(image: Image.Image, amount: int = 20) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + amount, 0, 255).astype(np.uint8))


def _cropped(image: Image.Image, fraction: float, corner: bool = False) -> Image.Image:
    """Remove ``fraction`` of each side's length: split over both ends, or all from the top-left."""
    width, height = image.size
    dx, dy = round(width * fraction), round(height * fraction)
    if corner:
        return image.crop((dx, dy, width, height))
    return image.crop((dx // 2, dy // 2, width - (dx - dx // 2), height - (dy - dy // 2)))


COPIES = {
    "resized to 0.7x": lambda im: im.resize((round(im.width * 0.7),) * 2, Image.Resampling.BILINEAR),
    "resized to 1.5x": lambda im: im.resize((round(im.width * 1.5),) * 2, Image.Resampling.BICUBIC),
    "JPEG quality 70": _jpeg,
    "brightness +20": _brighter,
    "cropped 2 %": lambda im: _cropped(im, 0.02),
    "cropped 3 %": lambda im: _cropped(im, 0.03),
    "cropped 3 % at a corner": lambda im: _cropped(im, 0.03, corner=True),
    "all of them": lambda im: _jpeg(_brighter(_cropped(im, 0.03)).resize((100, 100))),
}


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
    images = [_phantom(i) for i in range(4)] + [_texture(7), rng.integers(0, 256, (40, 70)).astype(np.uint8)]
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
    gray = (_phantom(3).astype(np.int16) * 200 // 255).astype(np.uint8)  # headroom below 255
    assert phash(gray + 20) == phash(gray)
    assert phash(gray + 20, crop_to_content=False) == phash(gray, crop_to_content=False)


def test_default_threshold_separates_edited_copies_from_different_images():
    """The validation behind DEFAULT_THRESHOLD: every edited copy within it, every other image beyond."""
    originals = [_phantom(i) for i in range(24)]
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


# ---------------------------------------------------------------- planted folders (shared with test_audit.py)


def _save(path: Path, image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.save(path, **options)
    return path


def planted_folder(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    """A two-class folder with one exact pair across classes, one near-duplicate family and distinct slices."""
    root = tmp_path / "data"
    source = Image.fromarray(_phantom(1))
    files = {
        "exact": [_save(root / "glioma" / "a.png", _phantom(0)), _save(root / "notumor" / "a_copy.bmp", _phantom(0))],
        "near": [_save(root / "glioma" / "b.png", source)]
        + [_save(root / "glioma" / f"b_{k}.{'jpg' if 'JPEG' in name else 'png'}", edit(source))
           for k, name in enumerate(["resized to 0.7x", "JPEG quality 70", "brightness +20", "cropped 3 %"])
           for edit in [COPIES[name]]],
        "distinct": [_save(root / PHANTOM_CLASSES[2 * (i % 2)] / f"c{i}.png", _phantom(i)) for i in range(2, 8)]
        + [_save(root / "notumor" / "rgb.png", np.stack([_phantom(8)] * 3, axis=-1) // 2)],
    }
    broken = root / "notumor" / "broken.png"
    broken.write_bytes((root / "glioma" / "b.png").read_bytes()[:300])  # truncated PNG
    files["broken"] = [broken]
    return root, {key: sorted(str(p.resolve()) for p in paths) for key, paths in files.items()}


def train_and_test_folders(tmp_path) -> tuple[Path, Path, list[Path]]:
    """Six training phantoms; seven test images of which the first and the last two duplicate training images."""
    train, test = tmp_path / "train", tmp_path / "test"
    for i in range(6):
        _save(train / PHANTOM_CLASSES[i % 2] / f"t{i}.png", _phantom(i))
    leaked_exact = _save(test / "glioma" / "x.png", _phantom(0))  # same pixels, new name
    leaked_near = _save(test / "glioma" / "y.jpg", _jpeg(Image.fromarray(_phantom(1))))  # other label
    leaked_edit = _save(test / "meningioma" / "z.png", _brighter(_cropped(Image.fromarray(_phantom(3)), 0.03)))
    clean = [_save(test / PHANTOM_CLASSES[i % 2] / f"s{i}.png", _phantom(i)) for i in range(10, 14)]
    return train, test, [leaked_exact, *clean, leaked_near, leaked_edit]


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
