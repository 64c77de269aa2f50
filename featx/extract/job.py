"""What a run is to do, planned once for both engines, and what it did.

    job = plan_job(paths, config, regions, shard)    # discover, regions table, shard, files
    todo = job.todo(output, provenance, overwrite)   # refuses other settings; what is left
    ... an engine (featx.extract.local or featx.extract.ray_engine) describes `todo` ...
    return job.result(output, provenance, started, tally, finished)

Both engines plan through here, word a failed write through `writing`, and report an
ExtractResult, so `featx extract` behaves the same on this machine and on a Ray cluster.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from featx import store
from featx.errors import BadInput
from featx.extract.batching import BatchStats
from featx.extract.config import ExtractConfig
from featx.extract.discover import Item, discover
from featx.extract.regions import plan_regions
from featx.extract.shard import parse_shard, shard_of, take_shard

# Where a run spends its time, as `featx extract --profile` lists it.
STAGES = ("decode", "model", "aggregate", "write")


@dataclass
class ExtractResult:
    """What a run did: rows in the output, failures recorded, time per stage."""

    output: Path
    rows: int  # rows in the finished output (including resumed ones); 0 if interrupted
    new_rows: int  # rows computed by this run
    failures: int
    seconds: float
    settings_hash: str
    errors_file: Path | None = None
    interrupted: bool = False
    stage_seconds: dict = field(default_factory=dict)
    changes: store.Changes | None = None  # added, replaced, dropped against OUT before the run
    batches: BatchStats = field(default_factory=BatchStats)
    unit: str = "images"  # what a row describes: "images", or "regions" (--regions)
    kept_in: Path | None = None  # where an interrupted run's pieces wait for the rerun; None: none kept

    @property
    def images_per_second(self) -> float:
        return self.new_rows / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        """The run in one line: rows, what changed, failures, time, rate, batches, the errors file."""
        changes = self.changes
        changed = (
            f", {changes.replaced} replaced, {changes.dropped} dropped"
            if changes and (changes.replaced or changes.dropped)
            else ""
        )
        unit = self.unit
        return (
            f"{self.output}: {self.rows} {unit} ({self.new_rows} new{changed}), {self.failures} failures, "
            f"{self.seconds:.1f} s, {self.images_per_second:.2f} {unit}/s"
            + (f"; {self.batches.summary()}" if self.batches.batches else "")
            + (f"; failures listed in {self.errors_file}" if self.errors_file else "")
        )

    def resume_hint(self, overwrite: bool) -> str:
        """What an interrupted run kept, and the command that resumes it (or starts it again)."""
        again = f"rerun the same command{' (with --overwrite or without)' if overwrite else ''}"
        if self.kept_in is None:
            return f"interrupted before any {self.unit} were persisted, so nothing is kept; {again} to start over"
        failed = f" and {self.failures} failures" if self.failures else ""
        return (
            f"interrupted after {self.new_rows} new {self.unit}{failed}; they are kept in {self.kept_in} — "
            f"{again} to resume"
        )

    def profile(self) -> list[str]:
        """Seconds and share of the time per stage, one line each."""
        total = sum(self.stage_seconds.values()) or 1.0
        return [f"  {stage:<9} {s:8.2f} s  {100 * s / total:5.1f}%" for stage, s in self.stage_seconds.items()]


@dataclass
class Tally:
    """What an engine's describing did so far: rows, failures, time per stage, batches."""

    new_rows: int = 0
    failures: int = 0
    interrupted: bool = False
    stage_seconds: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    batches: BatchStats = field(default_factory=BatchStats)


