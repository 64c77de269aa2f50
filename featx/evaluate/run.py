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

from featx import __version__, store
from featx.errors import BadInput
from featx.evaluate.action import evaluate_action
from featx.evaluate.cache import cached_features
from featx.evaluate.datasets import DatasetIndex, get_spec, load_dataset
from featx.evaluate.heads import (
    HeldOutC,
    OneVsRest,
    fixed_solver,
    make_head,
    span_coordinates,
)
from featx.evaluate.metrics import (
    mean_ap,
    mean_class_recall,
    precision_recall,
    voc07_ap,
    voc_ap,
)
from featx.evaluate.pipeline import Pipeline
from featx.evaluate.report import Evaluation, weights_text
from featx.evaluate.splits import Split, caltech_splits, fixed_splits


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
    *,
    root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    features: Sequence[str | Path] = (),
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 8,
    workers: int = 2,
    jobs: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    results_dir: str | Path | None = None,
    test_server: bool = False,
) -> Evaluation:
    """Run one experiment of the paper end to end and return its report (Appendix B).

    Features are extracted once per net and dataset copy into `cache_dir` (default: the
    per-user cache, featx.evaluate.cache) and reused while settings and files are unchanged.
    `results_dir` and `test_server` apply to VOC2012 action (featx.evaluate.action).
    """
    log = log or (lambda message: None)
    spec = get_spec(pipeline.dataset)
    t0 = time.perf_counter()
    if spec.kind == "voc_action":
        if features:
            raise BadInput(
                "--features does not apply to voc2012-action (it needs image and box features); leave it out"
            )
        if root is None:
            raise BadInput(
                f"--root is missing: give the folder that holds (or should receive, with --download) {spec.images}"
            )
        return evaluate_action(
            pipeline,
            root=root,
            download=download,
            cache_dir=cache_dir,
            device=device,
            precision=precision,
            batch_size=batch_size,
            workers=workers,
            jobs=jobs,
            progress=progress,
            log=log,
            results_dir=results_dir,
            test_server=test_server,
        )
    if results_dir is not None or test_server:
        raise BadInput("--results and --test-server apply to --dataset voc2012-action only; leave them out")
    if root is None and (download or not features or spec.kind == "voc"):
        raise BadInput(
            f"--root is missing: give the folder that holds (or should receive, with --download) "
            f"{spec.images}" + ("" if spec.kind == "voc" else ", or evaluate extracted features with --features FILE")
        )
    if root is not None:
        index = load_dataset(spec, root, background=pipeline.protocol.background, download=download, progress=progress)
    else:
        index = _index_from_features(spec, Path(features[0]), pipeline.protocol.background)
    for line in index.problems:
        log(f"warning: {line}")

    notes = list(index.problems)
    if features:
        nets = [_load_net(Path(f), index) for f in features]
        pipeline = pipeline.override(models=[n.model for n in nets])
        notes += _setting_mismatches(pipeline, nets)
    else:
        # The protocol must fit this copy (e.g. enough images per class) before hours of extraction.
        _splits(pipeline, index)
        nets = [
            _cached_net(
                pipeline,
                model,
                index,
                cache_dir,
                log,
                progress=progress,
                device=device,
                precision=precision,
                batch_size=batch_size,
                workers=workers,
            )
            for model in pipeline.features.models
        ]
    index, nets, dropped = _common_rows(index, nets)
    if dropped:
        notes.append(f"{dropped} images have no features (they failed to decode) and are left out")

    splits = _splits(pipeline, index)
    log(f"{pipeline.name}: {len(index)} images, {len(index.classes)} classes, {len(splits)} split(s)")
    by_model = {n.model: n for n in nets}
    results, curves = [], {}
    t_heads = time.perf_counter()
    for models in pipeline.rows():
        X = _fuse([by_model[m].X for m in models])
        label = _row_label(pipeline, models)
        log(f"{label}: fitting {pipeline.head.name} heads")
        per_split = []
        for split in splits:
            record, curve = _run_split(pipeline, index, X, split, jobs)
            per_split.append(record)
            if curve is not None and label not in curves:
                curves[label] = curve
        values = [s["value"] for s in per_split]
        results.append(
            {
                "label": label,
                "models": list(models),
                "mean": float(np.mean(values)),
                # Sample std over the splits (ddof=1); undefined for a single split.
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "splits": per_split,
            }
        )
    head_seconds = time.perf_counter() - t_heads

    report = {
        "dataset": spec.name,
        "metric": "mean_class_recall" if spec.kind == "caltech" else "mAP",
        "classes": list(index.classes),
        "results": results,
        "paper": {
            "source": pipeline.paper_source,
            "note": pipeline.paper_note,
            "results": [
                {"label": r.label, "models": list(r.models), "mean": r.mean, "std": r.std} for r in pipeline.paper
            ],
        },
        "config": {
            "pipeline": pipeline.to_dict(),
            "weights": weights_text(nets[0].provenance),
            # Asked for (--precision) and, per net above, what the features were computed in.
            "precision": precision if not features else None,
            "features": [
                {
                    "model": n.model,
                    "file": str(n.file),
                    "settings_hash": n.provenance.get("settings_hash"),
                    "weights": n.provenance.get("weights"),
                    "descriptor": n.provenance.get("descriptor"),
                    "precision": n.provenance.get("precision"),
                    "device": n.provenance.get("device"),
                    "dim": int(n.X.shape[1]),
                    "extract_seconds": round(n.extract_seconds, 3),
                    "new_rows": n.new_rows,
                }
                for n in nets
            ],
            "root": str(Path(root).resolve()) if root is not None else None,
            "image_dir": str(index.image_dir),
            "n_images": len(index),
            "notes": notes + ([spec.note] if spec.note else []),
            "featx_version": __version__,
            "head_seconds": round(head_seconds, 3),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    }
    if spec.kind == "voc":
        report["ap"] = "voc07_11point" if pipeline.protocol.metric == "voc07_ap" else "area"
    return Evaluation(report, curves)


# -- features ----------------------------------------------------------------------------


def _cached_net(pipeline, model, index, cache_dir, log, *, progress, **run) -> _Net:
    config = pipeline.features.config(model, **run)
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
            "so that each row's label is its class folder, or pass --root"
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
    want = {"scales": list(f.scales), "flip": f.flip, "aggregate": f.aggregate, "layer": f.layer}
    notes = []
    for n in nets:
        got = n.provenance.get("settings", {})
        diffs = [f"{k}={got.get(k)!r}" for k, v in want.items() if k in got and got[k] != v]
        if diffs:
            notes.append(
                f"{n.file} was extracted with {', '.join(diffs)}, not the pipeline's settings; "
                "results are for the file's descriptor"
            )
    return notes


def _fuse(blocks: list[np.ndarray]) -> np.ndarray:
    """Late fusion: the nets' L2-normalised descriptors stacked, then L2-normalised again.

    Paper, Appendix B: "stacking" the descriptors of Net-D and Net-E. Re-normalising only
    rescales (by 1/sqrt(nets)), which keeps the C grid meaning the same for every row.
    """
    if len(blocks) == 1:
        return blocks[0]
    X = np.hstack(blocks)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


# -- protocol ----------------------------------------------------------------------------


def _splits(pipeline: Pipeline, index: DatasetIndex) -> list[Split]:
    p = pipeline.protocol
    if pipeline.kind == "caltech":
        return caltech_splits(
            index.labels,
            n_train=p.n_train,
            n_test=p.n_test,
            splits=p.splits,
            seed=p.seed,
            classes=index.classes,
        )
    spec = get_spec(pipeline.dataset)
    return fixed_splits(index.subsets[spec.train_set], index.subsets[spec.test_set], splits=p.splits, seed=p.seed)


def _run_split(
    pipeline: Pipeline, index: DatasetIndex, X: np.ndarray, split: Split, jobs: int | None = None
) -> tuple[dict, dict | None]:
    """Fit on the split's training rows (C chosen on a held-out part of them); score on test."""
    p, h = pipeline.protocol, pipeline.head
    if pipeline.kind == "caltech":
        base = make_head(h.name, random_state=split.seed)
        scoring = "mean_class_recall"
    else:
        base = OneVsRest(h.name, random_state=split.seed)
        scoring = p.metric
    # One solver for every fit of the split, chosen from the descriptors' own shape (fewer
    # training images than dimensions: liblinear's dual), so the span coordinates below, which
    # have as many columns as rows, change the speed and nothing else.
    base = fixed_solver(base, (len(split.train), X.shape[1]))
    est = HeldOutC(base, Cs=h.C, holdout=p.holdout, scoring=scoring, random_state=split.seed, n_jobs=jobs)
    y = index.labels
    X_train, X_test = span_coordinates(X[split.train], X[split.test])
    est.fit(X_train, y[split.train])
    record = {
        "seed": split.seed,
        "value": None,
        "n_train": len(split.train),
        "n_test": len(split.test),
        "C": est.C_,
        "n_holdout": est.n_holdout_,
        "holdout_scores": {_c(C): round(100 * s, 4) for C, s in est.scores_.items()},
        "convergence_warnings": est.convergence_warnings_,
        "solver": est.solver_,
    }
    if pipeline.kind == "caltech":
        y_test = y[split.test]
        pred = est.predict(X_test)
        record["value"] = 100 * mean_class_recall(y_test, pred)
        record["per_class"] = {
            index.classes[c]: 100 * float(np.mean(pred[y_test == c] == c)) for c in np.unique(y_test)
        }
        return record, None
    Y_test = y[split.test]
    S = est.decision_function(X_test)
    m07, ap07 = mean_ap(Y_test, S, ap=voc07_ap)
    marea, aparea = mean_ap(Y_test, S, ap=voc_ap)
    record["value"] = 100 * (m07 if p.metric == "voc07_ap" else marea)
    record["voc07_mAP"] = 100 * m07
    record["area_mAP"] = 100 * marea
    record["per_class"] = {c: {"voc07_ap": _pct(a), "area_ap": _pct(b)} for c, a, b in zip(index.classes, ap07, aparea)}
    curve = {}
    for k, c in enumerate(index.classes):
        precision, recall = precision_recall(Y_test[:, k], S[:, k])
        curve[c] = (precision, recall)
    return record, curve


def _c(C: float) -> str:
    return f"{C:g}"


def _pct(x: float) -> float | None:
    return None if np.isnan(x) else 100 * float(x)


def _row_label(pipeline: Pipeline, models: tuple[str, ...]) -> str:
    paper = pipeline.paper_result(models)
    return paper.label if paper is not None else " & ".join(models)
