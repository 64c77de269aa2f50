"""The `featx` command: parses options and calls the library; nothing else lives here."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from featx.errors import FeatxError
from featx.extract.config import DEFAULT_MAX_PIXELS, DEFAULT_SCALES
from featx.net.backbones import NAMES, TAP_NAMES, get_backbone
from featx.net.device import PRECISIONS

app = typer.Typer(
    help="The very deep features of Simonyan & Zisserman (arXiv 1409.1556, Appendix B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Choices from the one list of each: backbones and their taps (featx.net.backbones), precisions
# (featx.net.device). A layer that the chosen model lacks is refused by ExtractConfig.
Model = Enum("Model", {m: m for m in NAMES}, type=str)
Layer = Enum("Layer", {t: t for t in TAP_NAMES}, type=str)
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)


class Aggregate(str, Enum):
    mean = "mean"
    stack = "stack"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


# Options that `featx extract` and `featx probe` share, word for word.
ModelOption = Annotated[Model, typer.Option(help="torchvision VGG: D = vgg16, E = vgg19.")]
LayerOption = Annotated[Layer, typer.Option(help="fc7 (the paper's), fc6, or pool5 (512-D).")]
ScalesOption = Annotated[str, typer.Option(help="Smaller-side sizes Q, comma-separated.")]
FlipOption = Annotated[bool, typer.Option("--flip/--no-flip", help="Average with the horizontally flipped image.")]
AggregateOption = Annotated[Aggregate, typer.Option(help="Combine scales by mean (VOC) or stack (Caltech).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, or cuda[:N].")]


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit: how every user error ends."""
    typer.echo(f"featx: error: {message}", err=True)
    raise typer.Exit(code)


def call(fn, *args, **kwargs):
    """Run a library call; user errors become one line and exit code 2, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except FeatxError as e:
        fail(str(e), e.exit_code)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as e:
        # Builtin errors raised for the user's input by the libraries featx calls (pyarrow,
        # Pillow, the OS): still one line, with the library's own words.
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def extract_config(**settings):
    """The one settings shape every command hands the library: an ExtractConfig, checked before
    torch loads (a bad value is one line). Enum options are taken by their values."""
    from featx.extract.config import ExtractConfig

    return call(ExtractConfig, **{k: v.value if isinstance(v, Enum) else v for k, v in settings.items()})


def parse_scales(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(q) for q in text.replace(" ", "").split(",") if q)
    except ValueError:
        fail(f"--scales {text!r} is not a list of integers; write e.g. --scales 256,384,512")


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print debugging detail.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors (and the results).")] = False,
) -> None:
    """The very deep features of Simonyan & Zisserman (arXiv 1409.1556, Appendix B)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("featx")
    logger.setLevel(level)
    for old in [h for h in logger.handlers if getattr(h, "featx_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)  # this invocation's stderr (CliRunner swaps it)
    handler.setFormatter(logging.Formatter("featx: %(message)s"))
    handler.featx_cli = True
    logger.addHandler(handler)
    logger.propagate = False


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"featx: warning: {message}", file=sys.stderr)


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
            help="'default' (torchvision IMAGENET1K_V1, downloaded once), a state-dict FILE, or 'random' (tests only)."
        ),
    ] = "default",
    layer: LayerOption = Layer.fc7,
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
    batch_size: Annotated[
        int, typer.Option(help="At most this many images per batch (mixed sizes share a batch exactly).")
    ] = 32,
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
    seed: Annotated[int, typer.Option(help="Seed of --weights random.")] = 0,
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
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
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
    """Describe every image with the paper's dense multi-scale VGG descriptor; write Parquet."""
    from featx.extract.config import ExtractConfig

    warnings.showwarning = _warn_one_line
    # Everything the arguments alone can refute is refuted before torch loads (seconds).
    config = call(
        ExtractConfig,
        model=model.value,
        weights=weights,
        layer=layer.value,
        scales=parse_scales(scales),
        flip=flip,
        aggregate=aggregate.value,
        precision=precision.value,
        device=device,
        batch_size=batch_size,
        batch_pixels=batch_pixels,
        devices=devices,
        workers=workers,
        max_pixels=max_pixels,
        seed=seed,
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


def _check_extract_arguments(paths, output, engine, devices, shard, ray_address, ray_actors) -> None:
    """What `featx extract`'s arguments alone refute, in one line each, before any work."""
    from featx.extract.shard import parse_shard
    from featx.store.paths import check_output

    if engine is Engine.ray and devices:
        fail("--devices is for the local engine; with --engine ray, Ray places one model actor per GPU (--ray-actors)")
    call(check_output, output, "-o", folder=engine is Engine.ray)
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
) -> None:
    """Rows, dimension, labels, failures and provenance of a feature file or folder."""
    from featx.store import feature_info, read_provenance

    if json_out:
        typer.echo(json.dumps(call(read_provenance, path), indent=2, sort_keys=True))
        return
    typer.echo("\n".join(call(feature_info, path).lines()))


@app.command()
def model(
    name: Annotated[Model, typer.Argument(help="torchvision VGG: vgg11 (A) ... vgg19 (E), _bn with batch norm.")],
    size: Annotated[str, typer.Option(help="Input height x width, e.g. 224x224 or 256x341.")] = "224x224",
    layer: Annotated[Layer, typer.Option(help="The layer the dense net ends at.")] = Layer.fc7,
) -> None:
    """The dense net's layer table at one input size: output shapes, parameters, FLOPs (no weights loaded)."""
    try:
        height, width = (int(v) for v in size.lower().split("x"))
        if height < 1 or width < 1:
            raise ValueError
    except ValueError:
        fail(f"--size {size!r} is not HxW; give e.g. --size 224x224")
    for line in call(get_backbone(name.value).summary_lines, height, width, layer.value):
        typer.echo(line)