@dataclass(frozen=True)
class Job:
    """One extraction, planned: the images (or regions) to cover and the files behind them."""

    config: ExtractConfig
    items: list[Item]  # in order; one per region with a regions table
    files: dict[str, Path]  # the file behind every path the output will record
    region_errors: list[dict] = field(default_factory=list)  # regions no image can answer
    regions: dict | None = None  # the regions table's identity (None: whole images)

    @property
    def unit(self) -> str:
        return "images" if self.regions is None else "regions"

    def todo(self, output: store.Output, provenance: dict, overwrite: bool = False) -> list[Item]:
        """The items `output` does not hold yet (new or changed since); refuses other settings.

        Sets `output.up_to_date` when nothing is left to do or to drop.
        """
        if self.regions is None:
            left = set(output.begin(provenance, self.files, overwrite))
            return [it for it in self.items if it.path in left]
        left = set(output.begin(provenance, self.files, overwrite, keys=[it.key for it in self.items]))
        return [it for it in self.items if it.key in left]

    def result(
        self,
        output: store.Output,
        provenance: dict,
        started: float,
        tally: Tally,
        finished: store.Finished | None = None,
    ) -> ExtractResult:
        """The ExtractResult of a run that began at `started` (time.perf_counter)."""
        seconds = time.perf_counter() - started
        common = dict(output=output.target, settings_hash=provenance["settings_hash"], unit=self.unit)
        if output.up_to_date:
            return ExtractResult(rows=output.rows(), new_rows=0, failures=0, seconds=seconds, **common)
        done = dict(stage_seconds=tally.stage_seconds, batches=tally.batches)
        if finished is None:
            return ExtractResult(
                rows=0,
                new_rows=tally.new_rows,
                failures=tally.failures,
                seconds=seconds,
                interrupted=True,
                kept_in=output.kept_in if output.started else None,  # nothing persisted: nothing kept
                **common,
                **done,
            )
        return ExtractResult(
            rows=finished.rows,
            new_rows=tally.new_rows,
            failures=finished.failures,
            seconds=seconds,
            errors_file=finished.errors_file,
            changes=finished.changes,
            **common,
            **done,
        )


def plan_job(paths, config: ExtractConfig, regions=None, shard: str | tuple[int, int] | None = None) -> Job:
    """Discover the images under `paths`; with `regions`, one item per region; keep `shard` K/N."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    items = discover(paths)
    if not items:
        raise BadInput(f"no images found under {', '.join(map(str, paths))}; check the PATH")
    discovered = {it.path: it.file for it in items}
    region_errors, identity = [], None
    if regions is not None:
        # All regions of an image share its path, so its shard.
        items, region_errors, identity = expand_regions(regions, items, paths, shard)
    elif shard is not None:
        items = take_shard(items, shard)
    files = recorded_files(items, region_errors, discovered, Path(paths[0]).expanduser())
    return Job(config, items, files, region_errors, identity)


def expand_regions(regions, items: list[Item], paths, shard) -> tuple[list[Item], list[dict], dict]:
    """The items of a regions table, its failing regions and its identity; `shard` keeps one shard."""
    plan = plan_regions(regions, items, paths)
    todo, errors = list(plan.items), list(plan.errors)
    if shard is not None:
        k, n = parse_shard(shard) if isinstance(shard, str) else shard
        todo = [it for it in todo if shard_of(it.path, n) == k]
        errors = [r for r in errors if shard_of(r["path"], n) == k]
    if not plan.items:
        first = plan.errors[0]
        raise BadInput(
            f"none of the {len(plan.errors)} regions can be described (first: {first['path']} region "
            f"{first['region']}: {first['message']}); fix the regions table"
        )
    return todo, errors, plan.identity


def recorded_files(
    items: list[Item], region_errors: list[dict], discovered: dict[str, Path], root: Path
) -> dict[str, Path]:
    """The file behind each path the output will record: the items' images, and the paths of
    failing regions (an image none of whose regions could be cut, or no image at all)."""
    files = {it.path: it.file for it in items}
    for record in region_errors:
        files.setdefault(record["path"], discovered.get(record["path"], root / record["path"]))
    return files


def write_error(e: OSError, target: Path) -> BadInput:
    """An OSError while writing `target` as one line with the fix (disk full: free space, resume)."""
    if e.errno == errno.ENOSPC:
        return BadInput(f"disk full while writing {target}; free some space and rerun the same command to resume")
    return BadInput(f"cannot write {getattr(e, 'filename', None) or target} ({e.strerror or e}); check the -o folder")


@contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn an OSError raised inside into `write_error`'s one line: pieces kept, resumable."""
    try:
        yield
    except OSError as e:
        raise write_error(e, target) from None
