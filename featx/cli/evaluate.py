"""`featx evaluate` (the paper's transfer experiments) and `featx cache ls|rm` (their features)."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from featx.cli.common import (
    Aggregate,
    App,
    BatchSizeOption,
    DeviceOption,
    HeadName,
    Precision,
    QuietOption,
    WeightsSeedOption,
    app,
    call,
    extract_config,
    fail,
    parse_scales,
)
from featx.evaluate.datasets import DATASETS
from featx.evaluate.solvers import EXACT_MAX_ROWS, SOLVERS
from featx.extract.config import ExtractConfig

Dataset = Enum("Dataset", {d: d for d in DATASETS}, type=str)
# featx evaluate holds its features in memory: every solver but the probe's streamed one.
Solver = Enum("Solver", {s: s for s in SOLVERS if s != "streamed"}, type=str)


@app.command()
def evaluate(
    dataset: Annotated[
        Dataset | None, typer.Option(help="The paper's experiment to run (its pipelines/<dataset>.toml).")
    ] = None,
    pipeline: Annotated[
        Path | None, typer.Option(help="Run your own experiment file (TOML, like the shipped ones).")
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Folder holding the dataset as torchvision lays it (caltech101/101_ObjectCategories, "
                "VOCdevkit/VOC2007, ...)."
            )
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option(help="Fetch the dataset from its official host into --root (md5-checked, resumable).")
    ] = False,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Net(s) to evaluate, repeatable (any --model of featx extract); two give their late fusion too."
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="'default' (ImageNet), a state-dict FILE, or 'random' (smoke tests: far below the paper)."),
    ] = None,
    scales: Annotated[str | None, typer.Option(help="Override the pipeline's scales Q, comma-separated.")] = None,
    aggregate: Annotated[
        Aggregate | None, typer.Option(help="Override how scales combine: stack (Caltech) or mean (VOC).")
    ] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Override flip averaging.")] = None,
    head: Annotated[HeadName | None, typer.Option(help="Classifier: svm (linear SVM, the paper's) or logreg.")] = None,
    solver: Annotated[
        Solver | None,
        typer.Option(
            help=(
                "exact: liblinear (the paper's); scalable: torch on every core or the GPU, same objective; "
                f"auto: exact up to {EXACT_MAX_ROWS:,} training images (every paper protocol), scalable above."
            )
        ),
    ] = None,
    splits: Annotated[int | None, typer.Option(help="Override the number of seeded splits.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first split (split i uses seed + i).")] = None,
    weights_seed: WeightsSeedOption = 0,
    no_background: Annotated[
        bool, typer.Option("--no-background", help="Caltech: drop the background/clutter class (the paper keeps it).")
    ] = False,
    features: Annotated[
        list[Path] | None,
        typer.Option(help="Evaluate already extracted feature file(s), one per net, instead of extracting."),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Where extracted features are cached, keyed by settings and the dataset's files (default: "
                "$XDG_CACHE_HOME/featx, else ~/.cache/featx; see featx cache ls)."
            )
        ),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Write the results as JSON here, with PNG plots beside it.")
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            help=(
                "Model precision, as for featx extract: auto = bf16 where the CPU/GPU has it natively, else fp32 "
                "(part of the cache key; recorded in the report)."
            )
        ),
    ] = Precision.auto,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = ExtractConfig.batch_size,
    workers: Annotated[int, typer.Option(help="Decode threads.")] = 2,
    jobs: Annotated[
        int | None,
        typer.Option(
            help="Processes fitting liblinear's C grid in parallel (same results; -1: all cores; the torch head "
            "uses every core itself)."
        ),
    ] = None,
    quiet: QuietOption = False,
    results: Annotated[
        Path | None,
        typer.Option(help="voc2012-action: write the devkit's result files (DIR/image/, DIR/image_box/)."),
    ] = None,
    test_server: Annotated[
        bool,
        typer.Option(
            help=(
                "voc2012-action: train on trainval and score the test persons (VOC2012test.tar unpacked under --root) "
                "for the evaluation server; needs --results."
            )
        ),
    ] = False,
) -> None:
    """Run the paper's transfer experiment (Appendix B, Tables 11, 12) and print featx beside the paper."""
    from featx.evaluate.pipeline import pipeline_for
    from featx.store.paths import check_output

    # Everything the arguments alone can refute is refuted before torch loads (seconds).
    if test_server and results is None:
        fail("--test-server writes the test set's result files: give --results DIR")
    if report is not None:
        call(check_output, report, "--report", suffix=".json")
    if cache_dir is not None:
        call(check_output, cache_dir, "--cache-dir", folder=True)
    if results is not None:
        call(check_output, results, "--results", folder=True)
    for file in features or ():
        if not file.expanduser().exists():
            fail(f"--features {file}: no such file; give a file made by featx extract")
    chosen = call(pipeline_for, dataset.value if dataset else None, pipeline)
    chosen = call(
        chosen.override,
        models=list(model) if model else None,
        weights=weights,
        scales=parse_scales(scales) if scales else None,
        aggregate=aggregate.value if aggregate else None,
        flip=flip,
        head=head.value if head else None,
        solver=solver.value if solver else None,
        splits=splits,
        seed=seed,
        background=False if no_background else None,
    )
    config = extract_config(
        precision=precision, device=device, batch_size=batch_size, workers=workers, seed=weights_seed
    )
    from featx.evaluate.report import print_table, write_report
    from featx.evaluate.run import evaluate as run_evaluate  # torch loads when features are extracted

    log = logging.getLogger("featx").info if not quiet else None
    result = call(
        run_evaluate,
        chosen,
        config,
        root=root,
        download=download,
        cache_dir=cache_dir,
        features=features or (),
        jobs=jobs,
        progress=not quiet,
        log=log,
        results_dir=results,
        test_server=test_server,
    )
    print_table(result.report)
    if report is not None:
        for path in call(write_report, result, report):
            typer.echo(f"wrote {path}", err=True)


