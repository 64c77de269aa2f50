"""`featx extract`: discover -> decode/rescale (threads) -> batch by shape -> dense VGG ->
pool, flip, aggregate, L2 -> Parquet pieces -> one complete file.
"""

from __future__ import annotations

import errno
import platform
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torchvision

from featx import __version__, store
from featx.config import ExtractConfig, descriptor_settings, settings_hash
from featx.decode import RESIZE, Decoded, ImageError, decode
from featx.descriptor import DenseDescriber, combine, pooled_per_scale, resolve_device
from featx.discover import Item, discover
from featx.model import build
from featx.shard import take_shard
from featx.weights import identify, normalization, resolve

STAGES = ("decode", "model", "aggregate", "write")


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

    @property
    def images_per_second(self) -> float:
        return self.new_rows / self.seconds if self.seconds else 0.0


def _normalize_record(mean, std) -> dict:
    return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}


def descriptor_hash(config: ExtractConfig) -> str:
    """The settings hash of the descriptor `config` defines (weights files are hashed, not loaded)."""
    weights_id = identify(config.model, config.weights, config.seed, config.layer)
    mean, std = normalization(config.model, config.weights)
    return settings_hash(descriptor_settings(config, weights_id, _preprocess(mean, std)))


def _preprocess(mean, std) -> dict:
    return _normalize_record(mean, std) | {"resize": RESIZE}


