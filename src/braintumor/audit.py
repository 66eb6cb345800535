"""Dataset audit: unreadable files, exact and near duplicates, label conflicts and train/test leakage.

Exact duplicates share a BLAKE2b hash of the decoded RGB pixels, so a PNG and a BMP of the same pixels
match. Near duplicates differ in at most ``threshold`` bits of a 256-bit DCT perceptual hash (pHash,
Zauner 2010) of the image's content box. Hashes are computed once per file and cached on disk keyed by
absolute path, size and mtime; the neighbour search is multi-index hashing (Norouzi et al. 2012), so it
never compares all pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from braintumor.errors import UserError
from braintumor.images import IMAGE_EXTENSIONS, ImageReadError, read_image

HASH_SIDE = 16  # the hash keeps the 16x16 lowest DCT frequencies: 256 bits
HASH_BITS = HASH_SIDE * HASH_SIDE
# Validated in tests/test_audit.py: resized, JPEG q70, +20 brightness and 2-3 %-cropped copies of
# phantom slices stay within 12 bits, different phantoms 40 or more apart. On the real MRI training set
# pairs up to 20 bits apart are one slice re-encoded, re-scaled or re-contrasted, while neighbouring
# slices of one series start at about 22; 64-bit pHash could not separate the two at any threshold.
DEFAULT_THRESHOLD = 16
BOX_MASS_TAIL = 0.005  # foreground mass left outside the content box on each side
HASH_VERSION = "v1"  # bump when a record's content changes so stale cache entries are ignored
MD_LIST_LIMIT = 20


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/braintumor/audit`` (else ``~/.cache/...``): data folders may be read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "braintumor" / "audit"


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
        db = sqlite3.connect(path, timeout=60)
        db.execute(schema)
    except (OSError, sqlite3.Error) as error:
        # A read-only home must not stop an audit: hash everything, keep nothing.
        warnings.warn(f"hash cache unavailable at {path} ({error}); hashing without a cache", stacklevel=3)
        db = sqlite3.connect(":memory:")
        db.execute(schema)
    return db, path


def hash_files(paths, *, cache_dir=None, progress: bool = False) -> tuple[list[dict], dict]:
    """Per-file records (``exact``, ``phash``, size, mode, or ``error``) in input order, and cache stats.

    Records are cached by (absolute path, size, mtime_ns); missing ones are computed in threads (PIL
    decodes and resizes without the GIL, and threads need no pickling).
    """
    keys = {}
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise UserError(f"cannot read {path}: {error.strerror}") from None
        keys[os.path.abspath(path)] = (stat.st_size, stat.st_mtime_ns)
    db, cache_path = _open_cache(cache_dir)
    records = {}
    try:
        names = list(keys)
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            rows = db.execute(f"SELECT * FROM records WHERE path IN ({','.join('?' * len(chunk))})", chunk)
            records.update({p: json.loads(r) for p, size, mtime, r in rows if keys[p] == (size, mtime)})
        missing = [name for name in names if name not in records]
        with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 1)) as pool:
            results = pool.map(_compute_record, missing)
            if progress and missing:
                from tqdm import tqdm

                results = tqdm(results, total=len(missing), desc="hashing", unit="img")
            for done, (name, record) in enumerate(zip(missing, results), 1):
                records[name] = record
                db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                           (name, *keys[name], json.dumps(record)))
                if done % 1000 == 0:  # an interrupted run keeps what it hashed
                    db.commit()
        db.commit()
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


def _check_threshold(threshold) -> None:
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
    _check_threshold(threshold)
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


def _members(labels) -> dict:
    members = defaultdict(list)
    for index, label in enumerate(labels.tolist() if isinstance(labels, np.ndarray) else labels):
        members[label].append(index)
    return members


def near_pairs(hashes, threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """All index pairs ``(i, j)``, ``i < j``, of hashes that differ in at most ``threshold`` bits."""
    inverse, pairs = _distinct_near_pairs(list(hashes), threshold)
    members = _members(inverse)
    found = [(a, b) for group in members.values() for k, a in enumerate(group) for b in group[k + 1:]]
    found += [(min(a, b), max(a, b)) for u, v in pairs.tolist() for a in members[u] for b in members[v]]
    return np.asarray(sorted(found), dtype=np.int64).reshape(-1, 2)


def _group_ids(records: list[dict], threshold: int) -> np.ndarray:
    """Connected components of the near-duplicate graph (union-find); exact copies share a hash."""
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
    return _group_ids(hash_files(list(paths), cache_dir=cache_dir, progress=progress)[0], threshold).tolist()


def _cross_pairs(first: list[dict], second: list[dict], threshold: int) -> list[tuple[int, int, str, int]]:
    """Sorted ``(i, j, kind, distance)`` for each record i of ``first`` duplicating record j of ``second``."""
    readable = [(0, i) for i, r in enumerate(first) if "error" not in r]
    readable += [(1, j) for j, r in enumerate(second) if "error" not in r]
    inverse, pairs = _distinct_near_pairs([(first, second)[s][k]["phash"] for s, k in readable], threshold)
    members = _members(inverse)
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
    leaked = {i for i, _, _, _ in _cross_pairs(test, train, threshold)}
    return [i not in leaked for i in range(len(test))]


# ---------------------------------------------------------------- report


def _load_set(root, cache_dir, progress) -> dict:
    """Absolute paths, labels (class folders, else None) and hash records of one image folder."""
    from braintumor.data import discover

    root = Path(root)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "not found"
        raise UserError(f"data folder {root} {problem}: pass a folder of images or of class folders")
    if any(entry.is_dir() and not entry.name.startswith(".") for entry in root.iterdir()):
        index = discover(root)
        paths, labels = index.paths, [index.classes[label] for label in index.labels]
    else:
        paths, labels = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                               and p.suffix.lower() in IMAGE_EXTENSIONS), None
        if not paths:
            raise UserError(f"no images in {root}: expected image files or class folders of images")
    records, cache = hash_files(paths, cache_dir=cache_dir, progress=progress)
    return {"root": os.path.abspath(root), "paths": [os.path.abspath(p) for p in paths], "labels": labels,
            "records": records, "cache": cache}


def _summary(data: dict) -> dict:
    records, counts = data["records"], Counter(data["labels"] or [])
    readable = [r for r in records if "error" not in r]
    return {
        "root": data["root"], "n_images": len(records), "n_readable": len(readable),
        "class_counts": dict(sorted(counts.items())) if counts else None,
        "class_fractions": {k: v / len(records) for k, v in sorted(counts.items())} if counts else None,
        "imbalance_ratio": max(counts.values()) / min(counts.values()) if counts else None,
        "unreadable": [{"path": p, "reason": r["error"]} for p, r in zip(data["paths"], records) if "error" in r],
        "image_sizes": dict(Counter(f"{r['width']}x{r['height']}" for r in readable).most_common()),
        "image_modes": dict(Counter(r["mode"] for r in readable).most_common()),
    }


def _duplicates(data: dict, threshold: int) -> dict:
    paths, labels, records = data["paths"], data["labels"], data["records"]
    groups = [m for m in _members(_group_ids(records, threshold)).values() if len(m) > 1]
    exact = [m for m in _members([r.get("exact", f"unreadable {i}") for i, r in enumerate(records)]).values()
             if len(m) > 1]
    near = [m for m in groups if len({records[i]["exact"] for i in m}) > 1]  # two or more pixel contents
    conflicts = [m for m in groups if labels is not None and len({labels[i] for i in m}) > 1]

    def listed(found):
        return [[paths[i] for i in m] for m in sorted(found, key=lambda m: (-len(m), paths[m[0]]))]

    def counts(found):
        return {"n_groups": len(found), "n_images": sum(map(len, found)),
                "n_redundant": sum(len(m) - 1 for m in found)}

    n_readable = sum("error" not in r for r in records)
    return {
        "exact_duplicates": {**counts(exact), "groups": listed(exact)},
        "near_duplicates": {**counts(near), "groups": listed(near)},
        "duplicate_groups": {**counts(groups), "largest": max(map(len, groups), default=0),
                             "n_unique_images": n_readable - counts(groups)["n_redundant"]},
        "label_conflicts": {**counts(conflicts), "groups": [
            {"paths": [paths[i] for i in m], "labels": [labels[i] for i in m]}
            for m in sorted(conflicts, key=lambda m: (-len(m), paths[m[0]]))]},
    }


def _leaks(data: dict, other: dict, threshold: int) -> dict:
    """Images of ``other`` (e.g. the test set) that duplicate an image of ``data`` (the training set)."""
    pairs = _cross_pairs(data["records"], other["records"], threshold)
    leaked, n_other = {j for _, j, _, _ in pairs}, len(other["records"])
    leaked_exact = {j for _, j, kind, _ in pairs if kind == "exact"}
    listed = [{"data": data["paths"][i], "against": other["paths"][j], "kind": kind, "distance": distance,
               "data_label": data["labels"][i] if data["labels"] else None,
               "against_label": other["labels"][j] if other["labels"] else None} for i, j, kind, distance in pairs]
    return {
        "leaked_images": len(leaked), "leaked_fraction": len(leaked) / n_other,
        "exact_leaked_images": len(leaked_exact), "exact_leaked_fraction": len(leaked_exact) / n_other,
        "data_images_involved": len({i for i, _, _, _ in pairs}),
        "n_pairs": len(pairs), "n_exact_pairs": len([p for p in pairs if p[2] == "exact"]),
        "n_label_conflicts": sum(None not in (p["data_label"], p["against_label"])
                                 and p["data_label"] != p["against_label"] for p in listed),
        "pairs": listed,
    }


def audit(data_root, against=None, *, threshold: int = DEFAULT_THRESHOLD, cache_dir=None,
          progress: bool = False) -> dict:
    """Audit an image folder and, with ``against`` (e.g. the test set), its leakage; a JSON-able report.

    Labels come from class folders when ``data_root`` has them. Leak figures count the images of
    ``against`` that are exact or near duplicates of an image of ``data_root`` (the training set).
    """
    _check_threshold(threshold)
    start = time.perf_counter()
    data = _load_set(data_root, cache_dir, progress)
    report = {"format_version": 1, "threshold": int(threshold),
              "method": {"exact": "BLAKE2b-128 of the decoded RGB pixels and their shape",
                         "near": f"{HASH_BITS}-bit DCT pHash of the content box, Hamming distance <= {threshold}"},
              **_summary(data), **_duplicates(data, threshold), "against": None, "leaks": None}
    report["summary"] = {
        "images": report["n_images"], "unreadable": len(report["unreadable"]),
        "exact_duplicate_groups": report["exact_duplicates"]["n_groups"],
        "near_duplicate_groups": report["near_duplicates"]["n_groups"],
        "images_in_duplicate_groups": report["duplicate_groups"]["n_images"],
        "label_conflict_groups": report["label_conflicts"]["n_groups"]}
    report["cache"] = data["cache"]
    if against is not None:
        other = _load_set(against, cache_dir, progress)
        report.update(against=_summary(other), leaks=_leaks(data, other, threshold))
        report["summary"].update(against_images=len(other["records"]), leaked_images=report["leaks"]["leaked_images"])
        report["cache"] = {**data["cache"], **{k: data["cache"][k] + other["cache"][k] for k in ("hits", "computed")}}
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _truncated(items: list[str]) -> list[str]:
    more = [f"\n... and {len(items) - MD_LIST_LIMIT} more (all listed in audit.json)"]
    return items[:MD_LIST_LIMIT] + (more if len(items) > MD_LIST_LIMIT else []) + [""]


def _markdown(report: dict) -> str:
    root, other_root = report["root"], (report["against"] or {}).get("root", "")
    exact, near, groups = report["exact_duplicates"], report["near_duplicates"], report["duplicate_groups"]
    conflicts, leaks = report["label_conflicts"], report["leaks"]

    def files(paths, labels=None, base=root):
        return ", ".join(f"`{os.path.relpath(p, base)}`" + (f" ({labels[k]})" if labels else "")
                         for k, p in enumerate(paths))

    lines = [f"# Dataset audit of `{root}`", "",
             "Exact duplicates have identical decoded pixels; near duplicates differ in at most "
             f"{report['threshold']} of the {HASH_BITS} bits of a perceptual hash. Paths are relative to the "
             "audited folder.", "",
             "| | count |", "|---|---:|", f"| images | {report['n_images']} |",
             f"| unreadable | {len(report['unreadable'])} |",
             f"| exact-duplicate groups (images, redundant copies) | {exact['n_groups']} "
             f"({exact['n_images']}, {exact['n_redundant']}) |",
             f"| near-duplicate groups (images) | {near['n_groups']} ({near['n_images']}) |",
             f"| all duplicate groups (images, redundant copies) | {groups['n_groups']} "
             f"({groups['n_images']}, {groups['n_redundant']}) |",
             f"| distinct images | {groups['n_unique_images']} |",
             f"| groups with conflicting labels (images) | {conflicts['n_groups']} ({conflicts['n_images']}) |", ""]
    if report["class_counts"]:
        lines += ["## Class balance", "", "| class | images | share |", "|---|---:|---:|"]
        lines += [f"| {name} | {count} | {report['class_fractions'][name]:.1%} |"
                  for name, count in report["class_counts"].items()]
        lines += ["", f"Largest / smallest class: {report['imbalance_ratio']:.2f}", ""]
    lines += ["## Image sizes and modes", "",
              "Sizes (WxH): " + ", ".join(f"{k}: {v}" for k, v in list(report["image_sizes"].items())[:10]), "",
              "Modes: " + ", ".join(f"{k}: {v}" for k, v in report["image_modes"].items()), ""]
    sections = {"Unreadable files": [f"{files([u['path']])}: {u['reason']}" for u in report["unreadable"]],
                "Groups with conflicting labels": [files(g["paths"], g["labels"]) for g in conflicts["groups"]],
                "Exact-duplicate groups": [files(g) for g in exact["groups"]],
                "Near-duplicate groups": [files(g) for g in near["groups"]]}
    for title, items in sections.items():
        if items:
            lines += [f"## {title}", ""] + _truncated([f"{k}. {item}" for k, item in enumerate(items, 1)])
    if leaks is not None:
        lines += [f"## Leakage: images of `{other_root}` that duplicate this set", "",
                  f"{leaks['leaked_images']} of {report['against']['n_images']} images "
                  f"({leaks['leaked_fraction']:.1%}) duplicate an image of this set; {leaks['exact_leaked_images']} "
                  f"({leaks['exact_leaked_fraction']:.1%}) are pixel-identical. {leaks['data_images_involved']} "
                  f"images of this set are involved; {leaks['n_label_conflicts']} pairs carry different labels.", ""]
        if leaks["pairs"]:
            lines += ["| this set | other set | kind | distance |", "|---|---|---|---:|"] + _truncated(
                [f"| {files([pair['data']])} | {files([pair['against']], base=other_root)} | {pair['kind']} | "
                 f"{pair['distance']} |" for pair in leaks["pairs"]])
    return "\n".join(lines)


def write_audit(report: dict, out_dir) -> tuple[Path, Path]:
    """Write ``audit.json`` (everything) and ``audit.md`` (counts, long lists truncated) into ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {out_dir}: {error.strerror}") from None
    json_path, md_path = out_dir / "audit.json", out_dir / "audit.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(_markdown(report).rstrip("\n") + "\n", encoding="utf-8")
    return json_path, md_path
