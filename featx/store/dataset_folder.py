"""A Parquet dataset folder of parts, written by `featx extract --engine ray` (see store.output)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featx.errors import BadInput, option
from featx.store import atomic
from featx.store.output import STATE, WORK, Changes, Finished, Key, Output, recorded
from featx.store.schema import row_keys

PART = re.compile(r"part-\d{6}(-[0-9a-f]+)?\.parquet")


class DatasetFolder(Output):
    """A Parquet dataset folder: `part-NNNNNN-TOKEN.parquet` rows, `_featx/` settings and errors.

    Each part appears complete or not at all; the folder's failures are listed in
    `FOLDER.errors.parquet` beside it.
    """

    @property
    def state_dir(self) -> Path:
        return self.target / WORK

    @property
    def kept_in(self) -> Path:
        return self.target

    def check_target(self) -> None:
        if self.target.is_file():
            raise BadInput(
                f"-o {self.target} is a file; --engine ray writes a folder of Parquet parts, "
                f"give e.g. {self.target.with_suffix('')}"
            )
        super().check_target()
        if not self.target.is_dir():
            return
        foreign = sorted(
            p.name
            for p in self.target.iterdir()
            if p.name != WORK and not p.name.startswith(".") and not PART.fullmatch(p.name)
        )
        if foreign:
            raise BadInput(
                f"-o {self.target} holds files featx did not write ({', '.join(foreign[:3])}); "
                f"choose a new or empty folder"
            )

    def _complete_provenance(self) -> dict | None:
        state = self.read_state()
        if state is None and self.pieces():
            raise BadInput(f"{self.target} has parts but no {WORK}/{STATE}; pass {option('overwrite')}")
        return None if state is None else {k: v for k, v in state.items() if k not in ("run", "last_run")}

    def _unfinished(self) -> dict | None:
        state = self.read_state()
        return state if state is not None and "run" in state else None

    def pieces(self) -> list[Path]:
        return sorted(p for p in self.target.glob("part-*.parquet") if PART.fullmatch(p.name))

    def error_pieces(self) -> list[Path]:
        return sorted(self.state_dir.glob("part-*.errors.parquet"))

    def _done_sources(self) -> list[Path]:
        if self.overwrite and not self.resume:
            return []
        return self.pieces() + (self.error_pieces() if self.resume else [])

    def _row_piece(self, index: int) -> Path:
        return self.target / f"part-{index:06d}-{self.token}.parquet"

    def _error_piece(self, index: int) -> Path:
        return self.state_dir / f"part-{index:06d}-{self.token}.errors.parquet"

    def _run_state(self) -> dict:
        previous = (self.read_state() or {}).get("last_run")
        return {"before": [p.name for p in self.pieces()]} | ({"last_run": previous} if previous else {})

    def _discard(self) -> None:
        """A new run: failures are retried; --overwrite drops the parts. Rows gone stale go."""
        before: set[Key] = set()
        for part in self.pieces():
            before.update(k for k, _ in recorded(part, self.stats))
        atomic.make_dir(self.state_dir)
        ordered = sorted(before, key=lambda k: (k[0], k[1] or ""))
        atomic.write_atomic(
            pa.table(
                {
                    "path": pa.array([k[0] for k in ordered], pa.string()),
                    "region": pa.array([k[1] for k in ordered], pa.string()),
                }
            ),
            self.state_dir / "before.parquet",
        )
        for f in self.error_pieces():
            f.unlink()
        if self.overwrite:
            for f in self.pieces():
                f.unlink()
        self._drop_stale()
        atomic.fsync_dir(self.target)

    def _drop_stale(self) -> dict[Path, list[Key]]:
        """Rewrite each part without the rows of images gone or changed since (or duplicated);
        the keys each part left holds, so that no caller reads the parts' keys again."""
        seen: set[Key] = set()
        held: dict[Path, list[Key]] = {}
        for part in self.pieces():
            rows = recorded(part, self.stats)
            keep = [self.stats.get(k[0]) == s and k not in seen for k, s in rows]
            keys = [k for (k, _), kept in zip(rows, keep) if kept]
            seen.update(keys)
            if keys:
                held[part] = keys
            if all(keep):
                continue
            if any(keep):
                atomic.write_atomic(pq.read_table(part).filter(pa.array(keep)), part)
            else:
                part.unlink()
        return held

    def rows(self) -> int:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.pieces())

    def finish(self) -> Finished:
        """Drop rows gone stale, list the failures beside the folder, record what changed."""
        self._start()
        held = self._drop_stale()
        state = self.read_state() or {}
        run = state.get("run", {})
        before_parts = set(run.get("before", []))
        before_file = self.state_dir / "before.parquet"
        before = set(row_keys(pq.read_table(before_file))) if before_file.exists() else set()
        after: set[Key] = set()
        computed: set[Key] = set()
        for part, keys in held.items():
            after.update(keys)
            if part.name not in before_parts:
                computed.update(keys)
        changes = Changes.between(before, after, computed)
        failures = self._failures(after)
        err = self.errors_file
        self._write_errors(failures, err)
        complete = {k: v for k, v in (state or self.provenance).items() if k != "run"}
        previous = run.get("last_run")
        # A run that changed no row leaves the record of the run that last did.
        unchanged = (changes.added, changes.replaced, changes.dropped) == (0, 0, 0)
        complete["last_run"] = previous if unchanged and previous else changes.record()
        atomic.write_json(complete, self.state_file)
        before_file.unlink(missing_ok=True)
        return Finished(self.rows(), len(failures), changes, err if failures else None)