def _size(n: int) -> str:
    from featx.store.text import size_text

    return size_text(n)


def main() -> None:  # pragma: no cover - console entry point
    app()


# -- featx evaluate (the paper's transfer experiments) -----------------------------------

from featx.evaluate.datasets import DATASETS  # noqa: E402

Dataset = Enum("Dataset", {d: d for d in DATASETS}, type=str)


class HeadName(str, Enum):
    svm = "svm"
    logreg = "logreg"


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
        list[Model] | None,
        typer.Option(help="Net(s) to evaluate, repeatable; two give their late fusion too (D & E)."),
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
    splits: Annotated[int | None, typer.Option(help="Override the number of seeded splits.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first split (split i uses seed + i).")] = None,
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
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    workers: Annotated[int, typer.Option(help="Decode threads.")] = 2,
    jobs: Annotated[
        int | None, typer.Option(help="Processes fitting the C grid in parallel (same results; -1: all cores).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
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

    warnings.showwarning = _warn_one_line
    # Everything the arguments alone can refute is refuted before torch loads (seconds).
    if test_server and results is None:
        fail("--test-server writes the test set's result files: give --results DIR")
    if report is not None:
        call(check_output, report, "--report", suffix=".json")
    if cache_dir is not None:
        call(check_output, cache_dir, "--cache-dir", folder=True)
    for file in features or ():
        if not file.expanduser().exists():
            fail(f"--features {file}: no such file; give a file made by featx extract")
    chosen = call(pipeline_for, dataset.value if dataset else None, pipeline)
    chosen = call(
        chosen.override,
        models=[m.value for m in model] if model else None,
        weights=weights,
        scales=parse_scales(scales) if scales else None,
        aggregate=aggregate.value if aggregate else None,
        flip=flip,
        head=head.value if head else None,
        splits=splits,
        seed=seed,
        background=False if no_background else None,
    )
    config = extract_config(precision=precision, device=device, batch_size=batch_size, workers=workers)
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


# -- featx probe, index, neighbours (your own data) ----------------------------------------


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
    layer: LayerOption = Layer.fc7,
    scales: ScalesOption = ",".join(map(str, DEFAULT_SCALES)),
    flip: FlipOption = True,
    aggregate: AggregateOption = Aggregate.mean,
    precision: Annotated[
        Precision, typer.Option(help="Model precision (auto = bf16 where native, else fp32).")
    ] = Precision.auto,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    workers: Annotated[int, typer.Option(help="Decode threads.")] = 2,
    max_pixels: Annotated[int, typer.Option(help="Refuse larger images before decoding them.")] = DEFAULT_MAX_PIXELS,
    bucket: Annotated[
        int, typer.Option(help="0 = exact resize; N = snap the longer side to a multiple of N (changes numbers).")
    ] = 0,
    weights_seed: Annotated[int, typer.Option(help="Seed of --weights random.")] = 0,
    jobs: Annotated[int | None, typer.Option(help="Processes fitting the C grid in parallel (same results).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """How well do the features transfer to your labelled images? The paper's protocol on your folder."""
    from featx.downstream.probe import probe as run_probe
    from featx.downstream.probe_report import print_report, write_predictions, write_report
    from featx.evaluate.protocol import Head, Protocol
    from featx.store.paths import check_output

    warnings.showwarning = _warn_one_line
    if report is not None:
        call(check_output, report, "--report", suffix=".json")
    if predictions is not None:
        call(check_output, predictions, "--predictions", suffix=".parquet")
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
        head=Head(head.value),
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
) -> None:
    """Build a nearest-neighbour index (cosine, FAISS) over a feature file or folder."""
    from featx.downstream.search import Index

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
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
) -> None:
    """The nearest indexed images of each query by cosine; or near-duplicate pairs (--duplicates)."""
    from featx.downstream.search import Index
    from featx.downstream.sheet import draw_sheet

    warnings.showwarning = _warn_one_line
    if output is not None and output.suffix.lower() not in (".parquet", ".csv"):
        fail(f"-o {output} must end in .parquet or .csv")
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
    elif output.suffix.lower() == ".csv":
        table.to_csv(output, index=False)
        typer.echo(f"wrote {output} ({len(table)} rows)", err=True)
    else:
        table.to_parquet(output, index=False)
        typer.echo(f"wrote {output} ({len(table)} rows)", err=True)


# -- featx cache (the features `featx evaluate` keeps) ----------------------------------

cache_app = typer.Typer(
    help="List or remove the features featx evaluate cached (default: $XDG_CACHE_HOME/featx, else ~/.cache/featx).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")

CacheDir = Annotated[
    Path | None, typer.Option(help="The cache folder (default: $XDG_CACHE_HOME/featx, else ~/.cache/featx).")
]


@cache_app.command("ls")
def cache_ls(cache_dir: CacheDir = None) -> None:
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
) -> None:
    """Remove cached features (they are extracted again when next needed)."""
    from featx.evaluate.cache import remove

    if entry and all_:
        fail("give entries or --all, not both")
    removed = call(remove, entry or (), all=all_, cache_dir=cache_dir)
    for e in removed:
        typer.echo(f"removed {e.name} ({_size(e.bytes)})", err=True)
    typer.echo(f"freed {_size(sum(e.bytes for e in removed))}", err=True)
