"""Dataset audit: unreadable files, exact and near duplicates, label conflicts and train/test leakage.

The report (``audit``) is JSON-able; ``write_audit`` adds a Markdown summary. Hashing, the hash cache and
the duplicate search are in :mod:`braintumor.data.dedup`.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from braintumor.data.dedup import (
    DEFAULT_THRESHOLD,
    HASH_BITS,
    check_threshold,
    cross_pairs,
    group_ids,
    hash_files,
    members_by_label,
)
from braintumor.errors import UserError
from braintumor.utils.atomic import atomic_write
from braintumor.utils.jsonfiles import write_json
from braintumor.data.index import discover, full_suffix, unsupported_files
from braintumor.data.io import IMAGE_EXTENSIONS, unsupported_type_reason

MD_LIST_LIMIT = 20


def _load_set(root, cache_dir, progress) -> dict:
    """Absolute paths, labels (class folders, else None) and hash records of one image folder."""
    root = Path(root)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "not found"
        raise UserError(f"data folder {root} {problem}: pass a folder of images or of class folders")
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if folders:
        index = discover(root, classes=folders)  # one class folder is fine for an audit
        paths, labels = index.paths, [index.classes[label] for label in index.labels]
    else:
        paths, labels = sorted(p for p in root.iterdir() if not p.is_dir() and not p.name.startswith(".")
                               and p.suffix.lower() in IMAGE_EXTENSIONS), None
        if not paths:
            raise UserError(f"no images in {root}: expected image files or class folders of images")
    records, cache = hash_files(paths, cache_dir=cache_dir, progress=progress)
    # Files of other types are listed as unreadable rather than silently left out.
    others = [{"path": os.path.abspath(p), "reason": unsupported_type_reason(full_suffix(p))}
              for p in unsupported_files(root, recursive=bool(folders))]
    return {"unsupported": others, "root": os.path.abspath(root), "paths": [os.path.abspath(p) for p in paths],
            "labels": labels, "records": records, "cache": cache}


def _summary(data: dict) -> dict:
    records, counts = data["records"], Counter(data["labels"] or [])
    readable = [r for r in records if "error" not in r]
    return {
        "root": data["root"], "n_images": len(records), "n_readable": len(readable),
        "class_counts": dict(sorted(counts.items())) if counts else None,
        "class_fractions": {k: v / len(records) for k, v in sorted(counts.items())} if counts else None,
        "imbalance_ratio": max(counts.values()) / min(counts.values()) if counts else None,
        "unreadable": [{"path": p, "reason": r["error"]} for p, r in zip(data["paths"], records) if "error" in r]
        + data.get("unsupported", []),
        "image_sizes": dict(Counter(f"{r['width']}x{r['height']}" for r in readable).most_common()),
        "image_modes": dict(Counter(r["mode"] for r in readable).most_common()),
    }


def _duplicates(data: dict, threshold: int) -> dict:
    paths, labels, records = data["paths"], data["labels"], data["records"]
    groups = [m for m in members_by_label(group_ids(records, threshold)).values() if len(m) > 1]
    exact = [m for m in members_by_label([r.get("exact", f"unreadable {i}") for i, r in enumerate(records)]).values()
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
    pairs = cross_pairs(data["records"], other["records"], threshold)
    leaked, n_other = {j for _, j, _, _ in pairs}, len(other["records"])
    leaked_exact = {j for _, j, kind, _ in pairs if kind == "exact"}
    n_data = len(data["records"])
    audited = {i for i, _, _, _ in pairs}
    audited_exact = {i for i, _, kind, _ in pairs if kind == "exact"}
    listed = [{"data": data["paths"][i], "against": other["paths"][j], "kind": kind, "distance": distance,
               "data_label": data["labels"][i] if data["labels"] else None,
               "against_label": other["labels"][j] if other["labels"] else None} for i, j, kind, distance in pairs]
    return {
        # The audited set first: how many of its images also appear (exactly, or nearly) in the other set.
        "audited_exact_images": len(audited_exact), "audited_exact_fraction": len(audited_exact) / n_data,
        "audited_duplicated_images": len(audited), "audited_duplicated_fraction": len(audited) / n_data,
        # Then the other side's count.
        "leaked_images": len(leaked), "leaked_fraction": len(leaked) / n_other,
        "exact_leaked_images": len(leaked_exact), "exact_leaked_fraction": len(leaked_exact) / n_other,
        "data_images_involved": len({i for i, _, _, _ in pairs}),
        "n_pairs": len(pairs), "n_exact_pairs": len([p for p in pairs if p[2] == "exact"]),
        "n_label_conflicts": sum(None not in (p["data_label"], p["against_label"])
                                 and p["data_label"] != p["against_label"] for p in listed),
        "pairs": listed,
    }


def leak_headline(report: dict) -> str | None:
    """One sentence, audited set first: "N of M images of TEST (x %) are pixel-identical to an image of TRAIN; K
    (y %) are exact or near duplicates", then the other side's counts."""
    leaks = report.get("leaks")
    if leaks is None:
        return None
    name, other = os.path.basename(report["root"]), os.path.basename(report["against"]["root"])
    return (f"{leaks['audited_exact_images']} of {report['n_images']} images of {name} "
            f"({leaks['audited_exact_fraction']:.1%}) are pixel-identical to an image of {other}; "
            f"{leaks['audited_duplicated_images']} ({leaks['audited_duplicated_fraction']:.1%}) are exact or near "
            f"duplicates of one. On the other side, {leaks['leaked_images']} of {report['against']['n_images']} "
            f"images of {other} ({leaks['leaked_fraction']:.1%}) duplicate an image of {name}; "
            f"{leaks['exact_leaked_images']} ({leaks['exact_leaked_fraction']:.1%}) are pixel-identical.")


