"""The feature file's shape: a fixed Parquet schema, provenance as JSON in its metadata.

One row per image (or region): path, label, width, height, feature (fixed_size_list<float32>).
The `featx` key of the schema metadata holds the run's provenance (settings, weights, hash).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

METADATA_KEY = b"featx"
ERROR_COLUMNS = ("path", "stage", "error", "message")


def feature_schema(dim: int, provenance: dict | None = None) -> pa.Schema:
    schema = pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("feature", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )
    if provenance is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(provenance, sort_keys=True)})
    return schema


ERROR_SCHEMA = pa.schema([pa.field(c, pa.string()) for c in ERROR_COLUMNS])


def rows_table(schema: pa.Schema, paths, labels, widths, heights, features: np.ndarray) -> pa.Table:
    features = np.ascontiguousarray(features, dtype=np.float32)
    dim = schema.field("feature").type.list_size
    flat = pa.array(features.reshape(-1), type=pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array(paths, pa.string()),
            pa.array(labels, pa.string()),
            pa.array(widths, pa.int32()),
            pa.array(heights, pa.int32()),
            pa.FixedSizeListArray.from_arrays(flat, dim),
        ],
        schema=schema,
    )


def differing(old: dict, new: dict) -> str:
    """Name the descriptor settings in which two provenances differ, for a refusal message."""
    a, b = old.get("settings", {}), new["settings"]
    diffs = [f"{k}={a.get(k)!r} there, {b.get(k)!r} now" for k in b if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "settings hash differs"


def errors_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{c: r[c] for c in ERROR_COLUMNS} for r in records], ERROR_SCHEMA)


def errors_path(out: Path) -> Path:
    """`x.parquet` -> `x.errors.parquet`."""
    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(stem + ".errors.parquet")
