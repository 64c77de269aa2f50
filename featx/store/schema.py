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


def parquet_options(schema: pa.Schema) -> dict:
    """How featx writes a table of `schema`: pq.ParquetWriter's keywords. Dictionary encoding for
    the text columns only (paths share folders, labels repeat): a descriptor's floats hardly
    repeat, and pyarrow's default tries a dictionary for them in every row group, fills its 1 MB
    page, falls back to plain and keeps both (a 64-row group of 4096-D rows took 1.56x its floats)."""
    return {"use_dictionary": [f.name for f in schema if pa.types.is_string(f.type)]}


ERROR_SCHEMA = pa.schema([pa.field(c, pa.string()) for c in ERROR_COLUMNS])


def column(values, type: pa.DataType) -> pa.Array:
    """pa.array(values, type) for strings (None: null) and fixed-width numbers, built from buffers:
    pa.array asks pyarrow's pandas shim first, which imports pandas (0.2 s) into `featx extract`."""
    n = len(values)
    if pa.types.is_string(type):
        encoded = [None if v is None else str(v).encode() for v in values]
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum([0 if b is None else len(b) for b in encoded], out=offsets[1:])
        nulls = [i for i, b in enumerate(encoded) if b is None]
        valid = None
        if nulls:
            mask = np.ones(n, bool)
            mask[nulls] = False
            valid = pa.py_buffer(np.packbits(mask, bitorder="little"))
        data = pa.py_buffer(b"".join(b for b in encoded if b is not None))
        return pa.Array.from_buffers(type, n, [valid, pa.py_buffer(offsets), data], null_count=len(nulls))
    flat = np.ascontiguousarray(values, dtype=type.to_pandas_dtype())
    return pa.Array.from_buffers(type, n, [None, pa.py_buffer(flat)])


def rows_table(
    schema: pa.Schema, paths, labels, widths, heights, features: np.ndarray, regions=None, boxes=None
) -> pa.Table:
    """Rows in `schema`; a region schema also takes the region ids and their (x1, y1, x2, y2)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    dim = schema.field("feature").type.list_size
    flat = column(features.reshape(-1), pa.float32())
    columns = [
        column(paths, pa.string()),
        column(labels, pa.string()),
        column(widths, pa.int32()),
        column(heights, pa.int32()),
    ]
    if "region" in schema.names:
        xyxy = np.asarray(boxes, dtype=np.int32).reshape(-1, 4)
        columns += [column(regions, pa.string())] + [column(xyxy[:, j], pa.int32()) for j in range(4)]
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
