"""`featx extract --engine ray`: a planned Job described on a Ray cluster, into a Parquet folder.

    the job's todo (driver) -> parts of <= rows_per_group images -> decode/rescale (Ray tasks,
      CPUs) -> batch by shape + dense VGG (actor pool: one actor per GPU, or CPU actors)
      -> one Parquet file per part, written by the driver through store.DatasetFolder

Every stage is the local engine's own code (featx.extract.job: the plan and what is left;
featx.extract.rowgroup: decode, describe, rows; featx.extract.describer: the net and
provenance), so a folder written here holds the same rows, schema and `featx` metadata as
`featx extract` writes to one file. A part appears complete or not at all; a rerun computes
only the images no part holds yet (or that changed since), and the folder takes the same lock,
resume and settings checks as a local run's file (featx.store).
"""

from __future__ import annotations

import logging
import math
import pickle
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from featx import store
from featx.errors import BadInput, Unreachable
from featx.extract.batching import BatchStats
from featx.extract.config import ExtractConfig
from featx.extract.decode import ImageError
from featx.extract.describer import make_describer
from featx.extract.job import STAGES, ExtractResult, Job, Tally, writing
from featx.extract.progress import progress_bar, sigterm_as_interrupt
from featx.extract.provenance import provenance
from featx.extract.rowgroup import by_image, decode_items, describe_group, error_record, group_rows
from featx.net.device import resolve_precision
from featx.net.weights import Weights, resolve
from featx.store.paths import make_parent

# A CPU actor runs at most this many torch threads; a larger cluster gets more actors instead.
MAX_THREADS_PER_CPU_ACTOR = 8
# Parts are the unit of parallel work: small jobs use smaller parts so every actor gets some.
PARTS_PER_ACTOR = 4


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise BadInput("--engine ray needs Ray, which is not installed: pip install 'featx[ray]'") from None
    return ray


# -- the stages that run on the cluster -------------------------------------------------------


def _decode_part(row: dict, config: ExtractConfig) -> dict:
    """Ray task: decode and rescale every image of one part; failures become error records."""
    decoded, errors = [], []
    t = time.perf_counter()
    items = pickle.loads(row["items"])
    # One decode per file: the regions of an image are cut from it.
    for group in by_image(items):
        for item, result in zip(group, decode_items(group, config)):
            if isinstance(result, ImageError):
                errors.append(error_record(item, result))
            else:
                decoded.append((item, result))
    seconds = dict.fromkeys(STAGES, 0.0) | {"decode": time.perf_counter() - t}
    payload = {"decoded": decoded, "errors": errors, "seconds": seconds}
    return {"part": row["part"], "payload": pickle.dumps(payload, protocol=5)}


class _DescribeParts:
    """Ray actor: holds the dense net once; turns a decoded part into its rows (an Arrow table)."""

    def __init__(self, config: ExtractConfig, weights_ref: list, prov: dict, threads: int):
        import ray

        device = torch.device(prov["device"])
        if device.type == "cpu":
            torch.set_num_threads(threads)
        weights: Weights = ray.get(weights_ref[0])
        self.describer = make_describer(config, device, weights=weights)
        self.config = config
        self.schema = store.feature_schema(config.dim, prov, regions="regions" in prov["settings"])

    def __call__(self, row: dict) -> dict:
        payload = pickle.loads(row["payload"])
        decoded, errors, seconds = payload["decoded"], payload["errors"], payload["seconds"]
        rows = self.schema.empty_table()
        batches = BatchStats()
        if decoded:

            def on_batch(images: int, s: float) -> None:
                seconds["model"] += s

            features, failed = describe_group(self.describer, [d for _, d in decoded], self.config, on_batch, batches)
            errors += [error_record(decoded[i][0], e) for i, e in failed.items()]
            rows = group_rows(self.schema, decoded, features, failed)
        result = {"rows": rows, "errors": errors, "seconds": seconds, "batches": batches}
        return {"part": row["part"], "result": pickle.dumps(result, protocol=5)}


