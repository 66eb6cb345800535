"""audit.py: planted exact and near duplicates, label conflicts, leakage, the hash cache, neighbour search."""

from __future__ import annotations

import io
import json
import os
import threading
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from braintumor import audit as audit_module
from braintumor.audit import (
    DEFAULT_THRESHOLD,
    HASH_BITS,
    audit,
    content_box,
    default_cache_dir,
    duplicate_groups,
    hamming,
    image_hashes,
    leak_free_mask,
    near_pairs,
    phash,
    write_audit,
)
from braintumor.errors import UserError
from braintumor.images import ImageReadError
from braintumor.phantom import PHANTOM_CLASSES, make_phantom

SIZE = 128  # phantom side: big enough that a 2 % crop removes whole pixels


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test hashes into its own cache under tmp_path (never the user's ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
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


# ---------------------------------------------------------------- audits of planted folders


def _save(path: Path, image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.save(path, **options)
    return path


@pytest.fixture
def planted(tmp_path):
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


def test_audit_finds_planted_exact_and_near_duplicates_and_the_label_conflict(planted):
    root, files = planted
    report = audit(root)
    assert report["n_images"] == 2 + 5 + 7 + 1 and report["n_readable"] == 14
    assert report["class_counts"] == {"glioma": 1 + 5 + 3, "notumor": 1 + 3 + 1 + 1}
    assert report["unreadable"] == [{"path": files["broken"][0], "reason": "truncated image"}]
    assert report["exact_duplicates"]["groups"] == [files["exact"]]
    assert report["exact_duplicates"]["n_redundant"] == 1
    assert report["near_duplicates"]["groups"] == [files["near"]]
    assert report["label_conflicts"]["groups"] == [{"paths": files["exact"], "labels": ["glioma", "notumor"]}]
    assert report["duplicate_groups"]["n_unique_images"] == 14 - 1 - 4
    assert report["image_sizes"] == {f"{SIZE}x{SIZE}": 12, "90x90": 1, "124x124": 1}
    assert report["image_modes"]["RGB"] == 1 and sum(report["image_modes"].values()) == 14
    assert report["leaks"] is None and report["summary"]["label_conflict_groups"] == 1
    json.dumps(report)  # JSON-able as promised


def test_duplicate_groups_agree_with_the_report(planted):
    root, files = planted
    paths = [p for key in ("distinct", "near", "exact", "broken") for p in files[key]]
    groups = dict(zip(paths, duplicate_groups(paths)))
    assert len({groups[p] for p in files["exact"]}) == 1
    assert len({groups[p] for p in files["near"]}) == 1
    singles = files["distinct"] + files["broken"] + files["exact"][:1] + files["near"][:1]
    assert len({groups[p] for p in singles}) == len(singles)


def test_audit_across_two_folders_reports_leaks_and_leak_free_mask(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    for i in range(6):
        _save(train / PHANTOM_CLASSES[i % 2] / f"t{i}.png", _phantom(i))
    leaked_exact = _save(test / "glioma" / "x.png", _phantom(0))  # same pixels, new name
    leaked_near = _save(test / "glioma" / "y.jpg", _jpeg(Image.fromarray(_phantom(1))))  # other label
    leaked_edit = _save(test / "meningioma" / "z.png", _brighter(_cropped(Image.fromarray(_phantom(3)), 0.03)))
    clean = [_save(test / PHANTOM_CLASSES[i % 2] / f"s{i}.png", _phantom(i)) for i in range(10, 14)]
    report = audit(train, against=test)
    leaks = report["leaks"]
    assert (leaks["leaked_images"], leaks["exact_leaked_images"], leaks["n_label_conflicts"]) == (3, 1, 1)
    assert leaks["leaked_fraction"] == pytest.approx(3 / 7)
    assert report["summary"]["leaked_images"] == 3 and report["against"]["n_images"] == 7
    by_test_file = {Path(p["against"]).name: (Path(p["data"]).name, p["kind"]) for p in leaks["pairs"]}
    assert by_test_file == {"x.png": ("t0.png", "exact"), "y.jpg": ("t1.png", "near"), "z.png": ("t3.png", "near")}
    assert report["exact_duplicates"]["n_groups"] == 0  # the training set itself is clean
    test_paths = [leaked_exact, *clean, leaked_near, leaked_edit]
    train_paths = sorted(train.rglob("*.png"))
    assert leak_free_mask(test_paths, train_paths) == [False, True, True, True, True, False, False]
    without_sources = [p for p in train_paths if p.name not in ("t0.png", "t1.png", "t3.png")]
    assert leak_free_mask(test_paths, without_sources) == [True] * 7

    json_path, md_path = write_audit(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    markdown = md_path.read_text()
    assert "3 of 7 images (42.9%) duplicate an image of this set; 1 (14.3%) are pixel-identical" in markdown
    assert "| `glioma/t0.png` | `glioma/x.png` | exact |" in markdown


def test_flat_folder_and_user_errors(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        _save(flat / f"{i}.png", _phantom(i))
    _save(flat / "dup.bmp", _phantom(0))
    report = audit(flat)
    assert report["class_counts"] is None and report["exact_duplicates"]["n_groups"] == 1
    with pytest.raises(UserError, match="not found"):
        audit(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        audit(tmp_path / "empty")


def test_markdown_truncates_long_lists_but_json_keeps_them(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for i in range(3):  # three exact pairs
        _save(root / "glioma" / f"{i}.png", _phantom(i))
        _save(root / "notumor" / f"{i}.bmp", _phantom(i))
    monkeypatch.setattr(audit_module, "MD_LIST_LIMIT", 1)
    report = audit(root)
    json_path, md_path = write_audit(report, tmp_path / "out")
    assert len(json.loads(json_path.read_text())["exact_duplicates"]["groups"]) == 3
    markdown = md_path.read_text()
    assert "... and 2 more (all listed in audit.json)" in markdown
    assert "| exact-duplicate groups (images, redundant copies) | 3 (6, 3) |" in markdown


# ---------------------------------------------------------------- cache


def test_hashes_are_cached_and_a_changed_file_is_rehashed(tmp_path, monkeypatch, private_cache):
    root = tmp_path / "data"
    paths = [_save(root / PHANTOM_CLASSES[i % 2] / f"{i}.png", _phantom(i)) for i in range(6)]
    calls, lock = [], threading.Lock()
    compute = audit_module._compute_record

    def counting(path):
        with lock:
            calls.append(Path(path).name)
        return compute(path)

    monkeypatch.setattr(audit_module, "_compute_record", counting)
    first = audit(root)
    assert len(calls) == 6 and first["cache"]["computed"] == 6
    assert Path(first["cache"]["path"]).parent == private_cache == default_cache_dir()
    assert not any(p.name.startswith(".") for p in root.rglob("*"))  # nothing written into the data folder
    second = audit(root)
    assert len(calls) == 6 and second["cache"]["hits"] == 6
    assert {k: v for k, v in second.items() if k not in ("cache", "seconds")} == \
        {k: v for k, v in first.items() if k not in ("cache", "seconds")}

    # Overwrite 3.png with a copy of 0.png's pixels; the new mtime/size must invalidate its entry.
    before = os.stat(paths[3])
    _save(paths[3], _phantom(0))
    os.utime(paths[3], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    third = audit(root)
    assert calls[6:] == ["3.png"]
    assert third["exact_duplicates"]["groups"] == [sorted([str(paths[0].resolve()), str(paths[3].resolve())])]
    assert image_hashes(paths[3]) == image_hashes(paths[0]) and len(calls) == 7  # served from the cache


def test_image_hashes_of_an_unreadable_file_raise(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        image_hashes(path)


# ---------------------------------------------------------------- the real data set (opt-in)


@pytest.mark.skipif(not os.environ.get("BRAINTUMOR_REAL_DATA"), reason="set BRAINTUMOR_REAL_DATA to a data folder")
def test_real_data_audit_runs(tmp_path):
    report = audit(os.environ["BRAINTUMOR_REAL_DATA"], cache_dir=tmp_path / "cache")
    assert report["n_images"] > 0 and report["n_readable"] == report["n_images"] - len(report["unreadable"])
    assert report["duplicate_groups"]["largest"] < report["n_images"] / 20  # no runaway near-duplicate chains
    write_audit(report, tmp_path / "out")
