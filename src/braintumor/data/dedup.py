"""Exact and near duplicate detection: image hashes, their on-disk cache, neighbour search, duplicate groups.

Exact duplicates share a BLAKE2b hash of the decoded RGB pixels, so a PNG and a BMP of the same pixels
match. Near duplicates differ in at most ``threshold`` bits of a 256-bit DCT perceptual hash (pHash,
Zauner 2010) of the image's content box. Hashes are computed once per file and cached on disk keyed by
absolute path, size and mtime; the neighbour search is multi-index hashing (Norouzi et al. 2012), so it
never compares all pairs. Used by the audit report, the grouped train/val split and leak-free evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import warnings
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from braintumor.errors import UserError
from braintumor.data.io import ImageReadError, read_image

HASH_SIDE = 16  # the hash keeps the 16x16 lowest DCT frequencies: 256 bits
HASH_BITS = HASH_SIDE * HASH_SIDE
# Validated in tests/test_dedup.py: resized, JPEG q70, +20 brightness and 2-3 %-cropped copies of
# phantom slices stay within 12 bits, different phantoms 40 or more apart. On the real MRI training set
# pairs up to 20 bits apart are one slice re-encoded, re-scaled or re-contrasted, while neighbouring
# slices of one series start at about 22; 64-bit pHash could not separate the two at any threshold.
DEFAULT_THRESHOLD = 16
BOX_MASS_TAIL = 0.005  # foreground mass left outside the content box on each side
CACHE_LOCK_WAIT_SECONDS = 10.0  # then hash without the cache rather than wait on another process
HASH_VERSION = "v1"  # bump when a record's content changes so stale cache entries are ignored


def default_cache_dir() -> Path:
    """``$BRAINTUMOR_CACHE_DIR/audit``, else ``audit`` in the platform's user cache folder for braintumor
    (platformdirs: ``$XDG_CACHE_HOME/braintumor`` or ``~/.cache/braintumor`` on Linux, ``~/Library/Caches/braintumor``
    on macOS, ``%LOCALAPPDATA%\\braintumor\\Cache`` on Windows). Never the data folder, which may be read-only."""
    configured = os.environ.get("BRAINTUMOR_CACHE_DIR")
    if configured:
        return Path(configured).expanduser() / "audit"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("braintumor", appauthor=False)) / "audit"


# ---------------------------------------------------------------- hashing


def content_box(gray: np.ndarray) -> tuple[float, float, float, float]:
    """Sub-pixel box ``(x0, y0, x1, y1)`` holding the central 99 % of the foreground mass on each axis.

    Foreground is the intensity above background + 10 % of the 1st-99th percentile range, so dark
    margins, padding, a uniform brightness shift and JPEG noise do not move the box relative to the
    content. Flat images and boxes under 20 % of a side give the full frame.
    """
    values = np.asarray(gray, dtype=np.float32)
    height, width = values.shape
    low, high = np.percentile(values, [1, 99])
    mass = np.clip(values - (low + 0.1 * (high - low)), 0, None)
    total = float(mass.sum())
    if high - low < 1e-3 or total <= 0:
        return 0.0, 0.0, float(width), float(height)
    edges = []
    for profile, length in ((mass.sum(axis=0), width), (mass.sum(axis=1), height)):
        cumulative = np.concatenate([[0.0], np.cumsum(profile, dtype=np.float64) / total])
        edges.append(np.interp([BOX_MASS_TAIL, 1 - BOX_MASS_TAIL], cumulative, np.arange(length + 1)))
    (x0, x1), (y0, y1) = edges
    if x1 - x0 < 0.2 * width or y1 - y0 < 0.2 * height:
        return 0.0, 0.0, float(width), float(height)
    return float(x0), float(y0), float(x1), float(y1)


def phash(gray: np.ndarray, *, crop_to_content: bool = True) -> int:
    """256-bit pHash of a 2-D array: 64x64 Lanczos resize, 2-D DCT-II, 16x16 low band vs its AC median.

    imagehash's ``phash(hash_size=16)`` but the median leaves out the DC term (a uniform brightness
    shift changes no bit) and, with ``crop_to_content``, the resize reads only ``content_box(gray)``,
    so cropped margins, padding and re-scaling barely move the hash. Bit 255 (most significant) is
    coefficient (0, 0), then row-major. Half the AC bits are set, so distances are always even.
    """
    from scipy.fft import dctn  # here, not at the top: the CLI's parser imports this module (--help stays fast)

    values = np.ascontiguousarray(gray, dtype=np.float32)
    box = content_box(values) if crop_to_content else None
    small = Image.fromarray(values).resize((4 * HASH_SIDE,) * 2, Image.Resampling.LANCZOS, box=box)
    low = dctn(np.asarray(small, dtype=np.float64), type=2, norm="ortho")[:HASH_SIDE, :HASH_SIDE].ravel()
    return int.from_bytes(np.packbits(low > np.median(low[1:])).tobytes(), "big")


def _compute_record(path: str) -> dict:
    """Decode one file: hashes, size and mode as stored, or the reason it cannot be read."""
    try:
        image = read_image(path)
    except ImageReadError as error:
        return {"error": error.reason}
    return record_from_image(path, image)


def record_from_image(path, image: Image.Image) -> dict:
    """The hash record of a file from its decoded image (:func:`braintumor.data.io.read_image`'s RGB image)."""
    try:
        with Image.open(path) as original:  # reads the header only
            width, height, mode = *original.size, original.mode
    except Exception:  # noqa: BLE001 - DICOM, which PIL cannot open but read_image can
        width, height, mode = *image.size, "DICOM"
    pixels = np.ascontiguousarray(image)
    digest = hashlib.blake2b(repr(pixels.shape).encode(), digest_size=16)
    digest.update(pixels.tobytes())
    return {"exact": digest.hexdigest(), "phash": phash(np.asarray(image.convert("L"))),
            "width": width, "height": height, "mode": mode}


def _open_cache(cache_dir) -> tuple[sqlite3.Connection, Path]:
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"hashes-{HASH_VERSION}.sqlite"
    schema = "CREATE TABLE IF NOT EXISTS records (path TEXT PRIMARY KEY, size INT, mtime_ns INT, record TEXT)"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=CACHE_LOCK_WAIT_SECONDS)
        db.execute(schema)
    except (OSError, sqlite3.Error) as error:
        # A read-only home must not stop an audit: hash everything, keep nothing.
        warnings.warn(f"hash cache unavailable at {path} ({error}); hashing without a cache", stacklevel=3)
        db = sqlite3.connect(":memory:")
        db.execute(schema)
    return db, path


