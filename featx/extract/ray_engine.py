"""`featx extract --engine ray`: the same descriptor on a Ray cluster, into a Parquet folder.

    discover (driver) -> parts of <= rows_per_group images -> decode/rescale (Ray tasks, CPUs)
      -> batch by shape + dense VGG (actor pool: one actor per GPU, or CPU actors)
      -> one Parquet file per part, written by the driver through store.DatasetFolder

Every stage is the local engine's own code (featx.extract.stages: decode, describe, rows;
featx.extract.describer: the net and provenance), so a folder written here holds the same rows,
schema and `featx` metadata as `featx extract` writes to one file. A part appears complete or
not at all; a rerun computes only the images no part holds yet (or that changed since), and
the folder takes the same lock, resume and settings checks as a local run's file (featx.store).
"""

from __future__ import annotations

import itertools
import logging
import math
import pickle
import socket
import time
from pathlib import Path

import torch

from featx import store
from featx.errors import BadInput, Unreachable
from featx.extract.config import ExtractConfig
from featx.extract.decode import ImageError
from featx.extract.describer import make_describer, provenance
from featx.extract.discover import discover
from featx.extract.live import progress_bar, sigterm_as_interrupt
from featx.extract.run import ExtractResult, expand_regions, recorded_files
from featx.extract.shard import take_shard
from featx.extract.stages import (
    STAGES,
    decode_items,
    describe_group,
    error_record,
    group_rows,
)
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
    for _, group in itertools.groupby(items, key=lambda it: it.file):
        group = list(group)
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
        if decoded:

            def on_batch(images: int, s: float) -> None:
                seconds["model"] += s

            features, failed = describe_group(self.describer, [d for _, d in decoded], self.config, on_batch)
            errors += [error_record(decoded[i][0], e) for i, e in failed.items()]
            rows = group_rows(self.schema, decoded, features, failed)
        result = {"rows": rows, "errors": errors, "seconds": seconds}
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
        # Ray gives each actor its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES).
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


def extract_ray(
    paths,
    output,
    config: ExtractConfig | None = None,
    *,
    address: str | None = None,
    actors: int | None = None,
    shard: str | tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    wait: bool = False,
    regions=None,
    **settings,
) -> ExtractResult:
    """Describe every image under `paths` on a Ray cluster into the Parquet folder `output`.

    Same settings, rows and `featx` metadata as featx.extract; one file per part of
    at most `rows_per_group` images; `regions` as featx.extract. Paper: arXiv 1409.1556, Appendix B.
    """
    t0 = time.perf_counter()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    config = (config or ExtractConfig()).replace(**settings) if settings else (config or ExtractConfig())
    folder = _output_folder(output, wait)
    items = discover(list(paths))
    if not items:
        raise BadInput(f"no images found under {', '.join(map(str, paths))}; check the PATH")
    region_errors, region_id = [], None
    discovered = {it.path: it.file for it in items}
    if regions is not None:
        items, region_errors, region_id = expand_regions(regions, items, list(paths), shard)
    elif shard is not None:
        items = take_shard(items, shard)

    ray = _import_ray()
    with folder:  # the same lock a local run on this -o takes
        started = _connect(ray, address)
        try:
            files = recorded_files(items, region_errors, discovered, Path(paths[0]).expanduser())
            return _run(ray, items, folder, config, actors, overwrite, progress, t0, files, region_errors, region_id)
        finally:
            if started:
                ray.shutdown()


def _output_folder(output, wait: bool) -> store.DatasetFolder:
    root = Path(output).expanduser()
    if root.is_file():
        raise BadInput(
            f"-o {root} is a file; --engine ray writes a folder of Parquet parts, give e.g. {root.with_suffix('')}"
        )
    make_parent(root, "-o")  # a new output folder is made, not refused
    return store.DatasetFolder(root, wait=wait)


def _run(
    ray,
    items,
    folder: store.DatasetFolder,
    config,
    actors,
    overwrite,
    progress,
    t0,
    files: dict[str, Path],
    region_errors: list[dict],
    region_id: dict | None,
) -> ExtractResult:
    device, n_actors, actor_resources, threads = _actor_plan(ray, config, actors)
    config = _pin_precision(ray, config, device, actor_resources)
    prov = provenance(config, torch.device(device), regions=region_id)

    keys = [it.key for it in items] if region_id is not None else None
    todo_keys = set(folder.begin(prov, files, overwrite, keys=keys))
    todo = [it for it in items if (it.key if keys is not None else it.path) in todo_keys]
    if folder.up_to_date:
        return ExtractResult(folder.target, folder.rows(), 0, 0, time.perf_counter() - t0, prov["settings_hash"])
    if region_errors:  # regions no image can answer, recorded again each run as other failures are
        folder.add(None, list(region_errors), index=folder.next_index())
    first = folder.next_index()
    size = max(1, min(config.rows_per_group, math.ceil(len(todo) / (PARTS_PER_ACTOR * n_actors))))
    parts = [(first + i, todo[s : s + size]) for i, s in enumerate(range(0, len(todo), size))]

    stage_seconds = dict.fromkeys(STAGES, 0.0)
    new_rows = 0
    interrupted = False
    if parts:
        weights = resolve(config.model, config.weights, config.seed, config.layer)
        weights_ref = [ray.put(weights)]  # in a list: the actors fetch it, Ray does not inline it
        del weights
        ds = _dataset(ray, parts, config, prov, weights_ref, n_actors, actor_resources, threads)
        try:
            with progress_bar(len(todo), progress) as advance, sigterm_as_interrupt():
                for row in ds.iter_rows():
                    result = pickle.loads(row["result"])
                    t = time.perf_counter()
                    folder.add(result["rows"], result["errors"], index=int(row["part"]))
                    stage_seconds["write"] += time.perf_counter() - t
                    for stage, s in result["seconds"].items():
                        stage_seconds[stage] += s
                    new_rows += result["rows"].num_rows
                    advance(result["rows"].num_rows + len(result["errors"]))
        except KeyboardInterrupt:
            interrupted = True
        except OSError as e:
            raise BadInput(f"cannot write {folder.target} ({e.strerror or e}); check the -o folder") from None

    if interrupted:
        return ExtractResult(
            folder.target,
            folder.rows(),
            new_rows,
            0,
            time.perf_counter() - t0,
            prov["settings_hash"],
            interrupted=True,
            stage_seconds=stage_seconds,
        )
    try:
        done = folder.finish()
    except OSError as e:
        raise BadInput(f"cannot write {folder.target} ({e.strerror or e}); check the -o folder") from None
    return ExtractResult(
        folder.target,
        done.rows,
        new_rows,
        done.failures,
        time.perf_counter() - t0,
        prov["settings_hash"],
        errors_file=done.errors_file,
        stage_seconds=stage_seconds,
        changes=done.changes,
    )


def _dataset(ray, parts, config, prov, weights_ref, n_actors, actor_resources, threads):
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # featx draws its own bar; Ray's would interleave
    # Ray Data's warnings (e.g. a cluster too small for the actors) stay; its plan chatter and
    # its notice that progress bars are off do not.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
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
