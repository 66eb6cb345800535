"""audit.py: planted exact and near duplicates, label conflicts, leakage, the Markdown report, cached re-runs."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from braintumor.data import audit as audit_module
from braintumor.data import dedup
from braintumor.data.audit import audit, write_audit
from braintumor.data.dedup import default_cache_dir, image_hashes
from braintumor.errors import UserError
from braintumor.synthetic.phantom import PHANTOM_CLASSES

from helpers import SIZE, phantom_pixels, planted_folder, save_image, train_and_test_folders


# ---------------------------------------------------------------- audits of planted folders


def test_audit_finds_planted_exact_and_near_duplicates_and_the_label_conflict(tmp_path):
    root, files = planted_folder(tmp_path)
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


def test_audit_across_two_folders_reports_leaks(tmp_path):
    train, test, _ = train_and_test_folders(tmp_path)
    report = audit(train, against=test)
    leaks = report["leaks"]
    assert (leaks["leaked_images"], leaks["exact_leaked_images"], leaks["n_label_conflicts"]) == (3, 1, 1)
    assert leaks["leaked_fraction"] == pytest.approx(3 / 7)
    assert report["summary"]["leaked_images"] == 3 and report["against"]["n_images"] == 7
    by_test_file = {Path(p["against"]).name: (Path(p["data"]).name, p["kind"]) for p in leaks["pairs"]}
    assert by_test_file == {"x.png": ("t0.png", "exact"), "y.jpg": ("t1.png", "near"), "z.png": ("t3.png", "near")}
    assert report["exact_duplicates"]["n_groups"] == 0  # the training set itself is clean

    json_path, md_path = write_audit(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    markdown = md_path.read_text()
    assert "Other side: 3 of 7 images (42.9%) duplicate an image of this set; 1 (14.3%) are pixel-identical" in markdown
    assert "| `glioma/t0.png` | `glioma/x.png` | exact |" in markdown


def test_flat_folder_and_user_errors(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        save_image(flat / f"{i}.png", phantom_pixels(i))
    save_image(flat / "dup.bmp", phantom_pixels(0))
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
        save_image(root / "glioma" / f"{i}.png", phantom_pixels(i))
        save_image(root / "notumor" / f"{i}.bmp", phantom_pixels(i))
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
    paths = [save_image(root / PHANTOM_CLASSES[i % 2] / f"{i}.png", phantom_pixels(i)) for i in range(6)]
    calls, lock = [], threading.Lock()
    compute = dedup._compute_record

    def counting(path):
        with lock:
            calls.append(Path(path).name)
        return compute(path)

    monkeypatch.setattr(dedup, "_compute_record", counting)
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
    save_image(paths[3], phantom_pixels(0))
    os.utime(paths[3], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    third = audit(root)
    assert calls[6:] == ["3.png"]
    assert third["exact_duplicates"]["groups"] == [sorted([str(paths[0].resolve()), str(paths[3].resolve())])]
    assert image_hashes(paths[3]) == image_hashes(paths[0]) and len(calls) == 7  # served from the cache


# ---------------------------------------------------------------- the real data set (opt-in)


@pytest.mark.skipif(not os.environ.get("BRAINTUMOR_REAL_DATA"), reason="set BRAINTUMOR_REAL_DATA to a data folder")
def test_real_data_audit_runs(tmp_path):
    report = audit(os.environ["BRAINTUMOR_REAL_DATA"], cache_dir=tmp_path / "cache")
    assert report["n_images"] > 0 and report["n_readable"] == report["n_images"] - len(report["unreadable"])
    assert report["duplicate_groups"]["largest"] < report["n_images"] / 20  # no runaway near-duplicate chains
    write_audit(report, tmp_path / "out")


def test_leak_headline_counts_the_audited_set_first(tmp_path, capsys):
    from braintumor.cli import main

    train, test, _ = train_and_test_folders(tmp_path)
    report = audit(test, against=train)  # a user auditing a test set against the training set
    leaks = report["leaks"]
    assert (leaks["audited_exact_images"], leaks["audited_duplicated_images"]) == (1, 3)
    assert report["leak_headline"].startswith(
        "1 of 7 images of test (14.3%) are pixel-identical to an image of train; 3 (42.9%) are exact or near "
        "duplicates of one. On the other side, 3 of 6 images of train")
    assert list(report["summary"])[:3] == ["images", "pixel_identical_to_against", "duplicating_against"]
    assert main(["audit", str(test), "--against", str(train), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == report["leak_headline"]
    markdown = (tmp_path / "out" / "audit.md").read_text().splitlines()
    assert markdown[2] == f"**Leakage:** {report['leak_headline']}"
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert list(saved["summary"])[1] == "pixel_identical_to_against"


def test_audit_reports_patient_groups_that_straddle_the_two_sets(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    for i in range(4):
        save_image(train / PHANTOM_CLASSES[i % 2] / f"patient{i}" / f"a{i}.png", phantom_pixels(i))
    for i in range(3, 6):  # patient3 appears in both sets, with a different slice
        save_image(test / PHANTOM_CLASSES[i % 2] / f"patient{i}" / f"b{i}.png", phantom_pixels(20 + i))
    report = audit(test, against=train)
    groups = report["groups"]
    assert groups["source"] == "per-patient sub-folders" and groups["n_groups"] == 3
    assert groups["straddling"] == [{"group": "patient3", "images": 1, "against_images": 1}]
    assert report["summary"]["straddling_groups"] == 1
    # The same from a CSV, whose paths are relative to its own folder.
    csv_file = tmp_path / "groups.csv"
    rows = [f"{p.relative_to(tmp_path)},case-{p.stem[1:]}" for p in sorted(tmp_path.rglob("*.png"))]
    csv_file.write_text("path,group\n" + "\n".join(rows) + "\n")
    by_csv = audit(test, against=train, groups=csv_file)["groups"]
    assert by_csv["source"] == str(csv_file) and [g["group"] for g in by_csv["straddling"]] == ["case-3"]


def test_hash_cache_folder_is_settable(tmp_path, monkeypatch, private_cache):
    assert default_cache_dir() == private_cache  # the platform's cache folder (XDG_CACHE_HOME on Linux)
    monkeypatch.setenv("BRAINTUMOR_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "audit"
    root = tmp_path / "data"
    paths = [save_image(root / PHANTOM_CLASSES[i % 2] / f"{i}.png", phantom_pixels(i)) for i in range(2)]
    assert paths and Path(audit(root)["cache"]["path"]).parent == tmp_path / "mine" / "audit"
