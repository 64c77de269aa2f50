"""Unfinished runs: row groups persisted as pieces, merged atomically into one file.

While a run goes on, each row group is persisted as its own small Parquet file in
`OUT.partial/` (written under a temporary name, then renamed). At the end the pieces are
merged into OUT through a temporary file and an atomic rename, so OUT is always either the
previous complete file or the new complete one, and a killed run resumes from its pieces.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featx.errors import BadInput
from featx.store import atomic
from featx.store.schema import errors_path, errors_table


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


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
            raise BadInput(
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
            atomic.write_atomic(errors_table(errors), self.folder / f"errors-{i:06d}.parquet")
        if rows is not None and rows.num_rows:
            atomic.write_atomic(rows, self.folder / f"rows-{i:06d}.parquet")

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
        atomic.fsync_dir(out.parent)
    else:
        tmp.unlink()
    if failures:
        atomic.write_atomic(errors_table(sorted(failures.values(), key=lambda r: r["path"])), err_out)
    elif err_out.exists():
        err_out.unlink()
    return rows, len(failures)
