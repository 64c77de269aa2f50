"""One Parquet file OUT, written through its pieces in `OUT.partial/` (see store.output)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featx.errors import BadInput, Damaged, option
from featx.store import atomic
from featx.store.output import (
    LAST_RUN_KEY,
    PARTIAL,
    STAT_COLUMNS,
    Changes,
    Finished,
    Key,
    Output,
    recorded,
    stamp,
    with_stats,
)
from featx.store.schema import METADATA_KEY, parquet_options, row_keys


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTIAL)


class SingleFile(Output):
    """One Parquet file OUT; an unfinished run keeps its pieces in `OUT.partial/`.

    At the end the pieces (and the rows of OUT that still hold) are merged into OUT through a
    temporary file and an atomic rename: OUT is always the previous complete file or the new one.
    """

    @property
    def state_dir(self) -> Path:
        return partial_dir(self.target)

    @property
    def kept_in(self) -> Path:
        return self.state_dir

    def check_target(self) -> None:
        if self.target.is_dir():
            raise BadInput(f"-o {self.target} is a folder; give a file name such as {self.target / 'features.parquet'}")
        super().check_target()

    def _complete_provenance(self) -> dict | None:
        """The settings OUT was made with; a file featx cannot resume is refused in one line
        (never read under --overwrite, which replaces it whatever it holds)."""
        if not self.target.exists():
            return None
        replace = f"pass {option('overwrite')} to replace it, or choose another output"
        try:
            schema = pq.read_schema(self.target)
        except (OSError, pa.ArrowException) as e:
            raise Damaged(f"{self.target} is not a Parquet file featx can read ({e}); {replace}", self.target) from None
        try:
            prov = json.loads((schema.metadata or {})[METADATA_KEY])
        except (KeyError, ValueError):
            prov = None
        if not isinstance(prov, dict) or "path" not in schema.names:
            raise BadInput(f"{self.target} is a Parquet file featx did not write (no featx rows in it); {replace}")
        return prov

    def _unfinished(self) -> dict | None:
        if self.state_dir.exists() and not self.state_file.is_file():
            shutil.rmtree(self.state_dir, ignore_errors=True)  # killed before its state: nothing to keep
        return self.read_state()

    def pieces(self) -> list[Path]:
        return sorted(self.state_dir.glob("rows-*.parquet"))

    def error_pieces(self) -> list[Path]:
        return sorted(self.state_dir.glob("errors-*.parquet"))

    def _old(self) -> list[Path]:
        return [self.target] if self.target.exists() and not self.overwrite else []

    def _done_sources(self) -> list[Path]:
        return self._old() + (self.pieces() + self.error_pieces() if self.resume else [])

    def _row_piece(self, index: int) -> Path:
        return self.state_dir / f"rows-{index:06d}-{self.token}.parquet"

    def _error_piece(self, index: int) -> Path:
        return self.state_dir / f"errors-{index:06d}-{self.token}.parquet"

    def _discard(self) -> None:
        """The pieces of an earlier run (a new run starts clean; a finished one leaves none)."""
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def rows(self) -> int:
        return pq.ParquetFile(self.target).metadata.num_rows

    def finish(self, schema: pa.Schema) -> Finished:
        """Merge the pieces and OUT's rows that still hold into OUT, atomically; drop the state.

        Memory stays at one row group at a time (plus the paths).
        """
        self._start()
        old = self._old()
        sources = self.pieces() + old  # this run's rows first: they win over OUT's
        owner: dict[Key, int] = {}
        for i, source in enumerate(sources):
            for key, stat in recorded(source, self.stats):
                if self.stats.get(key[0]) == stat:
                    owner.setdefault(key, i)
        # Under --overwrite OUT is replaced unread, whatever it holds: nothing of it is kept.
        before = {k for k, _ in recorded(self.target, self.stats)} if old else set()
        computed = {p for p, i in owner.items() if sources[i] not in old}
        changes = Changes.between(before, set(owner), computed)
        if old and not computed and before == set(owner):
            # Failures tried again and failing again, nothing added, replaced or dropped: OUT
            # (and its record of the run that last changed it) stays as it is.
            rows, failures = self.rows(), self._failures(set(owner))
        else:
            rows, failures = self._merge(sources, old, owner, schema, changes)
        err = self.errors_file
        self._write_errors(failures, err)
        self._discard()
        return Finished(rows, len(failures), changes, err if failures else None)

    def _merge(
        self, sources: list[Path], old: list[Path], owner: dict[Key, int], schema: pa.Schema, changes: Changes
    ) -> tuple[int, list[dict]]:
        """Write the rows each key's owner holds into OUT, atomically: (rows, failures)."""
        schema = with_stats(schema).with_metadata(
            (schema.metadata or {}) | {LAST_RUN_KEY: json.dumps(changes.record())}
        )
        names = [n for n in schema.names if n not in STAT_COLUMNS]
        tmp = atomic.temporary(self.state_dir / "final.parquet")
        rows = 0
        try:
            with pq.ParquetWriter(tmp, schema, **parquet_options(schema)) as writer:
                for i, source in enumerate(sources):
                    pf = pq.ParquetFile(source)
                    for g in range(pf.num_row_groups):
                        table = pf.read_row_group(g)
                        keep = [owner.get(k) == i for k in row_keys(table)]
                        if not all(keep):
                            table = table.filter(pa.array(keep))
                        if table.num_rows:
                            writer.write_table(stamp(table.select(names), self.stats).cast(schema))
                            rows += table.num_rows
            atomic.fsync_file(tmp)
            failures = self._failures(set(owner))
            if rows:
                atomic.publish(tmp, self.target)
            elif self.target.exists():
                self.target.unlink()  # every image gone or failing: no rows is the truth now
                atomic.fsync_dir(self.target.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return rows, failures
