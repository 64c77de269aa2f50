"""The feature file's shape: a fixed Parquet schema, provenance as JSON in its metadata.

One row per image: path, label, width, height, feature (fixed_size_list<float32>). A file of
region features (featx extract --regions) adds region, x1, y1, x2, y2 before feature.
The `featx` key of the schema metadata holds the run's provenance (settings, weights, hash).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

METADATA_KEY = b"featx"
ERROR_COLUMNS = ("path", "stage", "error", "message")
# Region rows: the region's id and its box in upright pixels (0-based, x2/y2 exclusive).
REGION_COLUMNS = ("region", "x1", "y1", "x2", "y2")


def feature_schema(dim: int, provenance: dict | None = None, regions: bool = False) -> pa.Schema:
    region_fields = [pa.field("region", pa.string(), nullable=False)] + [
        pa.field(c, pa.int32(), nullable=False) for c in REGION_COLUMNS[1:]
    ]
    schema = pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            *(region_fields if regions else []),
            pa.field("feature", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )
    if provenance is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(provenance, sort_keys=True)})
    return schema


ERROR_SCHEMA = pa.schema([pa.field(c, pa.string()) for c in ERROR_COLUMNS])


def rows_table(
    schema: pa.Schema, paths, labels, widths, heights, features: np.ndarray, regions=None, boxes=None
) -> pa.Table:
    """Rows in `schema`; a region schema also takes the region ids and their (x1, y1, x2, y2)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    dim = schema.field("feature").type.list_size
    flat = pa.array(features.reshape(-1), type=pa.float32())
    columns = [
        pa.array(paths, pa.string()),
        pa.array(labels, pa.string()),
        pa.array(widths, pa.int32()),
        pa.array(heights, pa.int32()),
    ]
    if "region" in schema.names:
        xyxy = np.asarray(boxes, dtype=np.int32).reshape(-1, 4)
        columns += [pa.array(regions, pa.string())] + [pa.array(xyxy[:, j]) for j in range(4)]
    return pa.Table.from_arrays([*columns, pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema)


def row_keys(table: pa.Table) -> list[tuple[str, str | None]]:
    """(path, region) of every row: what identifies a row for resume and deduplication."""
    paths = table.column("path").to_pylist()
    if "region" not in table.column_names:
        return [(p, None) for p in paths]
    return list(zip(paths, table.column("region").to_pylist()))


def differing(old: dict, new: dict) -> str:
    """Name the descriptor settings in which two provenances differ, for a refusal message."""
    a, b = old.get("settings", {}), new.get("settings", {})
    keys = list(b) + [k for k in a if k not in b]  # e.g. a regions table there, none now
    diffs = [f"{k}={a.get(k)!r} there, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "settings hash differs"


def errors_table(records: list[dict]) -> pa.Table:
    """The errors table; records of regions add a `region` column after `path`."""
    if any(r.get("region") is not None for r in records):
        columns = ("path", "region", *ERROR_COLUMNS[1:])
        schema = pa.schema([pa.field(c, pa.string()) for c in columns])
        return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records], schema)
    return pa.Table.from_pylist([{c: r[c] for c in ERROR_COLUMNS} for r in records], ERROR_SCHEMA)


def errors_path(out: Path) -> Path:
    """`x.parquet` -> `x.errors.parquet`."""
    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(stem + ".errors.parquet")