# -- the job -----------------------------------------------------------------------------------


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at `address` (or start a local one); True if this call started Ray."""
    if ray.is_initialized():
        return False
    if address and address != "auto" and not address.startswith("ray://"):
        _reachable(address)
    try:
        # Worker output stays in Ray's session logs (/tmp/ray/session_latest/logs); failures
        # still reach the driver as exceptions, and per-image ones as error records.
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as e:
        raise Unreachable(
            f"cannot reach the Ray cluster at --ray-address {address} ({str(e).splitlines()[0]}); "
            f"start one with `ray start --head` and pass the address it prints"
        ) from None
    return True


def _reachable(address: str) -> None:
    # Ray retries an unreachable head for minutes, printing a line every few seconds; one
    # TCP connect tells the user at once.
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--ray-address {address!r} is not HOST:PORT; give e.g. 10.0.0.1:6379, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise Unreachable(
            f"cannot reach the Ray cluster at --ray-address {address} ({e.strerror or e}); start one "
            f"with `ray start --head` and pass the address it prints, or leave it out for a local Ray"
        ) from None


def _actor_plan(ray, config: ExtractConfig, actors: int | None) -> tuple[str, int, dict, int]:
    """(device, number of actors, their Ray resources, torch threads per CPU actor)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if config.device.startswith("cuda") and not gpus:
        raise BadInput(f"--device {config.device}: the Ray cluster has no GPU; use --device cpu or auto")
    if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
        raise BadInput(f"unknown --device {config.device!r}; use auto, cpu or cuda")
    if actors is not None and actors < 1:
        raise BadInput(f"--ray-actors {actors} must be at least 1")
    if gpus and config.device != "cpu":
        # Ray gives each actor its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES); an actor beyond the
        # GPUs would wait for one forever.
        if actors is not None and actors > gpus:
            raise BadInput(
                f"--ray-actors {actors} GPU actors need {actors} GPUs but the Ray cluster has {gpus}; "
                f"use --ray-actors {gpus} or fewer, or --device cpu"
            )
        return "cuda", actors or gpus, {"num_gpus": 1, "num_cpus": 1}, 1
    cpus = int(resources.get("CPU", 0))
    node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
    # Half of the CPUs decode, half run the net: on CPU the net dominates, but starving the
    # decode tasks would stall the actors.
    threads = max(1, min(MAX_THREADS_PER_CPU_ACTOR, node_cpus // 2))
    n = actors or max(1, cpus // (2 * threads))
    if n * threads >= cpus:
        raise BadInput(
            f"--ray-actors {n} CPU actors of {threads} CPUs would take all {cpus} CPUs of the Ray "
            f"cluster and leave none to decode images; use fewer --ray-actors or add CPUs"
        )
    return "cpu", n, {"num_cpus": threads}, threads


def _auto_precision(device: str) -> str:
    return resolve_precision("auto", torch.device(device))


def _pin_precision(ray, config: ExtractConfig, device: str, actor_resources: dict) -> ExtractConfig:
    """Resolve precision="auto" once, on the actors' kind of hardware: one precision per folder.

    Each actor resolving "auto" on its own node could mix bf16 and fp32 parts on a mixed
    cluster, and the driver's own CPU/GPU says nothing about the workers'.
    """
    config = config.replace(device=device)
    if config.precision != "auto":
        return config
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id():
        return config.replace(precision=_auto_precision(device))
    probe = ray.remote(_auto_precision).options(**actor_resources)
    return config.replace(precision=ray.get(probe.remote(device)))


def run_on_ray(
    job: Job,
    folder: store.DatasetFolder,
    *,
    overwrite: bool = False,
    progress: bool = False,
    address: str | None = None,
    actors: int | None = None,
) -> ExtractResult:
    """Describe a planned Job on the Ray cluster at `address` (default: a local Ray) into `folder`.

    Same rows and `featx` metadata as the local engine; one file per part of at most
    `rows_per_group` images. Paper: arXiv 1409.1556, Appendix B.
    """
    ray = _import_ray()
    make_parent(folder.target, "-o")  # a new output folder is made, not refused
    with folder:  # the same lock a local run on this -o takes
        started = time.perf_counter()
        connected = _connect(ray, address)
        try:
            return _run(ray, job, folder, overwrite, progress, actors, started)
        finally:
            if connected:
                ray.shutdown()


def _run(
    ray, job: Job, folder: store.DatasetFolder, overwrite: bool, progress: bool, actors: int | None, started: float
) -> ExtractResult:
    device, n_actors, actor_resources, threads = _actor_plan(ray, job.config, actors)
    config = _pin_precision(ray, job.config, device, actor_resources)
    prov = provenance(config, torch.device(device), regions=job.regions)
    todo = job.todo(folder, prov, overwrite)
    tally = Tally()
    if folder.up_to_date:
        return job.result(folder, prov, started, tally)
    if job.region_errors:  # regions no image can answer, recorded again each run as other failures are
        with writing(folder.target):
            folder.add(None, list(job.region_errors), index=folder.next_index())
        tally.failures += len(job.region_errors)
    first = folder.next_index()
    size = max(1, min(config.rows_per_group, math.ceil(len(todo) / (PARTS_PER_ACTOR * n_actors))))
    parts = [(first + i, todo[s : s + size]) for i, s in enumerate(range(0, len(todo), size))]
    if parts:
        weights = resolve(config.model, config.weights, config.seed, config.layer, prov["weights"])
        weights_ref = [ray.put(weights)]  # in a list: the actors fetch it, Ray does not inline it
        del weights
        with _quiet_ray_data(ray), writing(folder.target):
            ds = _dataset(ray, parts, config, prov, weights_ref, n_actors, actor_resources, threads)
            _write_parts(ds, folder, len(todo), progress, tally)
    if tally.interrupted:
        return job.result(folder, prov, started, tally)
    t = time.perf_counter()
    with writing(folder.target):
        finished = folder.finish()
    tally.stage_seconds["write"] += time.perf_counter() - t
    return job.result(folder, prov, started, tally, finished)


def _write_parts(ds, folder: store.DatasetFolder, total: int, progress: bool, tally: Tally) -> None:
    """Persist each part as the actors finish it; Ctrl-C (or SIGTERM) keeps the parts written."""
    try:
        with progress_bar(total, progress) as advance, sigterm_as_interrupt():
            for row in ds.iter_rows():
                result = pickle.loads(row["result"])
                t = time.perf_counter()
                folder.add(result["rows"], result["errors"], index=int(row["part"]))
                tally.stage_seconds["write"] += time.perf_counter() - t
                for stage, s in result["seconds"].items():
                    tally.stage_seconds[stage] += s
                tally.batches.merge(result["batches"])
                tally.new_rows += result["rows"].num_rows
                tally.failures += len(result["errors"])
                advance(result["rows"].num_rows + len(result["errors"]))
    except KeyboardInterrupt:
        tally.interrupted = True


# Ray Data's warnings (e.g. a cluster too small for the actors) stay; its plan chatter and its
# notice that progress bars are off do not.
RAY_DATA_LOG_LEVELS = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}


@contextmanager
def _quiet_ray_data(ray) -> Iterator[None]:
    """Ray Data without its own progress bars (featx draws one; Ray's would interleave) and
    chatter, for the run only: the caller's DataContext and logger levels are restored after."""
    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    loggers = {logging.getLogger(name): level for name, level in RAY_DATA_LOG_LEVELS.items()}
    levels = {logger: logger.level for logger in loggers}
    context.enable_progress_bars = False
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        context.enable_progress_bars = before
        for logger, level in levels.items():
            logger.setLevel(level)


def _dataset(ray, parts, config, prov, weights_ref, n_actors, actor_resources, threads):
    records = [{"part": index, "items": pickle.dumps(group, protocol=5)} for index, group in parts]
    return (
        ray.data.from_items(records, override_num_blocks=len(records))
        # max_calls=0 is Ray's default (no limit), spelled out because Ray Data fuses a map into
        # the next one when their remote args are equal: kept apart, images are decoded by
        # parallel tasks while the actors compute, rather than inside the actors in turn.
        .map(_decode_part, fn_kwargs={"config": config}, num_cpus=1, max_calls=0)
        .map(
            _DescribeParts,
            fn_constructor_kwargs={"config": config, "weights_ref": weights_ref, "prov": prov, "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            **actor_resources,
        )
    )
