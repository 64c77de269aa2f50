"""`featx extract` on this machine: a planned Job -> decode/rescale (threads) -> batch -> dense
VGG -> pool, flip, aggregate, L2 -> Parquet pieces -> one complete file.

A LocalRun reads as its stages: the job's `todo` (what exists, what to resume, what is left),
`describe_all` (decode ahead of the net, describe row groups, persist each as a piece) and the
output's `finish` (merge the pieces into OUT atomically).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from featx import store
from featx.errors import BadInput
from featx.extract.decode import Decoded, ImageError
from featx.extract.describer import DenseDescriber, make_describer
from featx.extract.discover import Item
from featx.extract.job import ExtractResult, Job, Tally, writing
from featx.extract.progress import progress_bar, sigterm_as_interrupt
from featx.extract.provenance import provenance
from featx.extract.rowgroup import OpenedOnce, decode_items, describe_group, error_record, group_rows, work_units
from featx.net.device import resolve_device, resolve_devices
from featx.store.paths import make_parent

# A run's first row group holds at most this many images: a full group (64 images at three
# scales) takes minutes on a CPU, and a Ctrl-C or kill in that time should already find rows kept.
FIRST_GROUP = 8


class LocalRun:
    """A planned Job described on this machine into one file: one device, or several sharing batches."""

    def __init__(self, job: Job, output: store.SingleFile, overwrite: bool = False, progress: bool = False):
        self.job, self.config, self.output = job, job.config, output
        self.overwrite, self.show_progress = overwrite, progress
        self.tally = Tally()
        self.stage_seconds = self.tally.stage_seconds
        self._advance: Callable[[float], None] = lambda n: None
        self._lock = threading.Lock()
        self.stop = threading.Event()  # set when describing ends: decode threads stop reading

    # -- describe: decode ahead of the net, one piece per row group ----------------------
    def _decode(self, items: list[Item], image: OpenedOnce | None = None) -> list[Decoded | ImageError]:
        t = time.perf_counter()
        try:
            return decode_items(items, self.config, self.stop, image)
        finally:
            with self._lock:
                self.stage_seconds["decode"] += time.perf_counter() - t

    def decoded(self, items: list[Item]) -> Iterator[tuple[Item, Decoded | ImageError]]:
        """Decode in `workers` threads ahead of the model, in order, at most a window of boxes ahead.

        The window counts boxes (an image is one box; `--regions` gives an image many), so an
        image with thousands of regions never holds all its crops at every scale at once: its
        regions are cut in units of a few, from one decode shared by the units (OpenedOnce).
        When the consumer stops (Ctrl-C, SIGTERM), reads in progress give up at once (`stop`).
        """
        window = max(2 * self.config.rows_per_group, 4 * self.config.workers)
        units = work_units(items, max(1, window // (2 * max(1, self.config.workers))), self.config, self.stop)
        if self.config.workers == 0:
            for group, image in units:
                yield from zip(group, self._decode(group, image))
            return
        pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="featx-decode")
        pending: deque[tuple[list[Item], Future]] = deque()
        ahead = 0  # boxes submitted and not yet handed on
        try:
            for group, image in units:
                pending.append((group, pool.submit(self._decode, group, image)))
                ahead += len(group)
                while ahead >= window:
                    head, fut = pending.popleft()
                    ahead -= len(head)
                    yield from zip(head, fut.result())
            while pending:
                head, fut = pending.popleft()
                yield from zip(head, fut.result())
        finally:
            # Decoding ahead is useless now: queued units never start, running ones stop reading.
            self.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

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
                describer, [d for _, d in group], self.config, self._on_batch, self.tally.batches
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
    ) -> None:
        """Describe `todo` row group by row group, each persisted as a piece; Ctrl-C keeps them."""
        tally = self.tally

        def flush(group, errors):
            written = self.flush(schema, group, errors, describer)
            tally.new_rows += written
            tally.failures += len(group) + len(errors) - written

        try:
            with progress_bar(len(todo), self.show_progress) as self._advance, sigterm_as_interrupt():
                group: list[tuple[Item, Decoded]] = []
                errors: list[dict] = list(self.job.region_errors)  # regions no image can answer
                size = min(self.config.rows_per_group, FIRST_GROUP)
                for item, result in self.decoded(todo):
                    if isinstance(result, ImageError):
                        errors.append(error_record(item, result))
                        self._advance(1)
                    else:
                        group.append((item, result))
                    if len(group) + len(errors) >= size:
                        flush(group, errors)
                        group, errors = [], []
                        size = self.config.rows_per_group
                if group or errors:
                    flush(group, errors)
        except KeyboardInterrupt:
            tally.interrupted = True

    # -- the job -------------------------------------------------------------------------
    def run(self) -> ExtractResult:
        make_parent(self.output.target, "-o")  # a new output folder is made, not refused
        with self.output:  # one writer per OUT: store.Locked names the holder
            started = time.perf_counter()
            devices = self.devices()
            prov = provenance(self.config, ",".join(map(str, devices)), regions=self.job.regions)
            todo = self.job.todo(self.output, prov, self.overwrite)
            if self.output.up_to_date:
                return self.job.result(self.output, prov, started, self.tally)
            schema = store.feature_schema(self.config.dim, prov, regions=self.job.regions is not None)
            if todo or self.job.region_errors:
                describers = [make_describer(self.config, d) for d in devices]
                with writing(self.output.target):
                    self.describe_all(todo, describers[0] if len(describers) == 1 else describers, schema)
            if self.tally.interrupted:
                return self.job.result(self.output, prov, started, self.tally)
            t = time.perf_counter()
            with writing(self.output.target):
                finished = self.output.finish(schema)
            self.stage_seconds["write"] += time.perf_counter() - t
            return self.job.result(self.output, prov, started, self.tally, finished)

    def devices(self) -> list:
        """The devices of the run: --devices, else --device; all of one type."""
        cfg = self.config
        devices = resolve_devices(cfg.devices) if cfg.devices else [resolve_device(cfg.device)]
        if cfg.devices and devices[0].type != resolve_device(cfg.device).type:
            raise BadInput(
                f"--devices {cfg.devices} are not of --device {cfg.device}'s type; pass --device {devices[0].type} too"
            )
        return devices
