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
import sys
from collections.abc import Hashable, Sequence
from pathlib import Path

from braintumor.errors import UserError


def read_groups_csv(csv_path: str | os.PathLike) -> dict[str, str]:
    """path -> group id from a CSV with ``path`` and ``group`` columns (a header row is required).

    The CSV is read strictly (an unterminated quote is an error, not a field that swallows the rest of the
    file); a row without a path or a group is an error naming its line.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"groups file not found: {csv_path}")
    table: dict[str, str] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, strict=True)
            fields = [(name or "").strip().lower() for name in reader.fieldnames or []]
            if "path" not in fields or "group" not in fields:
                raise UserError(f"groups file {csv_path} needs a header row with the columns path and group")
            reader.fieldnames = fields
            for row in reader:
                path, group = row.get("path"), row.get("group")
                if not (path or "").strip() and not (group or "").strip():
                    continue  # a blank line
                if path is None or group is None or not path.strip() or not group.strip():
                    raise UserError(f"groups file {csv_path}, line {reader.line_num}: every row needs a path and "
                                    "a group")
                table[path.strip()] = group.strip()
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"groups file {csv_path} is not a readable CSV: {' '.join(str(err).split())}") from None
    except OSError as err:
        raise UserError(f"cannot read groups file {csv_path}: {err.strerror or err}") from None
    if not table:
        raise UserError(f"groups file {csv_path} lists no images")
    return table


def _key(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.abspath(path))


def _candidates(listed: str, root: str | os.PathLike, csv_path: str | os.PathLike) -> list[Path]:
    """Where a listed path may point: itself when absolute, else under the data folder, then the CSV's folder."""
    if os.path.isabs(listed):
        return [Path(listed)]
    return [Path(root) / listed, Path(csv_path).parent / listed]


def missing_paths(table: dict[str, str], roots: Sequence[str | os.PathLike], csv_path: str | os.PathLike,
                  ) -> list[str]:
    """The listed paths that name no existing file (absolute, or relative to one of the data folders ``roots``
    or to the CSV's folder)."""
    return [listed for listed in table
            if not any(p.is_file() for root in roots for p in _candidates(listed, root, csv_path))]


def groups_from_csv(paths: Sequence[str | os.PathLike], root: str | os.PathLike, csv_path: str | os.PathLike,
                    *, roots: Sequence[str | os.PathLike] | None = None) -> list[str | None]:
    """Each image's group from the CSV (None when the CSV does not list it).

    A CSV none of whose paths exists is refused (it belongs to another folder, or its paths are relative to
    somewhere else); one where some do not exist is used, with a one-line warning on stderr counting them.
    ``roots`` are the data folders a relative path may be under (default: ``root``; an audit passes both of
    its sets, and an empty list skips the check).
    """
    table = read_groups_csv(csv_path)
    roots = [root] if roots is None else list(roots)
    missing = missing_paths(table, roots, csv_path) if roots else []
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        if len(missing) == len(table):
            raise UserError(f"groups file {csv_path}: none of its {len(table)} paths exists ({shown}); paths are "
                            f"absolute or relative to the data folder {root} or to the CSV's folder")
        print(f"warning: {len(missing)} of {len(table)} paths in groups file {csv_path} do not exist and are "
              f"ignored: {shown}", file=sys.stderr)
    lookup: dict[str, str] = {}
    for listed, group in table.items():
        data_path, *csv_relative = _candidates(listed, root, csv_path)
        for candidate in csv_relative:  # relative: to the CSV's folder first, the data folder wins where both exist
            lookup.setdefault(_key(candidate), group)
        lookup[_key(data_path)] = group
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
                csv_path: str | os.PathLike | None = None, *, roots: Sequence[str | os.PathLike] | None = None,
                ) -> tuple[list[str | None], str]:
    """Groups from ``csv_path`` when given, else from per-patient sub-folders; and a phrase naming the source.
    ``roots``: as for :func:`groups_from_csv`."""
    if csv_path:
        groups = groups_from_csv(paths, root, csv_path, roots=roots)
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
