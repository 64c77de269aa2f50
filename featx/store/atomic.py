"""Writes a resume may trust: a unique temporary name, fsync, rename, fsync of the folder.

Temporary names carry the process id and a random token, so two processes (or a killed run's
leftovers) never write through the same temporary file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def temporary(path: Path) -> Path:
    """A hidden name beside `path` that no other process or run uses."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def publish(tmp: Path, path: Path) -> None:
    """Rename a complete, fsynced `tmp` to `path` and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` so that `path` is either absent/old or complete, and durable."""
    tmp = temporary(path)
    try:
        with pq.ParquetWriter(tmp, table.schema) as w:
            w.write_table(table)
        fsync_file(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path: Path) -> None:
    """Write `obj` as JSON to `path` atomically and durably."""
    tmp = temporary(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, sort_keys=True, indent=1)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_dir(folder: Path) -> None:
    """Create `folder` (and its parents) so that its entry survives a power loss."""
    if folder.is_dir():
        return
    make_dir(folder.parent)
    folder.mkdir(exist_ok=True)
    fsync_dir(folder.parent)
