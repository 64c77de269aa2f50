"""`featx probe`, `featx index`, `featx neighbours`: the features at work on your own data."""

from __future__ import annotations

import logging
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
    HeadName,
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
from featx.evaluate.solvers import EXACT_MAX_ROWS, MEMORY_SHARE, SOLVERS
from featx.extract.config import DEFAULT_MAX_PIXELS, DEFAULT_SCALES, ExtractConfig

Solver = Enum("Solver", {s: s for s in SOLVERS}, type=str)


@app.command()
def probe(
    source: Annotated[
        Path,
        typer.Argument(help="An image folder (labels: its subfolders) or a feature file/folder from featx extract."),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(help="CSV or Parquet with path,label (or path,labels: a list, 'a;b' in CSV, for multi-label)."),
    ] = None,
    splits: Annotated[int, typer.Option(help="Seeded splits; mean ± std over them.")] = 3,
    test_size: Annotated[float, typer.Option(help="Fraction of each class tested (stratified).")] = 0.2,
    train_per_class: Annotated[
        int | None,
        typer.Option(help="Few-shot: K training images per class, the rest tested (instead of --test-size)."),
    ] = None,
    head: Annotated[
        HeadName,
        typer.Option(help="Classifier: svm (linear SVM, the paper's) or logreg; C chosen on held-out training images."),
    ] = HeadName.svm,
    solver: Annotated[
        Solver,
        typer.Option(
            help=(
                "exact: liblinear (the paper's); scalable: torch on every core or the GPU, same objective; streamed: "
                "scalable reading the features from their file for every pass (memory flat in the rows); auto: exact "
                f"up to {EXACT_MAX_ROWS:,} training images, scalable above, streamed when the features exceed "
                f"{MEMORY_SHARE:.0%} of the memory."
            )
        ),
    ] = Solver.auto,
    seed: Annotated[int, typer.Option(help="Seed of the first split (split i uses seed + i).")] = 0,
    drop_small_classes: Annotated[
        bool, typer.Option(help="Probe without the classes that have too few images (default: refuse, naming them).")
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Write the results as JSON here, with a confusion matrix and per-class bars (PNG) beside it."
        ),
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(help="Write path, split, label, predicted, score per test image per split (.parquet)."),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where an image folder's features are cached (as featx evaluate's).")
    ] = None,
    model: ModelOption = "vgg16",
    weights: Annotated[
        str, typer.Option(help="'default' (ImageNet), a state-dict FILE, or 'random' (tests only: chance level).")
    ] = "default",
    layer: LayerOption = "default",
    scales: ScalesOption = ",".join(map(str, DEFAULT_SCALES)),
    flip: FlipOption = True,
    aggregate: AggregateOption = Aggregate.mean,
    precision: Annotated[
        Precision, typer.Option(help="Model precision (auto = bf16 where native, else fp32).")
    ] = Precision.auto,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = ExtractConfig.batch_size,
    workers: Annotated[int, typer.Option(help="Decode threads.")] = 2,
    max_pixels: Annotated[int, typer.Option(help="Refuse larger images before decoding them.")] = DEFAULT_MAX_PIXELS,
    bucket: Annotated[
        int, typer.Option(help="0 = exact resize; N = snap the longer side to a multiple of N (changes numbers).")
    ] = 0,
    weights_seed: WeightsSeedOption = 0,
    jobs: Annotated[
        int | None,
        typer.Option(
            help="Processes fitting liblinear's C grid in parallel (same results; the torch head uses every core)."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """How well do the features transfer to your labelled images? The paper's protocol on your folder."""
    from featx.downstream.probe import probe as run_probe
    from featx.downstream.probe_report import print_report, write_predictions, write_report
    from featx.evaluate.protocol import Head, Protocol
    from featx.store.paths import check_output

    if report is not None:
        call(check_output, report, "--report", suffix=".json")
    if predictions is not None:
        call(check_output, predictions, "--predictions", suffix=".parquet")
    if cache_dir is not None:
        call(check_output, cache_dir, "--cache-dir", folder=True)
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
        workers=workers,
        max_pixels=max_pixels,
        bucket=bucket,
        seed=weights_seed,
    )
    protocol = call(
        Protocol,
        splits=splits,
        seed=seed,
        n_train=train_per_class,
        test_size=test_size,
        drop_small_classes=drop_small_classes,
    )
    log = logging.getLogger("featx").info if not quiet else None
    result = call(
        run_probe,
        source,
        config,
        protocol,
        head=Head(head.value, solver=solver.value),
        labels=labels,
        cache_dir=cache_dir,
        jobs=jobs,
        progress=not quiet,
        log=log,
    )
    print_report(result)
    if report is not None:
        for path in call(write_report, result, report):
            typer.echo(f"wrote {path}", err=True)
    if predictions is not None:
        typer.echo(f"wrote {call(write_predictions, result, predictions)}", err=True)


class IndexKind(str, Enum):
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"


@app.command()
def index(
    features: Annotated[Path, typer.Argument(help="A feature file or folder from featx extract.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The index folder to write.")],
    kind: Annotated[
        IndexKind, typer.Option(help="flat: exact cosine; hnsw or ivf: approximate, for large sets (recall@k printed).")
    ] = IndexKind.flat,
    images: Annotated[
        Path | None, typer.Option(help="The folder the features were extracted from (for --sheet thumbnails).")
    ] = None,
    m: Annotated[int, typer.Option(help="hnsw: links per node.")] = 32,
    ef_search: Annotated[
        int, typer.Option(help="hnsw: candidates kept while searching (more: better recall, slower).")
    ] = 128,
    nlist: Annotated[int | None, typer.Option(help="ivf: number of lists (default about 4 sqrt(rows)).")] = None,
    nprobe: Annotated[int, typer.Option(help="ivf: lists visited per query (more: better recall, slower).")] = 32,
    recall_k: Annotated[int, typer.Option(help="k of the recall@k measured for approximate kinds.")] = 10,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Build a nearest-neighbour index (cosine, FAISS) over a feature file or folder."""
    from featx.downstream.search import Index, check_index_output

    call(check_index_output, output, overwrite=overwrite)  # before minutes of building

    built = call(
        Index.build,
        features,
        kind.value,
        m=m,
        ef_search=ef_search,
        nlist=nlist,
        nprobe=nprobe,
        recall_k=recall_k,
        images=images,
    )
    call(built.save, output, overwrite=overwrite)
    typer.echo(f"{output}: {len(built)} rows × {built.dim}, {kind.value} index, built in {built.build_seconds:.1f} s")
    if built.recall is not None:
        r = built.recall
        typer.echo(
            f"  recall@{r['k']} against exact search: {r['recall']:.3f} ({r['queries']} of the rows as queries, "
            f"{r['query_ms']:.3f} ms per query); raise "
            + ("--ef-search" if kind is IndexKind.hnsw else "--nprobe")
            + " for more"
        )


@app.command()
def neighbours(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="An index folder from featx index.")],
    queries: Annotated[
        list[Path] | None, typer.Argument(metavar="QUERY...", help="Image files, image folders or feature files.")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query.")] = 10,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Write the table to FILE.parquet or FILE.csv instead of stdout."),
    ] = None,
    sheet: Annotated[Path | None, typer.Option(help="Draw each query beside its neighbours in FILE.png.")] = None,
    images: Annotated[
        Path | None,
        typer.Option(help="Folder of the indexed images, for --sheet (default: the one given to featx index)."),
    ] = None,
    duplicates: Annotated[
        float | None, typer.Option(help="List pairs of indexed rows with cosine >= THRESHOLD (exact), e.g. 0.95.")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="The weights FILE the index's features were made with (needed for image queries if a file)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, or cuda[:N] (to describe query images).")] = "auto",
    batch_size: BatchSizeOption = ExtractConfig.batch_size,
    quiet: QuietOption = False,
) -> None:
    """The nearest indexed images of each query by cosine; or near-duplicate pairs (--duplicates)."""
    from featx.downstream.search import TABLE_SUFFIXES, Index, write_table
    from featx.downstream.sheet import draw_sheet
    from featx.store.paths import check_output

    # Every output is checked before queries are described (minutes), by the one rule.
    if output is not None:
        call(check_output, output, "-o", suffix=TABLE_SUFFIXES)
    if sheet is not None:
        call(check_output, sheet, "--sheet", suffix=".png")
    if not queries and duplicates is None:
        fail("give a QUERY (image, folder or feature file), or --duplicates THRESHOLD")
    if duplicates is not None and (queries or sheet is not None):
        fail("--duplicates lists pairs within the index: give no QUERY and no --sheet with it")
    idx = call(Index.load, index_dir)
    if duplicates is not None:
        table = call(idx.duplicates, duplicates)
    else:
        table = call(idx.neighbours, queries, k, weights=weights, device=device, batch_size=batch_size)
        if sheet is not None:
            where = images if images is not None else idx.images
            typer.echo(f"wrote {call(draw_sheet, table, sheet, images=where)}", err=True)
    if output is None:
        typer.echo(table.to_string(index=False, float_format=lambda x: f"{x:.4f}") if len(table) else "(no pairs)")
    else:
        typer.echo(f"wrote {call(write_table, table, output)} ({len(table)} rows)", err=True)
