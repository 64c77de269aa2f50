"""Reading feature files and folders: provenance, tables, DataFrames, (X, y)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featx.errors import BadInput, Damaged, MissingData, option
from featx.store.schema import METADATA_KEY, differing

if TYPE_CHECKING:  # pandas and pyarrow.dataset load on first read, not with `featx extract` (0.3 s)
    import pandas as pd
    import pyarrow.dataset as pads


def feature_files(path: Path) -> list[Path]:
    """The finished feature files of a folder: no error lists, no pieces of unfinished runs.

    Like pyarrow's dataset discovery, names starting with "." or "_" (a Ray folder's `_featx/`
    bookkeeping, temporary files) are skipped.
    """
    files = []
    for p in sorted(path.rglob("*.parquet")):
        rel = p.relative_to(path)
        if p.name.endswith(".errors.parquet") or any(
            part.startswith((".", "_")) or part.endswith(".partial") for part in rel.parts
        ):
            continue
        files.append(p)
    if not files:
        raise MissingData(f"{path}: no .parquet files in this folder; give a featx output")
    return files


def is_feature_source(path: str | Path) -> bool:
    """The one rule for "is this features, not images": a .parquet file, or a folder whose
    files are all Parquet, at least one of them. As in `feature_files`, names starting with "."
    or "_" (a Ray folder's `_featx/` bookkeeping, temporary files) are skipped."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    if not path.is_dir():
        return False
    has_parquet = False
    for f in path.rglob("*"):
        if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts):
            if f.suffix.lower() != ".parquet":
                return False
            has_parquet = True
    return has_parquet


def _schema_provenance(path: Path) -> dict:
    if not path.exists():
        raise MissingData(f"{path}: no such feature file; run `featx extract` to make it")
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the OS speaking (permission, ...), not a damaged file
        raise Damaged(
            f"{path} is not a readable Parquet file ({e}); extract it again with {option('overwrite')}", path
        ) from None
    if METADATA_KEY not in meta:
        raise BadInput(f"{path} has no featx metadata; it was not written by featx extract")
    try:
        prov = json.loads(meta[METADATA_KEY])
    except ValueError:
        prov = None
    if not isinstance(prov, dict):
        raise Damaged(
            f"{path}: its featx metadata is not a JSON object of settings; extract it again with {option('overwrite')}",
            path,
        )
    return prov


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
            raise BadInput(
                f"{path} mixes descriptors: {files[0].name} and {other.relative_to(path)} differ "
                f"({differing(first, prov)}); read them separately or move one out"
            )
    return first


def _dataset(path: str | Path) -> pads.Dataset:
    import pyarrow.dataset as pads

    path = Path(path)
    if not path.exists():
        raise MissingData(f"{path}: no such feature file or folder; run `featx extract` first")
    if path.is_dir():
        read_provenance(path)  # one descriptor per folder, or a clear error
        return pads.dataset([str(f) for f in feature_files(path)], format="parquet")
    _schema_provenance(path)  # a feature file featx wrote, or a clear error
    return pads.dataset(str(path), format="parquet")


def read_table(path: str | Path, columns: list[str] | None = None, filters=None) -> pa.Table:
    dataset = _dataset(path)
    try:
        return dataset.to_table(columns=columns, filter=_as_expression(filters))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # a column it lacks, a damaged page, a bad filter
        why = str(e).strip().splitlines()[0]
        raise BadInput(
            f"{path}: cannot read {', '.join(columns or ['its rows'])} ({why}); give a featx output"
        ) from None


def _as_expression(filters):
    import pyarrow.dataset as pads

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


def feature_batches(path: str | Path, rows: int = 1024):
    """The feature rows of a file or folder in their stored order, `rows` at a time: (number of
    the first row, float32 [m, D], a read-only view of Arrow memory). Memory: one batch (Arrow's
    pre-buffering, which would read a file's whole column ahead, is off). A row holding NaN or
    infinity is refused as it is read (featx never writes one: the file was made elsewhere or
    damaged)."""
    path = Path(path)
    if not path.exists():
        raise MissingData(f"{path}: no such feature file or folder; run `featx extract` first")
    if path.is_dir():
        read_provenance(path)  # one descriptor per folder, or a clear error
    start = 0
    for file in feature_files(path) if path.is_dir() else [path]:
        parquet = pq.ParquetFile(file, pre_buffer=False)
        dim = parquet.schema_arrow.field("feature").type.list_size
        in_file = 0
        for batch in parquet.iter_batches(batch_size=rows, columns=["feature"]):
            block = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            # A row's sum is finite when its values are (and costs half an isfinite mask); only
            # an overflowing sum of huge finite values needs the exact look.
            with np.errstate(over="ignore"):  # an overflow is looked at exactly below
                sums = block.sum(axis=1)
            if not np.isfinite(sums).all():
                bad = ~np.isfinite(block).all(axis=1)
                if bad.any():
                    _refuse_non_finite(file, in_file + int(np.argmax(bad)))
            yield start, block
            start += len(block)
            in_file += len(block)


def _refuse_non_finite(file: Path, row: int) -> None:
    image = pq.ParquetFile(file).read(columns=["path"]).column("path")[row].as_py()
    raise BadInput(
        f"{file}: the features of {image} (row {row + 1}) hold NaN or infinity; featx extract never writes "
        "them: extract the features again"
    )


def read_features_into(path: str | Path, out: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Fill the preallocated float32 `out` with the feature rows of a file or folder, a batch of
    row groups at a time (never a second copy of the whole matrix): stored row i goes to
    out[positions[i]], or is skipped where that is negative; without `positions`, in order."""
    for start, block in feature_batches(path):
        if positions is None:
            out[start : start + len(block)] = block
        else:
            where = positions[start : start + len(block)]
            keep = where >= 0
            if keep.all():
                out[where] = block
            else:
                out[where[keep]] = block[keep]
    return out
