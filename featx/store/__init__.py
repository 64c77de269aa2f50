"""Storage: the Parquet schema and provenance, one locked and resumable output, readers.

Both engines (local and Ray) write through `output` (a single file or a dataset folder);
downstream code reads through `read`.
"""

from featx.store.atomic import fsync_dir, write_atomic, write_json
from featx.store.lock import OutputLock
from featx.store.output import (
    LAST_RUN_KEY,
    STAT_COLUMNS,
    Changes,
    DatasetFolder,
    Finished,
    Output,
    SingleFile,
    partial_dir,
    read_last_run,
    with_stats,
)
from featx.store.read import (
    feature_files,
    feature_matrix,
    iter_keys,
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
    REGION_COLUMNS,
    differing,
    errors_path,
    errors_table,
    feature_schema,
    row_keys,
    rows_table,
)

__all__ = [
    "ERROR_COLUMNS",
    "ERROR_SCHEMA",
    "LAST_RUN_KEY",
    "METADATA_KEY",
    "REGION_COLUMNS",
    "STAT_COLUMNS",
    "Changes",
    "DatasetFolder",
    "Finished",
    "Output",
    "OutputLock",
    "SingleFile",
    "differing",
    "errors_path",
    "errors_table",
    "feature_files",
    "feature_matrix",
    "feature_schema",
    "fsync_dir",
    "iter_keys",
    "iter_paths",
    "load_xy",
    "partial_dir",
    "read_features",
    "read_last_run",
    "read_provenance",
    "read_table",
    "row_keys",
    "rows_table",
    "with_stats",
    "write_atomic",
    "write_json",
]
