"""`featx extract`, locally: discover -> decode/rescale (threads) -> batch -> dense VGG ->
pool, flip, aggregate, L2 -> Parquet pieces -> one complete file.

A Run reads as its stages: `plan` (what exists, what to resume, what is left), `describe_all`
(decode ahead of the net, describe row groups, persist each as a piece) and `finish` (merge
the pieces into OUT atomically).
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from featx import store
from featx.errors import BadInput
from featx.extract.batching import BatchStats
from featx.extract.config import ExtractConfig
from featx.extract.decode import Decoded, ImageError
from featx.extract.describer import make_describer, provenance
from featx.extract.descriptor import DenseDescriber
from featx.extract.discover import Item, discover
from featx.extract.live import progress_bar, sigterm_as_interrupt
from featx.extract.regions import plan_regions
from featx.extract.shard import parse_shard, shard_of, take_shard
from featx.extract.stages import (
    STAGES,
    decode_items,
    describe_group,
    error_record,
    group_rows,
)
from featx.net.device import resolve_device, resolve_devices
from featx.store.paths import make_parent


@dataclass
class ExtractResult:
    """What a run did: rows in the output, failures recorded, time per stage."""

    output: Path
    rows: int  # rows in the output file now (including resumed ones)
    new_rows: int  # rows computed by this run
    failures: int
    seconds: float
    settings_hash: str
    errors_file: Path | None = None
    interrupted: bool = False
    stage_seconds: dict = field(default_factory=dict)
    changes: store.Changes | None = None  # added, replaced, dropped against OUT before the run
    batches: BatchStats = field(default_factory=BatchStats)

    @property
    def images_per_second(self) -> float:
        return self.new_rows / self.seconds if self.seconds else 0.0


@dataclass
class _Tally:
    new_rows: int = 0
    failures: int = 0
    interrupted: bool = False


class Run:
    """One extraction job: decides what to resume, runs the stages, finalises the output."""

    def __init__(
        self,
        paths,
        output,
        config: ExtractConfig,
        overwrite: bool,
        progress: bool,
        shard=None,
        wait: bool = False,
        regions=None,
    ):
        self.config, self.overwrite, self.show_progress = config, overwrite, progress
        self.out = Path(output).expanduser()
        if self.out.is_dir():
            raise BadInput(f"-o {self.out} is a folder; give a file name such as {self.out / 'features.parquet'}")
        self.items = discover(paths)
        if not self.items:
            raise BadInput(f"no images found under {', '.join(map(str, paths))}; check the PATH")
        # --regions: one item per region (all regions of an image share its path, so its shard).
        self.regions, self.region_errors = None, []
        self.roots = [Path(p).expanduser() for p in paths]
        self.discovered = {it.path: it.file for it in self.items}
        if regions is not None:
            self.items, self.region_errors, self.regions = expand_regions(regions, self.items, paths, shard)
        elif shard is not None:
            self.items = take_shard(self.items, shard)
        self.output = store.SingleFile(self.out, wait=wait)
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)
        self.batches = BatchStats()
        self._advance: Callable[[float], None] = lambda n: None
        self._lock = threading.Lock()

    # -- plan: what exists, what is left -------------------------------------------------
    def plan(self, prov: dict) -> list[Item]:
        """The images (or regions) still to describe (new or changed since); refuses other settings."""
        keys = [it.key for it in self.items] if self.regions is not None else None
        todo = set(self.output.begin(prov, self.files(), self.overwrite, keys=keys))
        return [it for it in self.items if (it.key if keys is not None else it.path) in todo]

    def files(self) -> dict[str, Path]:
        return recorded_files(self.items, self.region_errors, self.discovered, self.roots[0])

    # -- describe: decode ahead of the net, one piece per row group ----------------------
    def _decode(self, items: list[Item]) -> list[Decoded | ImageError]:
        t = time.perf_counter()
        try:
            return decode_items(items, self.config)
        finally:
            with self._lock:
                self.stage_seconds["decode"] += time.perf_counter() - t

    def decoded(self, items: list[Item]) -> Iterator[tuple[Item, Decoded | ImageError]]:
        """Decode in `workers` threads ahead of the model, in order, with a bounded window.

        The unit of work is a file: the regions of one image are cut from one decode.
        """
        files = [list(g) for _, g in itertools.groupby(items, key=lambda it: it.file)]
        if self.config.workers == 0:
            for group in files:
                yield from zip(group, self._decode(group))
            return
        window = max(2 * self.config.rows_per_group, 4 * self.config.workers)
        with ThreadPoolExecutor(self.config.workers, thread_name_prefix="featx-decode") as pool:
            pending: deque[tuple[list[Item], Future]] = deque()
            try:
                for group in files:
                    pending.append((group, pool.submit(self._decode, group)))
                    if len(pending) >= window:
                        head, fut = pending.popleft()
                        yield from zip(head, fut.result())
                while pending:
                    head, fut = pending.popleft()
                    yield from zip(head, fut.result())
            finally:
                for _, fut in pending:
                    fut.cancel()

    def _on_batch(self, images: int, seconds: float) -> None:
        self.stage_seconds["model"] += seconds
        self._advance(images / len(self.config.scales))

    def flush(
        self,
        schema: pa.Schema,
        group: list[tuple[Item, Decoded]],
        errors: list[dict],
        describer: DenseDescriber | list[DenseDescriber],
    ) -> int:
        """Describe one row group and persist it (rows and errors) as a piece; rows written."""
        rows = None
        if group:
            features, failed = describe_group(
                describer, [d for _, d in group], self.config, self._on_batch, self.batches
            )
            errors.extend(error_record(group[i][0], e) for i, e in failed.items())
            t = time.perf_counter()
            rows = group_rows(schema, group, features, failed)
            self.stage_seconds["aggregate"] += time.perf_counter() - t
        t = time.perf_counter()
        self.output.add(rows, errors)
        self.stage_seconds["write"] += time.perf_counter() - t
        return 0 if rows is None else rows.num_rows

    def describe_all(
        self, todo: list[Item], describer: DenseDescriber | list[DenseDescriber], schema: pa.Schema
    ) -> _Tally:
        tally = _Tally()
        cfg = self.config

        def flush(group, errors):
            written = self.flush(schema, group, errors, describer)
            tally.new_rows += written
            tally.failures += len(group) + len(errors) - written

        try:
            with progress_bar(len(todo), self.show_progress) as self._advance, sigterm_as_interrupt():
                group: list[tuple[Item, Decoded]] = []
                errors: list[dict] = list(self.region_errors)  # regions no image can answer
                for item, result in self.decoded(todo):
                    if isinstance(result, ImageError):
                        errors.append(error_record(item, result))
                        self._advance(1)
                    else:
                        group.append((item, result))
                    if len(group) + len(errors) >= cfg.rows_per_group:
                        flush(group, errors)
                        group, errors = [], []
                if group or errors:
                    flush(group, errors)
        except KeyboardInterrupt:
            tally.interrupted = True
        except OSError as e:
            raise disk_error(e, self.out) from None
        return tally

    # -- finish: the pieces (and what still holds of OUT) merged into OUT atomically ------
    def finish(self, schema: pa.Schema) -> store.Finished:
        t = time.perf_counter()
        try:
            finished = self.output.finish(schema)
        except OSError as e:
            raise disk_error(e, self.out) from None
        self.stage_seconds["write"] += time.perf_counter() - t
        return finished

    # -- the job -------------------------------------------------------------------------
    def run(self) -> ExtractResult:
        make_parent(self.out, "-o")  # a new output folder is made, not refused
        with self.output:  # one writer per OUT: store.Locked names the holder
            return self._run()

    def _run(self) -> ExtractResult:
        cfg = self.config
        t0 = time.perf_counter()
        devices = resolve_devices(cfg.devices) if cfg.devices else [resolve_device(cfg.device)]
        device = devices[0]
        if cfg.devices and device.type != resolve_device(cfg.device).type:
            raise BadInput(
                f"--devices {cfg.devices} are not of --device {cfg.device}'s type; pass --device {device.type} too"
            )
        prov = provenance(cfg, ",".join(map(str, devices)), regions=self.regions)
        todo = self.plan(prov)
        if self.output.up_to_date:
            return ExtractResult(self.out, self.output.rows(), 0, 0, time.perf_counter() - t0, prov["settings_hash"])
        schema = store.feature_schema(cfg.dim, prov, regions=self.regions is not None)
        tally = _Tally()
        if todo or self.region_errors:
            describer = make_describer(cfg, device) if len(devices) == 1 else [make_describer(cfg, d) for d in devices]
            tally = self.describe_all(todo, describer, schema)
        if tally.interrupted:
            return ExtractResult(
                self.out,
                0,
                tally.new_rows,
                tally.failures,
                time.perf_counter() - t0,
                prov["settings_hash"],
                interrupted=True,
                stage_seconds=self.stage_seconds,
                batches=self.batches,
            )
        done = self.finish(schema)
        return ExtractResult(
            self.out,
            done.rows,
            tally.new_rows,
            done.failures,
            time.perf_counter() - t0,
            prov["settings_hash"],
            errors_file=done.errors_file,
            stage_seconds=self.stage_seconds,
            changes=done.changes,
            batches=self.batches,
        )


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


def disk_error(e: OSError, out: Path) -> BadInput:
    """An OSError while writing OUT as one line with the fix (disk full: free space, resume)."""
    if e.errno == errno.ENOSPC:
        return BadInput(f"disk full while writing {out}; free some space and rerun the same command to resume")
    return BadInput(f"cannot write {getattr(e, 'filename', None) or out} ({e.strerror or e}); check the -o folder")


def extract_features(
    paths,
    output,
    config: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    shard: str | tuple[int, int] | None = None,
    wait: bool = False,
    regions=None,
    **settings,
) -> ExtractResult:
    """Describe every image under `paths` and write the features to `output` (Parquet).

    Settings are an ExtractConfig or keyword arguments of one (model="vgg16", scales=(256,),
    ...). An existing `output` with the same settings is resumed (new and changed images are
    described, removed ones dropped); other settings are refused unless `overwrite`. Another
    process writing `output` makes this call raise Locked, or wait for it if `wait`.
    `shard="K/N"` keeps only shard K of N (featx.extract.shard: by path hash).
    `regions` (a CSV or Parquet file, a DataFrame or Arrow table with path, x1, y1, x2, y2 and
    optionally region) describes those boxes instead of whole images: one row per region
    (featx.extract.regions).
    Paper: arXiv 1409.1556, Appendix B.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    config = (config or ExtractConfig()).replace(**settings) if settings else (config or ExtractConfig())
    return Run(list(paths), output, config, overwrite, progress, shard, wait, regions).run()
