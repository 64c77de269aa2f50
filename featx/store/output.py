"""One output of a run, locked and resumable: what a single Parquet file (store.single_file)
and a dataset folder (store.dataset_folder) share.

Both engines write through an Output, so resume, the settings check, locking and durable
writes exist once:

    with SingleFile(out) as output:                       # or DatasetFolder(out); Locked if taken
        todo = output.begin(provenance, files, overwrite)  # refuses other settings; what is left
        output.add(rows, errors)                           # one piece, atomically and durably
        finished = output.finish(schema)                   # the complete output, what changed
                                                           # (a folder's finish takes no schema)

Resume is a fresh run over the images as they are now. Each row records its file's size and
mtime (`file_size`, `file_mtime_ns`): an image changed since is described again and replaces
its row, an image gone since loses its row, a moved one is both. An interrupted run resumes
with the command it was started with: its state records whether it began as an --overwrite,
which discards what existed before the run, once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from featx.errors import BadInput, Damaged, SettingsMismatch, option
from featx.store import atomic
from featx.store.lock import OutputLock, holder_path
from featx.store.schema import (
    ERROR_COLUMNS,
    METADATA_KEY,
    column,
    differing,
    errors_path,
    errors_table,
    row_keys,
)

log = logging.getLogger("featx")

STAT_COLUMNS = ("file_size", "file_mtime_ns")
LAST_RUN_KEY = b"featx.last_run"
STATE = "settings.json"
# Where each flavour keeps a run's state: a file OUT in `OUT.partial/`, a dataset folder in
# `FOLDER/_featx/` (the leading "_" hides it from pyarrow/pandas/Spark).
PARTIAL = ".partial"
WORK = "_featx"
# The temporary names of store.atomic: `.NAME.<pid>-<8 hex>.tmp` beside NAME.
TEMPORARY = re.compile(r"\.(?P<name>.+)\.\d+-[0-9a-f]{8}\.tmp")

Stat = tuple[int, int]
# What identifies a row: its path, and for a region (featx extract --regions) the region's id.
Key = tuple[str, str | None]


def is_output(path: Path) -> bool:
    """Whether featx writes, or wrote, an output at `path`: a feature file, a dataset folder,
    an unfinished run's state, or a run holding its lock."""
    if (path / WORK).is_dir() or path.with_name(path.name + PARTIAL).is_dir() or holder_path(path).exists():
        return True
    try:
        return path.is_file() and METADATA_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, pa.ArrowException):
        return False


def sibling(target: Path) -> Path:
    """The other output name whose failures `errors_path` lists in the same file: `x` for
    `x.parquet`, and `x.parquet` for `x`."""
    name = target.name
    return target.with_name(name[: -len(".parquet")] if name.endswith(".parquet") else name + ".parquet")


def as_key(wanted: str | Key) -> Key:
    """A path (one row per image) or a (path, region) key, as a key."""
    return wanted if isinstance(wanted, tuple) else (wanted, None)


def file_stats(files: Mapping[str, Path]) -> dict[str, Stat]:
    """(size, mtime in ns) of each image, by the path recorded in its row."""
    stats: dict[str, Stat] = {}
    for path, file in files.items():
        try:
            st = os.stat(file)
            stats[path] = (st.st_size, st.st_mtime_ns)
        except OSError:  # gone since discovery: its decode fails and is recorded as such
            stats[path] = (-1, -1)
    return stats


def with_stats(schema: pa.Schema) -> pa.Schema:
    """The feature schema plus where each row came from: its file's size and mtime (ns)."""
    for name in STAT_COLUMNS:
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.int64(), nullable=False))
    return schema


def stamp(table: pa.Table, stats: Mapping[str, Stat]) -> pa.Table:
    """`table` with its stat columns set from `stats`, by path."""
    table = table.drop_columns([c for c in STAT_COLUMNS if c in table.column_names])
    row_stats = [stats[p] for p in table.column("path").to_pylist()]
    for i, name in enumerate(STAT_COLUMNS):
        table = table.append_column(
            pa.field(name, pa.int64(), nullable=False), column([s[i] for s in row_stats], pa.int64())
        )
    return table


