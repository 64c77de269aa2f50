"""Regions of images as an input: `featx extract IMAGES -o OUT --regions REGIONS.csv|parquet`.

A regions table has the columns `path, x1, y1, x2, y2` and optionally `region` (an id kept in
the output; default: the row's 0-based number in the table). `path` is relative to the folder
given (as the output records it) or absolute; the box is in pixels of the upright image, PIL's
crop convention (0-based, x2/y2 exclusive). Every region becomes one row, described as a whole
image would be after cropping (Simonyan & Zisserman, arXiv 1409.1556, Appendix B, VOC action:
the descriptor of the person's box).

Regions that cannot be described (a path with no image, a non-numeric or empty box) become
records of the errors table; a path outside the folders given is a user error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import posixpath
from dataclasses import dataclass, replace
from pathlib import Path

from featx.errors import BadInput, MissingData
from featx.extract.discover import Item

REQUIRED = ("path", "x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class Regions:
    """What a regions table asks for: the regions to describe and those that cannot be."""

    items: tuple[Item, ...]  # one per region, by path then table order
    errors: tuple[dict, ...]  # error records (path, region, stage, error, message)
    # What identifies the table in the settings hash: a different table is a different run.
    identity: dict


def read_table_rows(source) -> tuple[list[dict], str]:
    """The rows of a regions table (CSV or Parquet file, pandas DataFrame, pyarrow Table)."""
    if hasattr(source, "to_pylist"):  # pyarrow.Table
        return source.to_pylist(), "table"
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas.DataFrame
        return source.to_dict("records"), "DataFrame"
    file = Path(source).expanduser()
    if not file.is_file():
        raise MissingData(
            f"--regions {file}: no such file; give a CSV or Parquet table with columns path, x1, y1, x2, y2"
        )
    if file.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(file).to_pylist(), str(file)
        except Exception as e:
            raise BadInput(f"--regions {file} is not a readable Parquet file ({e}); write it again") from None
    if file.suffix.lower() not in (".csv", ".txt"):
        raise BadInput(f"--regions {file}: unknown format {file.suffix!r}; give a .csv or .parquet table")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            # Strings as written: a coordinate that is not a number is reported per region, not guessed.
            return [{k.strip(): v for k, v in row.items() if k is not None} for row in csv.DictReader(f)], str(file)
    except (UnicodeDecodeError, csv.Error) as e:
        raise BadInput(f"--regions {file} is not a readable UTF-8 CSV table ({e}); write it again") from None


def as_pixel(value) -> int | None:
    """An integer pixel coordinate from a number or its text, else None (3.0 is 3; 2.5 is not)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    try:  # numpy scalars
        f = float(value)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None


def plan_regions(source, items: list[Item], roots: list[str | Path]) -> Regions:
    """The regions of `source` resolved against the images found under `roots`.

    Raises BadInput for a table without the needed columns, a repeated (path, region) or a
    path outside every folder given (naming the first such path).
    """
    rows, name = read_table_rows(source)
    if not rows:
        raise BadInput(f"--regions {name} has no rows; list at least one region (path, x1, y1, x2, y2)")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise BadInput(
            f"--regions {name} lacks column(s) {', '.join(missing)} (has {', '.join(rows[0])}); "
            "it needs path, x1, y1, x2, y2 (and optionally region)"
        )
    by_path = {it.path: it for it in items}
    by_file = {it.file: it for it in items}
    folders = [Path(r).expanduser().resolve() for r in roots if Path(r).expanduser().is_dir()]
    found: list[tuple[str, int, Item]] = []
    errors: list[dict] = []
    seen: set[tuple[str, str]] = set()
    canonical = []
    for n, row in enumerate(rows):
        region = row.get("region")
        region = str(n) if region is None or str(region).strip() == "" else str(region).strip()
        item, path = _resolve(str(row["path"] or ""), by_path, by_file, folders, roots, name)
        if (path, region) in seen:
            raise BadInput(
                f"--regions {name} lists region {region!r} of {path} twice (row {n}); give each region "
                "its own id in the region column"
            )
        seen.add((path, region))
        canonical.append([path, region, *(str(row[c]) for c in REQUIRED[1:])])

        def fail(error: str, message: str, path=path, region=region) -> None:
            errors.append({"path": path, "region": region, "stage": "region", "error": error, "message": message})

        coords = [as_pixel(row[c]) for c in REQUIRED[1:]]
        bad = [f"{c}={row[c]!r}" for c, v in zip(REQUIRED[1:], coords) if v is None]
        if bad:
            fail("NotAPixel", f"{', '.join(bad)} is not an integer pixel coordinate; write whole numbers")
            continue
        x1, y1, x2, y2 = coords
        if x2 <= x1 or y2 <= y1:
            fail("EmptyBox", f"box {coords} is empty or negative: x2 must exceed x1 and y2 exceed y1")
            continue
        if x1 < 0 or y1 < 0:
            fail("BoxOutsideImage", f"box {coords} starts left of or above the image (x1, y1 must be >= 0)")
            continue
        if item is None:
            fail("FileNotFoundError", f"no image {path} under {', '.join(map(str, roots))}; check the path column")
            continue
        found.append((path, n, replace(item, region=region, box=(x1, y1, x2, y2))))
    found.sort(key=lambda t: (t[0], t[1]))
    digest = hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
    identity = {"sha256": digest[:16], "rows": len(rows)}
    return Regions(tuple(it for _, _, it in found), tuple(errors), identity)


def _resolve(text: str, by_path, by_file, folders, roots, name) -> tuple[Item | None, str]:
    """(the image, the path as recorded) of a regions row; outside every folder: BadInput."""
    outside = BadInput(
        f"--regions {name} names {text!r}, which is outside the folder(s) given "
        f"({', '.join(map(str, roots))}); give paths relative to the folder, or pass a folder that holds it"
    )
    if Path(text).is_absolute():
        file = Path(text).expanduser().resolve()
        if file in by_file:
            item = by_file[file]
            return item, item.path
        for folder in folders:
            if file.is_relative_to(folder):
                return None, file.relative_to(folder).as_posix()
        raise outside
    path = posixpath.normpath(text.replace("\\", "/"))
    if not text or path == ".." or path.startswith("../"):
        raise outside
    return by_path.get(path), path