def _group_report(data: dict, other: dict | None, groups_csv) -> dict | None:
    """Patient/series groups (CSV or per-patient sub-folders) and those found in both sets."""
    from braintumor.data.groups import find_groups

    # A CSV may list both sets: a path is missing only when it is under neither (checked, and warned, once).
    mine, source = find_groups(data["paths"], data["root"], groups_csv,
                               roots=[data["root"]] + ([other["root"]] if other else []))
    theirs, other_source = find_groups(other["paths"], other["root"], groups_csv, roots=[]) if other else ([], "")
    if not source and not other_source:
        return None
    mine_counts, their_counts = Counter(g for g in mine if g is not None), Counter(g for g in theirs if g is not None)
    shared = sorted(set(mine_counts) & set(their_counts), key=str)
    return {"source": source or other_source, "n_groups": len(mine_counts),
            "against_n_groups": len(their_counts) if other else None,
            "n_straddling": len(shared),
            "images_in_straddling_groups": sum(mine_counts[g] for g in shared),
            "straddling": [{"group": g, "images": mine_counts[g], "against_images": their_counts[g]}
                           for g in shared]}


def audit(data_root, against=None, *, threshold: int = DEFAULT_THRESHOLD, cache_dir=None,
          progress: bool = False, groups=None) -> dict:
    """Audit an image folder and, with ``against`` (e.g. the test set), its leakage; a JSON-able report.

    Labels come from class folders when ``data_root`` has them. Leak figures count, first, the images of
    ``data_root`` that are exact or near duplicates of an image of ``against``, then the images of ``against``
    that duplicate one of ``data_root``. ``groups`` (a CSV; default: per-patient sub-folders) adds the patient
    or series groups found in both sets.
    """
    check_threshold(threshold)
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
    other = None
    if against is not None:
        other = _load_set(against, cache_dir, progress)
        report.update(against=_summary(other), leaks=_leaks(data, other, threshold))
        leaks = report["leaks"]
        report["summary"] = {"images": report["n_images"],
                             "pixel_identical_to_against": leaks["audited_exact_images"],
                             "duplicating_against": leaks["audited_duplicated_images"],
                             **{k: v for k, v in report["summary"].items() if k != "images"},
                             "against_images": len(other["records"]), "leaked_images": leaks["leaked_images"]}
        report["leak_headline"] = leak_headline(report)
        report["cache"] = {**data["cache"], **{k: data["cache"][k] + other["cache"][k] for k in ("hits", "computed")}}
    report["groups"] = _group_report(data, other if against is not None else None, groups)
    if report["groups"] and against is not None:
        report["summary"]["straddling_groups"] = report["groups"]["n_straddling"]
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
    if leaks is not None:  # the headline a user auditing a test set wants, before everything else
        lines[2:2] = [f"**Leakage:** {report['leak_headline']}", ""]
    group_info = report.get("groups")
    if group_info:
        lines += ["## Patient / series groups", "",
                  f"{group_info['n_groups']} groups (from {group_info['source']})."
                  + (f" {group_info['n_straddling']} of them also have images in `{other_root}` "
                     f"({group_info['images_in_straddling_groups']} images of this set): they straddle the two sets."
                     if group_info["against_n_groups"] is not None else ""), ""]
        if group_info["straddling"]:
            lines += ["| group | images here | images in the other set |", "|---|---:|---:|"] + _truncated(
                [f"| {g['group']} | {g['images']} | {g['against_images']} |" for g in group_info["straddling"]])
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
        lines += [f"## Leakage between this set and `{other_root}`", "",
                  f"{leaks['audited_exact_images']} of {report['n_images']} images of this set "
                  f"({leaks['audited_exact_fraction']:.1%}) are pixel-identical to an image of the other set; "
                  f"{leaks['audited_duplicated_images']} ({leaks['audited_duplicated_fraction']:.1%}) are exact or "
                  "near duplicates of one.", "",
                  f"Other side: {leaks['leaked_images']} of {report['against']['n_images']} images "
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
    # File names that are not valid UTF-8 (held with surrogate escapes): JSON escapes them (\udcXX, which reads
    # back to the same name), the Markdown shows their bytes as \xXX.
    md_bytes = (_markdown(report).rstrip("\n") + "\n").encode("utf-8", "backslashreplace")
    write_json(json_path, report, indent=1)
    atomic_write(md_path, lambda handle: handle.write(md_bytes), "wb")
    return json_path, md_path