def recorded(source: Path, stats: Mapping[str, Stat]) -> list[tuple[Key, Stat | None]]:
    """((path, region), recorded stat) of each row of `source`, in order; region None for images.

    Files written before featx recorded stats are trusted by path (their stat is taken as now).
    """
    try:
        names = pq.read_schema(source).names
        keyed = [c for c in ("path", "region") if c in names]
        if all(c in names for c in STAT_COLUMNS):
            # ParquetFile, not pq.read_table (a dataset scan, which imports pandas into `featx extract`).
            t = pq.ParquetFile(source).read(columns=[*keyed, *STAT_COLUMNS])
            return list(
                zip(row_keys(t), zip(t.column(STAT_COLUMNS[0]).to_pylist(), t.column(STAT_COLUMNS[1]).to_pylist()))
            )
        keys = row_keys(pq.ParquetFile(source).read(columns=keyed))
    except (pa.ArrowException, OSError, KeyError) as e:  # cut short, overwritten, or not featx's
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the OS speaking (permission, ...), not a damaged file
        raise Damaged(
            f"{source} is damaged ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
            "delete that file and run again: what it held is computed again",
            source,
        ) from None
    return [(k, stats.get(k[0])) for k in keys]


@dataclass
class Changes:
    """What a run did to the output, against what it held before the run."""

    added: int = 0
    replaced: int = 0
    dropped: int = 0

    @classmethod
    def between(cls, before: set[Key], after: set[Key], computed: set[Key]) -> Changes:
        return cls(len(after - before), len(after & before & computed), len(before - after))

    def record(self) -> dict:
        return asdict(self) | {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@dataclass
class Finished:
    rows: int
    failures: int
    changes: Changes
    errors_file: Path | None


class Output:
    """What both flavours share: the lock, the run's state, the settings check, the plan."""

    def __init__(self, target: str | Path, wait: bool = False):
        self.target = Path(target).expanduser()
        self.lock = OutputLock(self.target, wait)
        # Piece names carry this token: unique per process and run, whatever the counters say.
        self.token = f"{os.getpid():x}{secrets.token_hex(3)}"
        self.stats: dict[str, Stat] = {}
        self.provenance: dict = {}
        self.overwrite = self.resume = self.started = False
        self.up_to_date = False
        self._index = 0

    # -- what a flavour says about itself ------------------------------------------------
    @property
    def state_dir(self) -> Path:
        raise NotImplementedError

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE

    @property
    def kept_in(self) -> Path:
        """Where an interrupted run's pieces wait for the rerun that resumes them."""
        raise NotImplementedError

    @property
    def errors_file(self) -> Path:
        """Where the output's failures are listed: `x.errors.parquet` beside `x.parquet` (or `x`)."""
        return errors_path(self.target)

    def check_target(self) -> None:
        """Refuse a target that featx cannot own in one line: the wrong kind (a folder for a file,
        a file for a folder; each flavour adds its check), an errors file's name, or a name whose
        errors file another output beside it already lists its failures in."""
        if self.target.name.endswith(".errors.parquet"):
            raise BadInput(
                f"-o {self.target}: names ending in .errors.parquet are featx's lists of failures, which "
                f"readers skip; choose another name"
            )
        other = sibling(self.target)
        if is_output(other):
            raise BadInput(
                f"-o {self.target} would list its failures in {self.errors_file}, which {other} beside it "
                f"already uses; choose another -o name"
            )

    def _complete_provenance(self) -> dict | None:
        raise NotImplementedError

    def _unfinished(self) -> dict | None:
        raise NotImplementedError

    def _done_sources(self) -> list[Path]:
        raise NotImplementedError

    def _row_piece(self, index: int) -> Path:
        raise NotImplementedError

    def _error_piece(self, index: int) -> Path:
        raise NotImplementedError

    def _discard(self) -> None:
        """What a new run (not a resumed one) clears of the work before it."""
        raise NotImplementedError

    def pieces(self) -> list[Path]:
        raise NotImplementedError

    def error_pieces(self) -> list[Path]:
        """The pieces that list failures, not rows: a stale record there is no stale row."""
        raise NotImplementedError

    def rows(self) -> int:
        raise NotImplementedError

    # -- the lock ------------------------------------------------------------------------
    def __enter__(self) -> Output:
        self.lock.acquire()
        try:
            self._clean_temporaries()
        except BaseException:
            self.lock.release()
            raise
        return self

    def _clean_temporaries(self) -> None:
        """Remove the temporary files killed runs of this output left (we hold its lock: no
        live run of it writes them); only names store.atomic makes for this output's files."""
        ours = {self.target.name, self.errors_file.name, holder_path(self.target).name}
        for folder, names in ((self.target.parent, ours), (self.state_dir, None), (self.kept_in, None)):
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                m = TEMPORARY.fullmatch(f.name)
                if m and (names is None or m.group("name") in names) and f.is_file():
                    f.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self.lock.release()

    # -- plan: what exists, whose settings, what is left ---------------------------------
    def read_state(self) -> dict | None:
        if not self.state_file.is_file():
            return None
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as e:
            raise Damaged(
                f"{self.state_file} is unreadable ({e}); pass {option('overwrite')} to start over", self.state_file
            ) from None
        if not isinstance(state, dict):
            raise Damaged(
                f"{self.state_file} holds a {type(state).__name__}, not the run's settings; pass "
                f"{option('overwrite')} to start over",
                self.state_file,
            )
        return state

    def begin(
        self, provenance: dict, files: Mapping[str, Path], overwrite: bool = False, keys: list[Key] | None = None
    ) -> list:
        """The paths (or, given `keys`, the (path, region) keys) still to describe; refuses
        existing work made with other settings. `files` maps every recorded path to its file.

        Reads only: nothing is written before the first piece (or `finish`).
        """
        self.check_target()
        self.provenance = provenance
        self.stats = file_stats(files)
        state = self._unfinished()
        if state is not None:
            same = state.get("settings_hash") == provenance["settings_hash"]
            began_as_overwrite = bool(state.get("run", {}).get("overwrite"))
            if same and (began_as_overwrite or not overwrite):
                self.resume, self.overwrite = True, began_as_overwrite
                if began_as_overwrite and not overwrite:
                    log.info(f"resuming the interrupted --overwrite run of {self.target}")
            elif overwrite:
                self.overwrite = True
            else:
                raise SettingsMismatch(
                    f"{self.state_dir} holds an unfinished run with other settings "
                    f"({differing(state, provenance)}); rerun with its settings to finish it, "
                    f"or pass {option('overwrite')}"
                )
        else:
            self.overwrite = overwrite
        if not self.overwrite:
            old = self._complete_provenance()
            if old is not None and old.get("settings_hash") != provenance["settings_hash"]:
                raise SettingsMismatch(
                    f"{self.target} holds features with other settings ({differing(old, provenance)}); "
                    f"pass {option('overwrite')} to replace it, or choose another output"
                )
        done: set[Key] = set()
        stale = False
        error_lists = set(self.error_pieces())
        for source in self._done_sources():
            for key, stat in recorded(source, self.stats):
                if self.stats.get(key[0]) == stat:
                    done.add(key)
                elif source not in error_lists:
                    stale = True
        todo = [k for k in (list(files) if keys is None else keys) if as_key(k) not in done]
        self.up_to_date = not (todo or stale or self.resume or self.overwrite)
        return todo

    # -- add: one piece at a time, each complete or absent -------------------------------
    def _start(self) -> None:
        """Record the run's state (settings, --overwrite) before its first piece."""
        if self.started:
            return
        self.started = True
        atomic.make_dir(self.state_dir)
        if not self.resume:
            self._discard()
            atomic.make_dir(self.state_dir)
            run = {"overwrite": self.overwrite, "started": time.time()} | self._run_state()
            atomic.write_json(self.provenance | {"run": run}, self.state_file)
        self._index = max(self._index, self._free_index())

    def _free_index(self) -> int:
        taken = [int(m.group(1)) for p in self.pieces() + self.error_pieces() if (m := re.search(r"-(\d{6})", p.name))]
        return max(taken, default=-1) + 1

    def _run_state(self) -> dict:
        return {}

    def next_index(self) -> int:
        """The first free piece number (after `begin`; the names' token keeps runs apart anyway)."""
        return max(self._index, self._free_index())

    def add(self, rows: pa.Table | None, errors: list[dict], index: int | None = None) -> None:
        """Persist one row group (and its failures) as a piece, each file complete or absent."""
        self._start()
        if index is None:
            index = self._index
        self._index = max(self._index, index + 1)
        # Rows first, errors second: a crash in between only costs a retry of the failures.
        if rows is not None and rows.num_rows:
            atomic.write_atomic(stamp(rows, self.stats), self._row_piece(index))
        if errors:
            atomic.write_atomic(stamp(errors_table(errors), self.stats), self._error_piece(index))

    # -- finish --------------------------------------------------------------------------
    def _failures(self, have_rows: set[Key]) -> list[dict]:
        """This run's failures of current images (or regions) that have no row, one per key."""
        failures: dict[Key, dict] = {}
        for source in self.error_pieces():
            for record in pq.read_table(source).to_pylist():
                path, key = record["path"], (record["path"], record.get("region"))
                stat = (record.get(STAT_COLUMNS[0]), record.get(STAT_COLUMNS[1]))
                if path in self.stats and key not in have_rows and (stat == self.stats[path] or stat == (None, None)):
                    failures[key] = {c: record[c] for c in ERROR_COLUMNS} | (
                        {"region": key[1]} if key[1] is not None else {}
                    )
        return [failures[k] for k in sorted(failures, key=lambda k: (k[0], k[1] or ""))]

    def _write_errors(self, failures: list[dict], out: Path) -> None:
        if failures:
            atomic.write_atomic(errors_table(failures), out)
        elif out.exists():
            out.unlink()
            atomic.fsync_dir(out.parent)
