"""Storage: the Parquet schema and provenance, atomic pieces and resume, readers.

Both engines (local and Ray) write through this package; downstream code reads through it.
"""

from featx.store.atomic import fsync_dir, write_atomic
from featx.store.pieces import Pieces, merge, partial_dir
from featx.store.read import (
    feature_files,
    feature_matrix,
    iter_paths,
    load_xy,
    read_features,
    read_provenance,
    read_table,
)
from featx.store.schema import (
    ERROR_COLUMNS,
    ERROR_SCHEMA,
    METADATA_KEY,
    errors_path,
    errors_table,
    feature_schema,
    rows_table,
)

__all__ = [
    "ERROR_COLUMNS", "ERROR_SCHEMA", "METADATA_KEY", "Pieces", "errors_path", "errors_table",
    "feature_files", "feature_matrix", "feature_schema", "fsync_dir", "iter_paths", "load_xy",
    "merge", "partial_dir", "read_features", "read_provenance", "read_table", "rows_table",
    "write_atomic",
]
