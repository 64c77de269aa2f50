"""Writes a resume may trust: a unique temporary name, fsync, rename, fsync of the folder.

Temporary names carry the process id and a random token, so two processes (or a killed run's
leftovers) never write through the same temporary file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featx.store.schema import parquet_options


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
        with pq.ParquetWriter(tmp, table.schema, **parquet_options(table.schema)) as w:
            w.write_table(table)
        fsync_file(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path: Path, *, indent: int = 1, sort_keys: bool = True) -> None:
    """Write `obj` as JSON (through `json_ready`) to `path` atomically and durably."""
    tmp = temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_ready(obj), f, sort_keys=sort_keys, indent=indent, allow_nan=False)
            f.write("\n")
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


def json_ready(obj):
    """`obj` as plain JSON values: numpy scalars as Python numbers, tuples as lists, and a value
    JSON cannot hold (NaN, infinity: e.g. the AP of a class without positives) as null."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_text(text: str, path: Path) -> None:
    """Write `text` to `path` atomically and durably (UTF-8)."""
    tmp = temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_folder(path: Path) -> Path:
    """A new, empty hidden folder beside `path` to fill before `replace_folder` puts it in place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    return tmp


def replace_folder(tmp: Path, path: Path) -> None:
    """Make the filled folder `tmp` the folder `path` (its files fsynced first), replacing an old one.

    A reader sees the old folder or the new one. Replacing needs two renames (the old folder
    is moved aside, then removed), so a crash between them leaves the old one under a hidden
    name beside `path` and no `path`: never a half-written one.
    """
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(tmp)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
