"""`featx evaluate`: dataset -> cached features per net -> seeded splits -> head -> metric.

Simonyan & Zisserman, arXiv 1409.1556, Appendix B and Table 11: each net (Net-D = vgg16,
Net-E = vgg19) alone and their late fusion, on Caltech-101/256 (mean class recall over
random splits) and PASCAL VOC 2007/2012 (mAP). The result is the report as a plain dict
(JSON-ready, values in percent) plus what the plots need.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import store
from featx.errors import BadInput, option
from featx.evaluate.action import evaluate_action
from featx.evaluate.cache import cached_features
from featx.evaluate.datasets import DatasetIndex, DatasetSpec, get_spec, load_dataset
from featx.evaluate.pipeline import Pipeline
from featx.evaluate.protocol import Outcome, ap_record, class_record, draw_splits, fuse, pr_curves, run_protocol
from featx.evaluate.report import Evaluation, config_block, paper_block, result_row
from featx.evaluate.splits import Split
from featx.extract.config import ExtractConfig


@dataclass
class _Net:
    """One net's features aligned with the dataset index, and where they came from."""

    model: str
    X: np.ndarray
    file: Path
    provenance: dict
    extract_seconds: float = 0.0
    new_rows: int = 0


def evaluate(
    pipeline: Pipeline,
    config: ExtractConfig | None = None,
    *,
    root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    features: Sequence[str | Path] = (),
    jobs: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    results_dir: str | Path | None = None,
    test_server: bool = False,
) -> Evaluation:
    """Run one experiment of the paper end to end and return its report (Appendix B).

    `config` carries how features are computed besides the pipeline's descriptor (device,
    precision, batch size, workers; the seed of random weights). Features are extracted once
    per net and dataset copy into `cache_dir` (default: the per-user cache,
    featx.evaluate.cache) and reused while settings and files are unchanged. `results_dir` and
    `test_server` apply to VOC2012 action (featx.evaluate.action).
    """
    log = log or (lambda message: None)
    config = config if config is not None else ExtractConfig()
    spec = get_spec(pipeline.dataset)
    started = time.perf_counter()
    _check_sources(spec, root, features, download=download, results_dir=results_dir, test_server=test_server)
    if spec.kind == "voc_action":
        return evaluate_action(
            pipeline,
            config,
            root=root,
            download=download,
            cache_dir=cache_dir,
            jobs=jobs,
            progress=progress,
            log=log,
            results_dir=results_dir,
            test_server=test_server,
        )
    index = _dataset_index(spec, pipeline, root, features, download=download, progress=progress, log=log)
    notes = list(index.problems)
    if features:
        nets = [_load_net(Path(f), index) for f in features]
        pipeline = pipeline.override(models=[n.model for n in nets])
        notes += _setting_mismatches(pipeline, nets)
    else:
        # The protocol must fit this copy (e.g. enough images per class) before hours of extraction.
        _splits(pipeline, index)
        nets = [
            _cached_net(pipeline, model, config, index, cache_dir, log, progress=progress)
            for model in pipeline.features.models
        ]
    index, nets, dropped = _common_rows(index, nets)
    if dropped:
        notes.append(f"{dropped} images have no features (they failed to decode) and are left out")

    splits = _splits(pipeline, index)
    log(f"{pipeline.name}: {len(index)} images, {len(index.classes)} classes, {len(splits)} split(s)")
    t_heads = time.perf_counter()
    results, curves = _fit_rows(pipeline, index, nets, splits, jobs, log)
    head_seconds = time.perf_counter() - t_heads
    config_record = config_block(
        pipeline,
        provenance=nets[0].provenance,
        # Asked for (--precision) and, per net below, what the features were computed in.
        precision=config.precision if not features else None,
        features=[_net_record(n) for n in nets],
        root=root,
        image_dir=index.image_dir,
        n_images=len(index),
        notes=notes,
        head_seconds=head_seconds,
        started=started,
    )
    return Evaluation(_report(pipeline, index, results, config_record), curves)