def provenance(config: ExtractConfig, weights_id: dict, mean, std, device: torch.device) -> dict:
    """The `featx` metadata of a feature file: what defines the numbers, and how they were run."""
    settings = descriptor_settings(config, weights_id, _preprocess(mean, std))
    return {
        "featx_version": __version__,
        "settings": settings,
        "settings_hash": settings_hash(settings),
        "model": config.model,
        "weights": weights_id,
        "layer": config.layer,
        "scales": list(config.scales),
        "flip": config.flip,
        "aggregate": config.aggregate,
        "precision": settings["precision"],  # "auto" resolved for the device
        "bucket": config.bucket,
        "dim": config.dim,
        "normalize": _normalize_record(mean, std),
        "resize": RESIZE,
        "descriptor": (
            f"{config.layer} map averaged over positions"
            + (", averaged with the flipped image" if config.flip else "")
            + f", {config.aggregate} over Q={list(config.scales)}, L2-normalised"
        ),
        "device": str(device),
        "batch_size": config.batch_size,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def differing(old: dict, new: dict) -> str:
    """Name the descriptor settings in which two provenances differ, for a refusal message."""
    a, b = old.get("settings", {}), new["settings"]
    diffs = [f"{k}={a.get(k)!r} there, {b.get(k)!r} now" for k in b if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "settings hash differs"


class Run:
    """One extraction job: decides what to resume, runs the stages, finalises the output."""

    def __init__(self, paths, output, config: ExtractConfig, overwrite: bool, progress: bool, shard=None):
        self.config, self.overwrite, self.show_progress = config, overwrite, progress
        self.out = Path(output).expanduser()
        if self.out.is_dir():
            raise ValueError(f"-o {self.out} is a folder; give a file name such as {self.out / 'features.parquet'}")
        if not self.out.parent.is_dir():
            raise FileNotFoundError(f"-o {self.out}: folder {self.out.parent} does not exist; create it first")
        self.items = discover(paths)
        if not self.items:
            raise ValueError(f"no images found under {', '.join(map(str, paths))}; check the PATH")
        if shard is not None:
            self.items = take_shard(self.items, shard)
        self.pieces = store.Pieces(self.out)
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)
        self._advance: Callable[[float], None] = lambda n: None
        self._lock = threading.Lock()

    # -- deciding what to do -------------------------------------------------------------
    def _check_existing(self, prov: dict) -> set[str]:
        done: set[str] = set()
        if self.overwrite:
            self.pieces.remove()
            return done
        if self.out.exists():
            old = store.read_provenance(self.out)
            if old.get("settings_hash") != prov["settings_hash"]:
                raise ValueError(
                    f"{self.out} holds features with other settings ({differing(old, prov)}); "
                    f"pass --overwrite to replace it, or choose another -o"
                )
            done.update(store.iter_paths(self.out))
        if self.pieces.folder.exists():
            if not self.pieces.exists():
                self.pieces.remove()  # killed before its first piece: nothing to keep
            else:
                old = self.pieces.provenance()
                if old.get("settings_hash") != prov["settings_hash"]:
                    raise ValueError(
                        f"{self.pieces.folder} holds an unfinished run with other settings "
                        f"({differing(old, prov)}); rerun with its settings to finish it, or pass --overwrite"
                    )
                done.update(self.pieces.done_paths())
        return done

    def _writable(self) -> None:
        probe = self.out.with_name(f".{self.out.name}.featx-probe")
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(
                f"cannot write in {self.out.parent} ({e.strerror}); choose a writable -o"
            ) from None

    # -- the stages ----------------------------------------------------------------------
    def _decode(self, item: Item) -> Decoded | ImageError:
        t = time.perf_counter()
        try:
            return decode(item.file, self.config.scales, self.config.max_pixels, self.config.bucket)
        except ImageError as e:
            return e
        except Exception as e:  # a decoder bug on one file must not end the run
            return ImageError("decode", type(e).__name__, str(e))
        finally:
            with self._lock:
                self.stage_seconds["decode"] += time.perf_counter() - t

    def _decoded(self, items: list[Item]) -> Iterator[tuple[Item, Decoded | ImageError]]:
        """Decode in `workers` threads ahead of the model, in order, with a bounded window."""
        if self.config.workers == 0:
            for item in items:
                yield item, self._decode(item)
            return
        window = max(2 * self.config.rows_per_group, 4 * self.config.workers)
        with ThreadPoolExecutor(self.config.workers, thread_name_prefix="featx-decode") as pool:
            pending: deque[tuple[Item, Future]] = deque()
            it = iter(items)
            try:
                for item in it:
                    pending.append((item, pool.submit(self._decode, item)))
                    if len(pending) >= window:
                        head, fut = pending.popleft()
                        yield head, fut.result()
                while pending:
                    head, fut = pending.popleft()
                    yield head, fut.result()
            finally:
                for _, fut in pending:
                    fut.cancel()

    def _describe(self, describer: DenseDescriber, decoded: list[Decoded]) -> tuple[np.ndarray, dict[int, ImageError]]:
        """Descriptors for a row group; images sharing a rescaled shape share a batch."""
        cfg = self.config
        failed: dict[int, ImageError] = {}

        def run_batch(q: int, batch: list[int], out: torch.Tensor) -> None:
            t = time.perf_counter()
            self._run_batch(describer, decoded, q, batch, out, failed)
            self.stage_seconds["model"] += time.perf_counter() - t
            self._advance(len(batch) / len(cfg.scales))

        per_scale = pooled_per_scale(
            describer, [d.scaled for d in decoded], cfg.scales, cfg.batch_size, run_batch, skip=failed
        )
        t = time.perf_counter()
        features = combine(per_scale, cfg.aggregate).numpy()
        self.stage_seconds["aggregate"] += time.perf_counter() - t
        return features, failed

    def _run_batch(self, describer, decoded, q, batch, out, failed) -> None:
        try:
            out[batch] = describer(torch.stack([decoded[i].scaled[q] for i in batch]))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if len(batch) > 1:  # one image's failure must not cost the others their rows
                for i in batch:
                    self._run_batch(describer, decoded, q, [i], out, failed)
            else:
                failed[batch[0]] = ImageError("model", type(e).__name__, str(e).splitlines()[0][:300])

    def _flush(self, schema, group: list[tuple[Item, Decoded]], errors: list[dict], describer) -> int:
        rows = None
        if group:
            features, failed = self._describe(describer, [d for _, d in group])
            for i, e in failed.items():
                errors.append(_error_record(group[i][0], e))
            keep = [i for i in range(len(group)) if i not in failed]
            items = [group[i][0] for i in keep]
            rows = store.rows_table(
                schema,
                [it.path for it in items],
                [it.label for it in items],
                [group[i][1].width for i in keep],
                [group[i][1].height for i in keep],
                features[keep],
            )
        t = time.perf_counter()
        self.pieces.add(rows, errors)
        self.stage_seconds["write"] += time.perf_counter() - t
        return 0 if rows is None else rows.num_rows

    # -- the job -------------------------------------------------------------------------
    def run(self) -> ExtractResult:
        cfg = self.config
        t0 = time.perf_counter()
        device = resolve_device(cfg.device)
        weights_id = identify(cfg.model, cfg.weights, cfg.seed, cfg.layer)
        prov = provenance(cfg, weights_id, *normalization(cfg.model, cfg.weights), device)
        done = self._check_existing(prov)
        todo = [it for it in self.items if it.path not in done]
        if not todo and not self.pieces.exists():
            rows = pq.ParquetFile(self.out).metadata.num_rows
            return ExtractResult(self.out, rows, 0, 0, time.perf_counter() - t0, prov["settings_hash"])
        self._writable()

        new_rows = failures = 0
        interrupted = False
        if todo:
            weights = resolve(cfg.model, cfg.weights, cfg.seed, cfg.layer)
            describer = DenseDescriber(build(cfg.model, weights, cfg.layer), weights.mean, weights.std, device, cfg.precision, cfg.flip)
            del weights
            schema = store.feature_schema(cfg.dim, prov)
            if not self.pieces.exists():
                self.pieces.start(prov)
            try:
                with _progress(len(todo), self.show_progress) as self._advance, _sigterm_as_interrupt():
                    group: list[tuple[Item, Decoded]] = []
                    errors: list[dict] = []
                    for item, result in self._decoded(todo):
                        if isinstance(result, ImageError):
                            errors.append(_error_record(item, result))
                            self._advance(1)
                        else:
                            group.append((item, result))
                        if len(group) + len(errors) >= cfg.rows_per_group:
                            written = self._flush(schema, group, errors, describer)
                            new_rows += written
                            failures += len(group) + len(errors) - written
                            group, errors = [], []
                    if group or errors:
                        written = self._flush(schema, group, errors, describer)
                        new_rows += written
                        failures += len(group) + len(errors) - written
            except KeyboardInterrupt:
                interrupted = True
            except OSError as e:
                raise _disk_error(e, self.out) from None
        schema = store.feature_schema(cfg.dim, prov)
        seconds = time.perf_counter() - t0
        if interrupted:
            return ExtractResult(self.out, 0, new_rows, failures, seconds, prov["settings_hash"],
                                 interrupted=True, stage_seconds=self.stage_seconds)
        t = time.perf_counter()
        sources = ([self.out] if self.out.exists() and not self.overwrite else []) + self.pieces.row_files()
        try:
            rows, n_errors = store.merge(self.out, schema, sources, self.pieces.error_files())
        except OSError as e:
            raise _disk_error(e, self.out) from None
        self.pieces.remove()
        self.stage_seconds["write"] += time.perf_counter() - t
        err = store.errors_path(self.out)
        return ExtractResult(
            self.out, rows, new_rows, n_errors, time.perf_counter() - t0, prov["settings_hash"],
            errors_file=err if err.exists() else None, stage_seconds=self.stage_seconds,
        )


def _error_record(item: Item, e: ImageError) -> dict:
    return {"path": item.path, "stage": e.stage, "error": e.error, "message": e.message}


def _disk_error(e: OSError, out: Path) -> Exception:
    if e.errno == errno.ENOSPC:
        return ValueError(
            f"disk full while writing {out}; free some space and rerun the same command to resume"
        )
    return ValueError(f"cannot write {getattr(e, 'filename', None) or out} ({e.strerror or e}); check the -o folder")


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a job scheduler's stop) ends the run like Ctrl-C: pieces kept, resumable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _progress(total: int, show: bool) -> Iterator[Callable[[float], None]]:
    if not show:
        yield lambda n: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("extract"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} images"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    start = time.perf_counter()
    with Progress(*columns, transient=False, console=_stderr_console()) as bar:
        task = bar.add_task("extract", total=total, rate="")
        done = 0.0

        def advance(n: float) -> None:
            nonlocal done
            done += n
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:.2f} img/s")

        yield advance


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)


def extract(
    paths,
    output,
    config: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    shard: str | tuple[int, int] | None = None,
    **settings,
) -> ExtractResult:
    """Describe every image under `paths` and write the features to `output` (Parquet).

    Settings are an ExtractConfig or keyword arguments of one (model="vgg16", scales=(256,),
    ...). An existing `output` with the same settings is resumed; other settings are refused
    unless `overwrite`. `shard="K/N"` keeps only shard K of N (featx.shard: by path hash).
    Paper: arXiv 1409.1556, Appendix B.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    config = (config or ExtractConfig()).replace(**settings) if settings else (config or ExtractConfig())
    return Run(list(paths), output, config, overwrite, progress, shard).run()
