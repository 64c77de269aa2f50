"""`featx extract`, `featx info`, `featx model`: images to a feature file, and what it holds."""

from __future__ import annotations

import json
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from featx.cli.common import (
    Aggregate,
    AggregateOption,
    BatchSizeOption,
    DeviceOption,
    FlipOption,
    LayerOption,
    ModelOption,
    Precision,
    QuietOption,
    ScalesOption,
    WeightsSeedOption,
    app,
    call,
    extract_config,
    fail,
    parse_scales,
)
from featx.extract.config import DEFAULT_MAX_PIXELS, DEFAULT_SCALES, ExtractConfig
from featx.net.backbones import get_backbone


class Engine(str, Enum):
    local = "local"
    ray = "ray"


@app.command()
def extract(
    paths: Annotated[list[Path], typer.Argument(help="Image folders (searched recursively) and/or image files.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The Parquet file to write (or resume); a folder with --engine ray.")
    ],
    model: ModelOption = "vgg16",
    weights: Annotated[
        str,
        typer.Option(
            help=(
                "'default' (the model's published weights, downloaded once: torchvision's DEFAULT, for VGG "
                "IMAGENET1K_V1; a timm model's pretrained tag), a torchvision weights name, a state-dict FILE, or "
                "'random' (tests only)."
            )
        ),
    ] = "default",
    layer: LayerOption = "default",
    scales: ScalesOption = ",".join(map(str, DEFAULT_SCALES)),
    flip: FlipOption = True,
    aggregate: AggregateOption = Aggregate.mean,
    precision: Annotated[
        Precision,
        typer.Option(
            help=(
                "Model precision; auto = bf16 where the CPU/GPU has it natively, else fp32 (bf16 changes numbers "
                "slightly; the resolved value is recorded)."
            )
        ),
    ] = Precision.auto,
    device: DeviceOption = "auto",
    devices: Annotated[
        str,
        typer.Option(help="Several GPUs, each with its own stream of batches into one output: cuda:0,cuda:1 or all."),
    ] = "",
    batch_size: BatchSizeOption = ExtractConfig.batch_size,
    batch_pixels: Annotated[
        int, typer.Option(help="At most this many padded pixels per batch; 0 = per device (4 M on CPU, 5.8 M on CUDA).")
    ] = 0,
    workers: Annotated[int, typer.Option(help="Decode threads running ahead of the model.")] = 2,
    max_pixels: Annotated[int, typer.Option(help="Refuse larger images before decoding them.")] = DEFAULT_MAX_PIXELS,
    bucket: Annotated[
        int,
        typer.Option(
            help=(
                "INEXACT, not needed for speed: N > 0 snaps the longer side to a multiple of N (changes the numbers; "
                "recorded). 0 = exact (default)."
            )
        ),
    ] = 0,
    rows_per_group: Annotated[
        int, typer.Option(help="Rows per persisted piece: a killed run loses at most this many.")
    ] = 64,
    weights_seed: WeightsSeedOption = 0,
    seed: Annotated[
        int | None, typer.Option(hidden=True, help="Deprecated name of --weights-seed (elsewhere --seed seeds splits).")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help=(
                "Discard what OUTPUT held before this run (e.g. other settings); an interrupted --overwrite run "
                "resumes when rerun."
            )
        ),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help=(
                "If another featx process is writing OUTPUT: wait for it to finish (--wait), or stop at once naming "
                "it (default)."
            ),
        ),
    ] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any image failed.")] = False,
    profile: Annotated[bool, typer.Option(help="Print seconds spent per stage.")] = False,
    quiet: QuietOption = False,
    shard: Annotated[
        str | None,
        typer.Option(help="K/N: only shard K of N (0-based, by path hash), to split a folder over N machines."),
    ] = None,
    engine: Annotated[
        Engine, typer.Option(help="local (this machine) or ray (a Ray cluster; OUTPUT is a folder of Parquet parts).")
    ] = Engine.local,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join, e.g. auto or HEAD:6379 (default: a local Ray).")
    ] = None,
    ray_actors: Annotated[
        int | None, typer.Option(help="Model actors (default: one per GPU; on CPUs, half of the cores).")
    ] = None,
    regions: Annotated[
        Path | None,
        typer.Option(
            help=(
                "CSV or Parquet table of boxes (path, x1, y1, x2, y2 in upright pixels, 0-based, x2/y2 exclusive; "
                "optional region id): one row per box instead of per image."
            )
        ),
    ] = None,
) -> None:
    """Describe every image with the paper's dense multi-scale descriptor (VGG, or any backbone); write Parquet."""
    weights_seed = _weights_seed(weights_seed, seed)
    # Everything the arguments alone can refute is refuted before torch loads (seconds).
    config = extract_config(
        model=model,
        weights=weights,
        layer=layer,
        scales=parse_scales(scales),
        flip=flip,
        aggregate=aggregate,
        precision=precision,
        device=device,
        batch_size=batch_size,
        batch_pixels=batch_pixels,
        devices=devices,
        workers=workers,
        max_pixels=max_pixels,
        seed=weights_seed,
        rows_per_group=rows_per_group,
        bucket=bucket,
    )
    _check_extract_arguments(paths, output, engine, devices, shard, ray_address, ray_actors)
    from featx.extract.run import extract_features  # torch loads here

    result = call(
        extract_features,
        paths,
        output,
        config,
        engine=engine.value,
        address=ray_address,
        actors=ray_actors,
        shard=shard,
        overwrite=overwrite,
        progress=not quiet,
        wait=wait,
        regions=regions,
    )
    if result.interrupted:
        typer.echo(f"featx: {result.resume_hint(overwrite)}", err=True)
        raise typer.Exit(130)
    typer.echo(result.summary())
    for line in result.profile() if profile else []:
        typer.echo(line)
    if result.rows == 0:
        fail("no image could be described; see the errors file for why", code=1)
    if strict and result.failures:
        fail(f"{result.failures} images failed (--strict)", code=1)