def _check_sources(spec: DatasetSpec, root, features, *, download: bool, results_dir, test_server: bool) -> None:
    """Refuse a combination of data sources and outputs that cannot apply to `spec`."""
    if spec.kind == "voc_action":
        if features:
            raise BadInput(
                "--features does not apply to voc2012-action (it needs image and box features); leave it out"
            )
        if root is None:
            raise BadInput(
                f"--root is missing: give the folder that holds (or should receive, with {option('download')}) "
                f"{spec.images}"
            )
        return
    if results_dir is not None or test_server:
        raise BadInput("--results and --test-server apply to --dataset voc2012-action only; leave them out")
    if root is None and (download or not features or spec.kind == "voc"):
        raise BadInput(
            f"--root is missing: give the folder that holds (or should receive, with {option('download')}) "
            f"{spec.images}"
            + ("" if spec.kind == "voc" else f", or evaluate extracted features with {option('features', 'FILE')}")
        )


def _report(pipeline: Pipeline, index: DatasetIndex, results: list[dict], config_record: dict) -> dict:
    """The report: the metric per row of nets beside the paper's, and how it was made."""
    report = {
        "dataset": pipeline.dataset,
        "metric": "mean_class_recall" if pipeline.kind == "caltech" else "mAP",
        "classes": list(index.classes),
        "results": results,
        "paper": paper_block(pipeline),
        "config": config_record,
    }
    if pipeline.kind == "voc":
        report["ap"] = "voc07_11point" if pipeline.protocol.metric == "voc07_ap" else "area"
    return report


def _dataset_index(
    spec: DatasetSpec, pipeline: Pipeline, root, features, *, download: bool, progress: bool, log
) -> DatasetIndex:
    """The images and labels: the copy under `root`, else the labels of the first feature file."""
    background = pipeline.protocol.background
    if root is not None:
        index = load_dataset(spec, root, background=background, download=download, progress=progress)
    else:
        index = _index_from_features(spec, Path(features[0]), background)
    for line in index.problems:
        log(f"warning: {line}")
    return index


def _net_record(net: _Net) -> dict:
    """What the report says of one net's features: file, descriptor, how and how fast computed."""
    prov = net.provenance
    return {
        "model": net.model,
        "file": str(net.file),
        "settings_hash": prov.get("settings_hash"),
        "weights": prov.get("weights"),
        "descriptor": prov.get("descriptor"),
        "precision": prov.get("precision"),
        "device": prov.get("device"),
        "dim": int(net.X.shape[1]),
        "extract_seconds": round(net.extract_seconds, 3),
        "new_rows": net.new_rows,
    }


# -- features ----------------------------------------------------------------------------


def _cached_net(pipeline, model, base: ExtractConfig, index, cache_dir, log, *, progress) -> _Net:
    config = pipeline.features.config(model, base)
    # VOC: only the images of the two image sets (VOC2012's folder holds 5,600 others); Caltech:
    # the whole class-folder tree, so that --no-background reuses the same entry.
    inputs = [index.image_dir / p for p in index.paths] if index.subsets else [index.image_dir]
    cached = cached_features(inputs, config, name=pipeline.dataset, cache_dir=cache_dir, progress=progress, log=log)
    net = _load_net(cached.file, index)
    net.extract_seconds, net.new_rows = cached.seconds, cached.new_rows
    return net


def _load_net(path: Path, index: DatasetIndex) -> _Net:
    prov = store.read_provenance(path)
    table = store.read_table(path, ["path", "feature"])
    paths = table.column("path").to_pylist()
    X = store.feature_matrix(table.column("feature"))
    if not np.isfinite(X).all():  # NaN marks missing rows below: a file's own NaN would pass for them
        raise BadInput(f"{path} holds rows with NaN or infinity; featx extract never writes them: extract it again")
    row = {p: i for i, p in enumerate(paths)}
    found = np.array([row.get(p, -1) for p in index.paths])
    if (found < 0).all():
        raise BadInput(
            f"{path} holds none of the {len(index)} images of {index.name} (its first path is "
            f"{paths[0] if paths else 'none'!r}, the dataset's {index.paths[0]!r}); extract the "
            f"image folder {index.image_dir} itself"
        )
    Xa = np.zeros((len(index), X.shape[1]), np.float32)
    Xa[found >= 0] = X[found[found >= 0]]
    # Rows without features are marked by NaN and dropped for every net alike.
    Xa[found < 0] = np.nan
    model = prov.get("model") or prov.get("settings", {}).get("model", path.stem)
    return _Net(model, Xa, path, prov)


