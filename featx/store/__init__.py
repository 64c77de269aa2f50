"""Storage: the Parquet schema and provenance, one locked and resumable output, readers.

Both engines (local and Ray) write through an `output.Output` (`single_file.SingleFile` or
`dataset_folder.DatasetFolder`); downstream code reads through `read`; `info` says what a
feature file or folder holds.
"""

from featx.store.atomic import fsync_dir, write_atomic, write_json
from featx.store.dataset_folder import DatasetFolder
from featx.store.info import FeatureInfo, feature_info, read_last_run
from featx.store.lock import OutputLock
from featx.store.output import LAST_RUN_KEY, STAT_COLUMNS, Changes, Finished, Output, with_stats
from featx.store.read import (
    feature_files,
    feature_matrix,
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
    parquet_options,
    row_keys,
    rows_table,
)
from featx.store.single_file import SingleFile, partial_dir

__all__ = [
    "ERROR_COLUMNS",
    "ERROR_SCHEMA",
    "LAST_RUN_KEY",
    "METADATA_KEY",
    "REGION_COLUMNS",
    "STAT_COLUMNS",
    "Changes",
    "DatasetFolder",
    "FeatureInfo",
    "Finished",
    "Output",
    "OutputLock",
    "SingleFile",
    "differing",
    "errors_path",
    "errors_table",
    "feature_files",
    "feature_info",
    "feature_matrix",
    "feature_schema",
    "fsync_dir",
    "load_xy",
    "parquet_options",
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