def _memory_cache(path: Path, error: Exception) -> sqlite3.Connection:
    """Fall back to no cache when the on-disk one fails mid-run (e.g. locked by another process)."""
    warnings.warn(f"hash cache {path} unavailable ({error}; waited {CACHE_LOCK_WAIT_SECONDS} s); "
                  "continuing without a cache", stacklevel=3)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE IF NOT EXISTS records (path TEXT PRIMARY KEY, size INT, mtime_ns INT, record TEXT)")
    return db


def _db_key(name: str) -> str | bytes:
    """The cache key of an absolute path: the path itself, or its bytes (a BLOB, which never equals a TEXT key)
    when the file system name is not valid UTF-8 (Python holds such names with surrogate escapes, which SQLite
    refuses)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape")
    return name


def hash_files(paths, *, cache_dir=None, progress: bool = False,
                compute: Callable[[str], dict] | None = None) -> tuple[list[dict], dict]:
    """Per-file records (``exact``, ``phash``, size, mode, or ``error``) in input order, and cache stats.

    Records are cached by (absolute path, size, mtime_ns); missing ones are computed in threads (PIL
    decodes and resizes without the GIL, and threads need no pickling) by ``compute`` (absolute path ->
    record; by default decode and hash), which lets a caller keep what it decoded.
    """
    keys, records = {}, {}
    for path in paths:
        name = os.path.abspath(path)
        try:
            stat = os.stat(path)
        except OSError as error:  # a dangling or self-referential link: listed as unreadable, not fatal
            records[name] = {"error": f"cannot access file ({error.strerror})"}
            continue
        keys[name] = (stat.st_size, stat.st_mtime_ns)
    db, cache_path = _open_cache(cache_dir)
    try:
        names = list(keys)
        name_of = {_db_key(name): name for name in names}
        try:
            for start in range(0, len(names), 500):
                chunk = [_db_key(name) for name in names[start:start + 500]]
                rows = db.execute(f"SELECT * FROM records WHERE path IN ({','.join('?' * len(chunk))})", chunk)
                records.update({name_of[p]: json.loads(r) for p, size, mtime, r in rows
                                if p in name_of and keys[name_of[p]] == (size, mtime)})
        except sqlite3.Error as error:  # e.g. locked by another audit for longer than we wait
            db.close()
            db = _memory_cache(cache_path, error)
        missing = [name for name in names if name not in records]
        with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 1)) as pool:
            results = pool.map(compute or _compute_record, missing)
            if progress and missing:
                from tqdm import tqdm

                results = tqdm(results, total=len(missing), desc="hashing", unit="img")
            for done, (name, record) in enumerate(zip(missing, results), 1):
                records[name] = record
                try:
                    db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                               (_db_key(name), *keys[name], json.dumps(record)))
                    if done % 1000 == 0:  # an interrupted run keeps what it hashed
                        db.commit()
                except sqlite3.Error as error:
                    db.close()
                    db = _memory_cache(cache_path, error)
        try:
            db.commit()
        except sqlite3.Error as error:
            _memory_cache(cache_path, error).close()
    finally:
        db.close()
    stats = {"hits": len(keys) - len(missing), "computed": len(missing), "path": str(cache_path)}
    return [records[os.path.abspath(path)] for path in paths], stats


def image_hashes(path, *, cache_dir=None) -> tuple[str, int]:
    """``(exact, phash)`` of one image file (cached); raises ImageReadError when it cannot be decoded."""
    record = hash_files([path], cache_dir=cache_dir)[0][0]
    if "error" in record:
        raise ImageReadError(str(path), record["error"])
    return record["exact"], record["phash"]


# ---------------------------------------------------------------- neighbour search


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (int(a) ^ int(b)).bit_count()


def check_threshold(threshold) -> None:
    """UserError unless ``threshold`` is a whole number of bits in 0..64."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not 0 <= threshold <= 64:
        raise UserError(f"duplicate threshold must be a whole number of bits in 0..64 (of {HASH_BITS}), "
                        f"got {threshold!r}")