def _common_rows(index: DatasetIndex, nets: list[_Net]) -> tuple[DatasetIndex, list[_Net], int]:
    keep = np.ones(len(index), bool)
    for n in nets:
        keep &= ~np.isnan(n.X[:, 0])
    if keep.all():
        return index, nets, 0
    for n in nets:
        n.X = n.X[keep]
    new_pos = np.cumsum(keep) - 1
    subsets = {k: new_pos[v[keep[v]]] for k, v in index.subsets.items()}
    kept = DatasetIndex(
        name=index.name,
        image_dir=index.image_dir,
        paths=tuple(p for p, k in zip(index.paths, keep) if k),
        classes=index.classes,
        labels=index.labels[keep],
        subsets=subsets,
        problems=index.problems,
    )
    return kept, nets, int((~keep).sum())


def _index_from_features(spec, path: Path, background: bool) -> DatasetIndex:
    """A Caltech index from a feature file alone: its paths are class/image, its labels classes."""
    table = store.read_table(path, ["path", "label"])
    paths, labels = table.column("path").to_pylist(), table.column("label").to_pylist()
    pairs = sorted((p, c) for p, c in zip(paths, labels) if c and (background or c != spec.background))
    if not pairs:
        raise BadInput(
            f"{path} has no labelled rows; extract the class-folder tree ({spec.images}) "
            f"so that each row's label is its class folder, or pass {option('root', 'DIR')}"
        )
    classes = tuple(sorted({c for _, c in pairs}))
    position = {c: i for i, c in enumerate(classes)}
    return DatasetIndex(
        name=spec.name,
        image_dir=path,
        paths=tuple(p for p, _ in pairs),
        classes=classes,
        labels=np.array([position[c] for _, c in pairs], dtype=np.int64),
        problems=(f"dataset taken from the labels in {path} (no --root): completeness not checked",),
    )


def _setting_mismatches(pipeline: Pipeline, nets: list[_Net]) -> list[str]:
    """Say where given feature files differ from the pipeline's descriptor (they are used as they are)."""
    f = pipeline.features
    want = {"scales": list(f.scales), "flip": f.flip, "aggregate": f.aggregate}
    notes = []
    for n in nets:
        try:
            want["layer"] = f.tap(n.model)
        except BadInput:  # a file of a net featx does not know: its layer is its own
            want.pop("layer", None)
        got = n.provenance.get("settings", {})
        diffs = [f"{k}={got.get(k)!r}" for k, v in want.items() if k in got and got[k] != v]
        if diffs:
            notes.append(
                f"{n.file} was extracted with {', '.join(diffs)}, not the pipeline's settings; "
                "results are for the file's descriptor"
            )
    return notes


# -- protocol ----------------------------------------------------------------------------


def _splits(pipeline: Pipeline, index: DatasetIndex) -> list[Split]:
    fixed = None
    if pipeline.kind == "voc":
        spec = get_spec(pipeline.dataset)
        fixed = (index.subsets[spec.train_set], index.subsets[spec.test_set])
    return draw_splits(pipeline.protocol, index.labels, classes=index.classes, fixed=fixed)


def _fit_rows(pipeline: Pipeline, index: DatasetIndex, nets: list[_Net], splits: list[Split], jobs, log):
    """Each net alone and their late fusion, over every split: the report's rows, and the PR
    curves (VOC: the first split's) per row."""
    by_model = {n.model: n for n in nets}
    results, curves = [], {}
    for models in pipeline.rows():
        X = fuse([by_model[m].X for m in models], pipeline.protocol.stack_norm)
        label = _row_label(pipeline, models)
        log(f"{label}: fitting {pipeline.head.name} heads")
        outcomes = run_protocol(
            X, index.labels, splits, pipeline.protocol, pipeline.head, len(index.classes), jobs=jobs
        )
        if pipeline.kind == "voc":
            curves[label] = pr_curves(outcomes[0], index.classes)
        results.append(result_row(label, models, [split_record(pipeline, index.classes, o) for o in outcomes]))
    return results, curves


def split_record(pipeline: Pipeline, classes: tuple[str, ...], outcome: Outcome) -> dict:
    """One split in the report: the fit, and `value` (Caltech: mean class recall with the recall
    per class tested; VOC: the pipeline's mAP, both mAPs and the APs per class)."""
    if pipeline.kind != "caltech":
        return outcome.fit | ap_record(outcome, classes, pipeline.protocol.metric)
    scores = class_record(outcome, classes)
    return outcome.fit | {
        "value": scores["mean_class_recall"],
        "per_class": {c: v["recall"] for c, v in scores["per_class"].items() if v["n_test"]},
    }


def _row_label(pipeline: Pipeline, models: tuple[str, ...]) -> str:
    paper = pipeline.paper_result(models)
    return paper.label if paper is not None else " & ".join(models)
