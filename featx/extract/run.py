"""`featx extract`: settings merged, the run planned once (featx.extract.job), then executed on
this machine (featx.extract.local) or on a Ray cluster (featx.extract.ray_engine).
"""

from __future__ import annotations

from pathlib import Path

from featx import store
from featx.errors import BadInput
from featx.extract.config import ExtractConfig
from featx.extract.job import ExtractResult, Job, plan_job
from featx.extract.local import LocalRun
from featx.extract.ray_engine import run_on_ray

ENGINES = ("local", "ray")


def extract_features(
    paths,
    output,
    config: ExtractConfig | None = None,
    *,
    engine: str = "local",
    overwrite: bool = False,
    progress: bool = False,
    shard: str | tuple[int, int] | None = None,
    wait: bool = False,
    regions=None,
    address: str | None = None,
    actors: int | None = None,
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
    `engine="ray"` describes them on the Ray cluster at `address` (default: a local Ray) with
    `actors` model actors, into a folder of Parquet parts with the same rows.
    Paper: arXiv 1409.1556, Appendix B.
    """
    config = config or ExtractConfig()
    if settings:
        config = config.replace(**settings)
    if engine != "ray" and (address is not None or actors is not None):
        raise BadInput("address and actors (--ray-address, --ray-actors) need engine='ray' (--engine ray)")
    target = open_output(output, engine, wait)  # a wrong kind of -o is refused before discovery
    job = plan_job(paths, config, regions=regions, shard=shard)
    return execute(job, target, engine=engine, overwrite=overwrite, progress=progress, address=address, actors=actors)


def open_output(output: str | Path, engine: str = "local", wait: bool = False) -> store.Output:
    """The output an engine writes: a single file (local) or a dataset folder (ray); checked, not locked."""
    if engine not in ENGINES:
        raise BadInput(f"engine {engine!r} is not one of {', '.join(ENGINES)}; use --engine local or ray")
    target = (store.DatasetFolder if engine == "ray" else store.SingleFile)(output, wait=wait)
    target.check_target()
    return target


def execute(
    job: Job,
    output: store.Output,
    *,
    engine: str = "local",
    overwrite: bool = False,
    progress: bool = False,
    address: str | None = None,
    actors: int | None = None,
) -> ExtractResult:
    """Run a planned Job into `output` (from `open_output` for the same engine)."""
    if engine == "ray":
        return run_on_ray(job, output, overwrite=overwrite, progress=progress, address=address, actors=actors)
    return LocalRun(job, output, overwrite, progress).run()