def _distances(words_a: np.ndarray, words_b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distances between (n, HASH_BITS // 64) uint64 arrays."""
    xor = words_a ^ words_b
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(xor).sum(axis=1, dtype=np.int64)
    return np.unpackbits(xor.view(np.uint8), axis=1).sum(axis=1, dtype=np.int64)


def _row_keys(packed: np.ndarray) -> np.ndarray:
    """One sortable key per row of packed bytes: a uint64 when the block fits, else a row label."""
    if packed.shape[1] > 8:
        return np.unique(packed, axis=0, return_inverse=True)[1].reshape(-1)
    padded = np.zeros((len(packed), 8), np.uint8)
    padded[:, :packed.shape[1]] = packed
    return padded.view(">u8").reshape(-1)


def _distinct_near_pairs(hashes, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inverse, pairs)``: the distinct hash of each input, and the pairs of distinct hashes within threshold.

    Multi-index hashing: split the bits into ``threshold + 1`` blocks; by pigeonhole two hashes within
    the threshold agree exactly on at least one block, so only pairs sharing a block are verified.
    """
    check_threshold(threshold)
    raw = b"".join(int(h).to_bytes(HASH_BITS // 8, "big") for h in hashes)
    words = np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, HASH_BITS // 64)
    words, inverse = np.unique(words, axis=0, return_inverse=True)
    bits = np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)
    found = [np.empty((0, 2), np.int64)]
    bounds = np.linspace(0, HASH_BITS, threshold + 2).round().astype(int)
    for low, high in zip(bounds[:-1], bounds[1:]):
        keys = _row_keys(np.packbits(bits[:, low:high], axis=1))
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        # Walk offsets 1, 2, ... inside runs of equal keys; positions whose run has ended drop out,
        # so the work is proportional to the number of candidate pairs, not to n^2.
        active, offset = np.arange(len(order) - 1), 1
        while active.size:
            active = active[sorted_keys[active] == sorted_keys[active + offset]]
            left, right = order[active], order[active + offset]
            close = _distances(words[left], words[right]) <= threshold
            found.append(np.stack([np.minimum(left, right)[close], np.maximum(left, right)[close]], axis=1))
            offset += 1
            active = active[active + offset < len(order)]
    return inverse.reshape(-1), np.unique(np.concatenate(found), axis=0)


def members_by_label(labels) -> dict:
    """label -> indices holding it, in first-appearance order."""
    members = defaultdict(list)
    for index, label in enumerate(labels.tolist() if isinstance(labels, np.ndarray) else labels):
        members[label].append(index)
    return members


def near_pairs(hashes, threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """All index pairs ``(i, j)``, ``i < j``, of hashes that differ in at most ``threshold`` bits."""
    inverse, pairs = _distinct_near_pairs(list(hashes), threshold)
    members = members_by_label(inverse)
    found = [(a, b) for group in members.values() for k, a in enumerate(group) for b in group[k + 1:]]
    found += [(min(a, b), max(a, b)) for u, v in pairs.tolist() for a in members[u] for b in members[v]]
    return np.asarray(sorted(found), dtype=np.int64).reshape(-1, 2)


def group_ids(records: list[dict], threshold: int) -> np.ndarray:
    """Connected components of the near-duplicate graph (union-find); exact copies share a hash."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    readable = [i for i, r in enumerate(records) if "error" not in r]
    inverse, pairs = _distinct_near_pairs([records[i]["phash"] for i in readable], threshold)
    n = len(np.unique(inverse))
    component = connected_components(coo_matrix((np.ones(len(pairs)), pairs.T), shape=(n, n)), directed=False)[1]
    groups = np.arange(len(records)) + n  # unreadable files stand alone
    groups[readable] = component[inverse]
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def duplicate_groups(paths, threshold: int = DEFAULT_THRESHOLD, *, cache_dir=None,
                     progress: bool = False) -> list[int]:
    """One group id per path: exact and near duplicates share an id, merged transitively."""
    return group_ids(hash_files(list(paths), cache_dir=cache_dir, progress=progress)[0], threshold).tolist()


def cross_pairs(first: list[dict], second: list[dict], threshold: int) -> list[tuple[int, int, str, int]]:
    """Sorted ``(i, j, kind, distance)`` for each record i of ``first`` duplicating record j of ``second``."""
    readable = [(0, i) for i, r in enumerate(first) if "error" not in r]
    readable += [(1, j) for j, r in enumerate(second) if "error" not in r]
    inverse, pairs = _distinct_near_pairs([(first, second)[s][k]["phash"] for s, k in readable], threshold)
    members = members_by_label(inverse)
    found = set()
    for u, v in [(u, u) for u in members] + pairs.tolist() + pairs[:, ::-1].tolist():
        for i in (readable[m][1] for m in members[u] if readable[m][0] == 0):
            for j in (readable[m][1] for m in members[v] if readable[m][0] == 1):
                kind = "exact" if first[i]["exact"] == second[j]["exact"] else "near"
                found.add((i, j, kind, hamming(first[i]["phash"], second[j]["phash"])))
    return sorted(found)


def leak_free_mask(test_paths, train_paths, threshold: int = DEFAULT_THRESHOLD, *, cache_dir=None,
                   progress: bool = False) -> list[bool]:
    """True where a test image has no exact or near duplicate among the training images."""
    test, _ = hash_files(list(test_paths), cache_dir=cache_dir, progress=progress)
    train, _ = hash_files(list(train_paths), cache_dir=cache_dir, progress=progress)
    leaked = {i for i, _, _, _ in cross_pairs(test, train, threshold)}
    return [i not in leaked for i in range(len(test))]
