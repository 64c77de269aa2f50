"""Feature files: Parquet with a fixed schema, provenance as JSON, written so nothing is lost.

While a run goes on, each row group is persisted as its own small Parquet file in
`OUT.partial/` (written under a temporary name, then renamed). At the end the pieces are
merged into OUT through a temporary file and an atomic rename, so OUT is always either the
previous complete file or the new complete one, and a killed run resumes from its pieces.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

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


def errors_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{c: r[c] for c in ERROR_COLUMNS} for r in records], ERROR_SCHEMA)


def errors_path(out: Path) -> Path:
    """`x.parquet` -> `x.errors.parquet`."""
    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(stem + ".errors.parquet")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` so that `path` is either absent/old or complete."""
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, table.schema) as w:
        w.write_table(table)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Pieces:
    """The row groups of an unfinished run, one small Parquet file each, in `OUT.partial/`."""

    def __init__(self, out: Path):
        self.folder = partial_dir(out)
        self._count: int | None = None

    def exists(self) -> bool:
        return (self.folder / "settings.json").is_file()

    def start(self, provenance: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "settings.json.tmp"
        tmp.write_text(json.dumps(provenance, sort_keys=True, indent=1))
        os.replace(tmp, self.folder / "settings.json")

    def provenance(self) -> dict:
        try:
            return json.loads((self.folder / "settings.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{self.folder}/settings.json is unreadable ({e}); pass --overwrite to start over"
            ) from None

    def _next_index(self) -> int:
        if self._count is None:
            names = [p.stem.split("-")[-1] for p in self.folder.glob("*-*.parquet")]
            self._count = max((int(n) for n in names if n.isdigit()), default=-1) + 1
        self._count += 1
        return self._count - 1

    def add(self, rows: pa.Table | None, errors: list[dict]) -> None:
        i = self._next_index()
        if errors:
            write_atomic(errors_table(errors), self.folder / f"errors-{i:06d}.parquet")
        if rows is not None and rows.num_rows:
            write_atomic(rows, self.folder / f"rows-{i:06d}.parquet")

    def row_files(self) -> list[Path]:
        return sorted(self.folder.glob("rows-*.parquet"))

    def error_files(self) -> list[Path]:
        return sorted(self.folder.glob("errors-*.parquet"))

    def done_paths(self) -> set[str]:
        done: set[str] = set()
        for f in self.row_files() + self.error_files():
            done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        return done

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._count = None


def merge(out: Path, schema: pa.Schema, sources: Iterable[Path], error_sources: Iterable[Path]) -> tuple[int, int]:
    """Stream `sources` (row groups, deduplicated by path) into OUT atomically; errors likewise.

    Returns (rows, errors) written. Memory stays at one row group at a time.
    """
    seen: set[str] = set()
    rows = 0
    tmp = partial_dir(out) / "final.parquet.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema) as writer:
        for source in sources:
            pf = pq.ParquetFile(source)
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g)
                paths = table.column("path").to_pylist()
                keep = [i for i, p in enumerate(paths) if p not in seen]
                if len(keep) < len(paths):
                    table = table.take(pa.array(keep, pa.int64()))
                seen.update(paths)
                if table.num_rows:
                    writer.write_table(table.cast(schema))
                    rows += table.num_rows
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())

    failures: dict[str, dict] = {}
    for source in error_sources:
        for record in pq.read_table(source).to_pylist():
            if record["path"] not in seen:
                failures[record["path"]] = record
    err_out = errors_path(out)
    if rows:
        os.replace(tmp, out)
        fsync_dir(out.parent)
    else:
        tmp.unlink()
    if failures:
        write_atomic(errors_table(sorted(failures.values(), key=lambda r: r["path"])), err_out)
    elif err_out.exists():
        err_out.unlink()
    return rows, len(failures)


def feature_files(path: Path) -> list[Path]:
    """The finished feature files of a folder: no error lists, no pieces of unfinished runs."""
    files = []
    for p in sorted(path.rglob("*.parquet")):
        rel = p.relative_to(path)
        if p.name.endswith(".errors.parquet") or any(
            part.startswith(".") or part.endswith(".partial") for part in rel.parts
        ):
            continue
        files.append(p)
    if not files:
        raise FileNotFoundError(f"{path}: no .parquet files in this folder; give a featx output")
    return files


def _schema_provenance(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature file; run `featx extract` to make it")
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e}); extract again with --overwrite") from None
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} has no featx metadata; it was not written by featx extract")
    return json.loads(meta[METADATA_KEY])


def read_provenance(path: str | Path) -> dict:
    """The `featx` JSON of a feature file, or of a folder whose files share one descriptor."""
    path = Path(path)
    if not path.is_dir():
        return _schema_provenance(path)
    files = feature_files(path)
    first = _schema_provenance(files[0])
    for other in files[1:]:
        prov = _schema_provenance(other)
        if prov.get("settings_hash") != first.get("settings_hash"):
            a, b = first.get("settings", {}), prov.get("settings", {})
            diff = "; ".join(f"{k}={a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise ValueError(
                f"{path} mixes descriptors: {files[0].name} and {other.relative_to(path)} differ "
                f"({diff or 'settings hash'}); read them separately or move one out"
            )
    return first


def _dataset(path: str | Path) -> pads.Dataset:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature file or folder; run `featx extract` first")
    if path.is_dir():
        read_provenance(path)  # one descriptor per folder, or a clear error
        return pads.dataset([str(f) for f in feature_files(path)], format="parquet")
    return pads.dataset(str(path), format="parquet")


def read_table(path: str | Path, columns: list[str] | None = None, filters=None) -> pa.Table:
    return _dataset(path).to_table(columns=columns, filter=_as_expression(filters))


def _as_expression(filters):
    if filters is None or isinstance(filters, pads.Expression):
        return filters
    return pq.filters_to_expression(filters)


def read_features(path: str | Path, columns: list[str] | None = None, filters=None) -> pd.DataFrame:
    """A feature file or folder of files as a DataFrame; `feature` holds one float32 array per row.

    `filters` is a pyarrow expression or DNF list, e.g. [("label", "=", "Faces")].
    """
    table = read_table(path, columns, filters)
    if "feature" not in table.column_names:
        return table.to_pandas()
    X = feature_matrix(table.column("feature"))
    df = table.drop_columns(["feature"]).to_pandas()
    df["feature"] = list(X)
    return df[table.column_names]


def feature_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<float32>[D] -> float32 [n, D], without a Python list of arrays."""
    dim = column.type.list_size
    if column.num_chunks == 0 or len(column) == 0:
        return np.zeros((0, dim), np.float32)
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) for c in column.chunks]
    # One chunk is a zero-copy, read-only view of Arrow memory: copy so callers may write to X.
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def load_xy(path: str | Path, filters=None) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 [n, D], y labels as a NumPy object array) from a feature file or folder."""
    table = read_table(path, ["label", "feature"], filters)
    X = feature_matrix(table.column("feature"))
    y = table.column("label").to_numpy(zero_copy_only=False).astype(object, copy=False)
    return X, y


def iter_paths(path: Path) -> Iterator[str]:
    pf = pq.ParquetFile(path)
    for g in range(pf.num_row_groups):
        yield from pf.read_row_group(g, columns=["path"]).column("path").to_pylist()