def _weights_seed(weights_seed: int, seed: int | None) -> int:
    """--weights-seed, or the deprecated --seed it replaces (which seeds the splits elsewhere)."""
    if seed is None:
        return weights_seed
    if weights_seed not in (0, seed):
        fail(f"--seed {seed} and --weights-seed {weights_seed} disagree; give --weights-seed only")
    warnings.warn(
        "--seed is deprecated in featx extract: it seeds --weights random; say --weights-seed",
        FutureWarning,
        stacklevel=1,
    )
    return seed


def _check_extract_arguments(paths, output, engine, devices, shard, ray_address, ray_actors) -> None:
    """What `featx extract`'s arguments alone refute, in one line each, before any work."""
    from featx.extract.shard import parse_shard
    from featx.store.paths import check_output

    if engine is Engine.ray and devices:
        fail("--devices is for the local engine; with --engine ray, Ray places one model actor per GPU (--ray-actors)")
    if engine is Engine.ray:
        call(check_output, output, "-o", folder=True)
    else:  # a feature file is Parquet, whatever it is called: -o x.csv would mislead
        call(check_output, output, "-o", suffix=(".parquet", ""))
    if shard is not None:
        call(parse_shard, shard)
    if (ray_address or ray_actors) and engine is not Engine.ray:
        fail("--ray-address and --ray-actors need --engine ray")
    for path in paths:
        if not path.expanduser().exists():
            fail(f"{path}: no such file or folder; check the PATH")


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A featx Parquet file or folder.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the provenance as JSON.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Rows, dimension, labels, failures and provenance of a feature file or folder."""
    from featx.store import feature_info, read_provenance

    if json_out:
        typer.echo(json.dumps(call(read_provenance, path), indent=2, sort_keys=True))
        return
    typer.echo("\n".join(call(feature_info, path).lines()))


@app.command()
def model(
    name: Annotated[
        str,
        typer.Argument(
            help="Any --model of featx extract: vgg11 (A) ... vgg19 (E), resnet50, convnext_tiny, ..., timm:NAME."
        ),
    ],
    size: Annotated[str, typer.Option(help="Input height x width, e.g. 224x224 or 256x341.")] = "224x224",
    layer: Annotated[str, typer.Option(help="The tap the dense net ends at (default: the net's default).")] = "default",
    quiet: QuietOption = False,
) -> None:
    """The dense net's layer table at one input size: output shapes, parameters, FLOPs (no weights loaded)."""
    try:
        height, width = (int(v) for v in size.lower().split("x"))
        if height < 1 or width < 1:
            raise ValueError
    except ValueError:
        fail(f"--size {size!r} is not HxW; give e.g. --size 224x224")
    backbone = call(get_backbone, name)
    for line in call(backbone.summary_lines, height, width, layer):
        typer.echo(line)
    tap = call(backbone.tap, layer)
    taps = ", ".join(t + (" (default)" if t == backbone.default_tap else "") for t in backbone.tap_names)
    typer.echo(f"taps (--layer): {taps}; {tap.name}: {tap.channels} channels per scale, stride {tap.stride}")
