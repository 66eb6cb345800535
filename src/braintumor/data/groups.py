"""Patient or series groups: images that must stay together on one side of a train/validation split.

Groups come from a CSV file (``--groups FILE.csv``: columns ``path`` and ``group``; a path is absolute, relative
to the data folder, or relative to the CSV file's folder), or, without one, from the folder layout: when a class
folder holds one sub-folder per patient or series (``glioma/patient017/slice_03.png``), that sub-folder's name is
the image's group, whatever class folder it sits in. Images directly in a class folder, or missing from the CSV,
are groups of their own. Several groupings (patients, duplicates) are merged: images that share any group end
up in one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Hashable, Sequence
from pathlib import Path

from braintumor.errors import UserError


def read_groups_csv(csv_path: str | os.PathLike) -> dict[str, str]:
    """path -> group id from a CSV with ``path`` and ``group`` columns (a header row is required)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"groups file not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [name.strip().lower() for name in reader.fieldnames or []]
            if "path" not in fields or "group" not in fields:
                raise UserError(f"groups file {csv_path} needs a header row with the columns path and group")
            reader.fieldnames = fields
            table = {row["path"].strip(): row["group"].strip() for row in reader if row.get("path")}
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"groups file {csv_path} is not a readable CSV: {err}") from None
    if not table:
        raise UserError(f"groups file {csv_path} lists no images")
    return table


def _key(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.abspath(path))


def groups_from_csv(paths: Sequence[str | os.PathLike], root: str | os.PathLike, csv_path: str | os.PathLike,
                    ) -> list[str | None]:
    """Each image's group from the CSV (None when the CSV does not list it)."""
    table = read_groups_csv(csv_path)
    lookup: dict[str, str] = {}
    for listed, group in table.items():
        if os.path.isabs(listed):
            lookup[_key(listed)] = group
        else:  # relative: to the CSV's folder first, the data folder wins where both exist
            lookup.setdefault(_key(Path(csv_path).parent / listed), group)
            lookup[_key(Path(root) / listed)] = group
    return [lookup.get(_key(path)) for path in paths]


def groups_from_folders(paths: Sequence[str | os.PathLike], root: str | os.PathLike) -> list[str | None]:
    """The patient/series sub-folder of each image (``root/class/GROUP/...``), None for images directly in a
    class folder (or in a flat folder)."""
    root = Path(root)
    found = []
    for path in paths:
        parts = Path(path).relative_to(root).parts
        found.append(parts[1] if len(parts) >= 3 else None)
    return found


def find_groups(paths: Sequence[str | os.PathLike], root: str | os.PathLike,
                csv_path: str | os.PathLike | None = None) -> tuple[list[str | None], str]:
    """Groups from ``csv_path`` when given, else from per-patient sub-folders; and a phrase naming the source."""
    if csv_path:
        groups = groups_from_csv(paths, root, csv_path)
        missing = sum(group is None for group in groups)
        source = f"{csv_path}" + (f" ({missing} of {len(groups)} images not listed: each its own group)"
                                  if missing else "")
        return groups, source
    groups = groups_from_folders(paths, root)
    if all(group is None for group in groups):
        return groups, ""
    return groups, "per-patient sub-folders"


def merge_groups(*groupings: Sequence[Hashable | None] | None) -> list[int]:
    """One component id per image such that images sharing a (non-None) id in any grouping share a component."""
    groupings = [g for g in groupings if g is not None]
    n = len(groupings[0]) if groupings else 0
    parent = list(range(n))

    def root_of(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for grouping in groupings:
        if len(grouping) != n:
            raise ValueError("every grouping needs one entry per image")
        first: dict[Hashable, int] = {}
        for i, group in enumerate(grouping):
            if group is None:
                continue
            if group in first:
                parent[root_of(i)] = root_of(first[group])
            else:
                first[group] = i
    roots: dict[int, int] = {}
    return [roots.setdefault(root_of(i), len(roots)) for i in range(n)]