cache_app = App(
    help="List or remove the features featx evaluate cached (default: $XDG_CACHE_HOME/featx, else ~/.cache/featx).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")

CacheDir = Annotated[
    Path | None, typer.Option(help="The cache folder (default: $XDG_CACHE_HOME/featx, else ~/.cache/featx).")
]


@cache_app.command("ls")
def cache_ls(cache_dir: CacheDir = None, quiet: QuietOption = False) -> None:
    """One line per entry: dataset, net, descriptor settings, images, size, date."""
    import time

    from featx.evaluate.cache import entries, resolve_cache_dir

    found = call(entries, cache_dir)
    root = resolve_cache_dir(cache_dir)
    if not found:
        typer.echo(f"{root}: no cached features", err=True)
        return
    for e in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.modified))
        images = f"{e.images} images" if e.images is not None else ("unfinished" if not e.finished else "? images")
        if e.regions is not None:
            images = f"{e.regions} regions of {images}"
        typer.echo(f"{e.name}\n  {e.dataset}, {e.settings}; {images}, {_size(e.bytes)}, {when}")
    total = sum(e.bytes for e in found)
    typer.echo(f"{root}: {len(found)} {'entry' if len(found) == 1 else 'entries'}, {_size(total)}", err=True)


@cache_app.command("rm")
def cache_rm(
    entry: Annotated[list[str] | None, typer.Argument(help="Entries to remove, as featx cache ls names them.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    cache_dir: CacheDir = None,
    quiet: QuietOption = False,
) -> None:
    """Remove cached features (they are extracted again when next needed)."""
    from featx.evaluate.cache import remove

    if entry and all_:
        fail("give entries or --all, not both")
    removed = call(remove, entry or (), all=all_, cache_dir=cache_dir)
    for e in removed:
        typer.echo(f"removed {e.name} ({_size(e.bytes)})", err=True)
    typer.echo(f"freed {_size(sum(e.bytes for e in removed))}", err=True)


def _size(n: int) -> str:
    from featx.store.text import size_text

    return size_text(n)
