"""`featx probe`: how well do the features transfer to your own labelled images?

The paper's protocol (Simonyan & Zisserman, arXiv 1409.1556, Appendix B) applied to any
folder: seeded splits, a linear head on the L2-normalised descriptors with C chosen on a
held-out part of the training images only, then refit; mean ± std over the splits. The
result is a JSON-ready report (values in percent) and one predictions row per test image
per split, from which every number of the report can be recomputed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featx import __version__, store
from featx.errors import BadInput, MissingData
from featx.evaluate.heads import DEFAULT_CS, HEADS, HeldOutC, OneVsRest, make_head
from featx.evaluate.metrics import mean_class_recall, voc_ap
from featx.evaluate.splits import Split, caltech_splits, split_seeds
from featx.extract.config import ExtractConfig

TOP_K = 5


@dataclass(frozen=True)
class Protocol:
    """How a probe splits, fits and scores: the paper's way, as data (Appendix B)."""

    splits: int = 3
    test_size: float = 0.2  # stratified fraction per class, unless train_per_class is set
    train_per_class: int | None = None  # few-shot: K training images per class, the rest tested
    head: str = "svm"
    Cs: tuple[float, ...] = DEFAULT_CS
    holdout: float = 0.2  # part of the training images on which C is chosen
    seed: int = 0
    drop_small_classes: bool = False

    def __post_init__(self) -> None:
        if self.splits < 1:
            raise BadInput(f"--splits {self.splits} must be at least 1")
        if self.train_per_class is None and not 0 < self.test_size < 1:
            raise BadInput(f"--test-size {self.test_size} must be a fraction between 0 and 1, e.g. 0.2")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise BadInput(f"--train-per-class {self.train_per_class} must be at least 1")
        if self.head not in HEADS:
            raise BadInput(f"unknown --head {self.head!r}; choose one of {', '.join(HEADS)}")

    def min_images(self) -> int:
        """Images a class needs: K to train and one to test, or two to train (one for C) and one to test."""
        return self.train_per_class + 1 if self.train_per_class is not None else 3

    def to_dict(self) -> dict:
        return {
            "splits": self.splits,
            "test_size": None if self.train_per_class is not None else self.test_size,
            "train_per_class": self.train_per_class,
            "head": self.head,
            "Cs": list(self.Cs),
            "holdout": self.holdout,
            "seed": self.seed,
            "drop_small_classes": self.drop_small_classes,
        }


@dataclass
class Labelled:
    """Features with their labels: single-label (y: class index) or multi-label (Y: ±1)."""

    paths: np.ndarray
    X: np.ndarray
    classes: tuple[str, ...]
    y: np.ndarray  # [n] class index, or [n, C] in {1, -1} when multi_label
    multi_label: bool
    provenance: dict
    file: str
    errors: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ProbeResult:
    """The report (JSON-ready, percent), the predictions table and the summed confusion counts."""

    report: dict
    predictions: pd.DataFrame
    confusion: np.ndarray | None = None


def probe(
    source: str | Path,
    *,
    labels: str | Path | None = None,
    splits: int = 3,
    test_size: float = 0.2,
    train_per_class: int | None = None,
    head: str = "svm",
    Cs: tuple[float, ...] = DEFAULT_CS,
    holdout: float = 0.2,
    seed: int = 0,
    drop_small_classes: bool = False,
    cache_dir: str | Path | None = None,
    jobs: int | None = None,
    progress: bool = False,
    log=None,
    **extract,
) -> ProbeResult:
    """How well the descriptors separate the classes of `source` (arXiv 1409.1556, Appendix B protocol).

    `source` is an image folder (labels: its subfolders, or `labels`) described through the
    cached, resumable extraction of `featx evaluate` with the ExtractConfig settings given as
    keywords (model, weights, scales, ...; `weights_seed` for --weights random), or a feature
    file/folder from `featx extract`.
    """
    if "weights_seed" in extract:  # `seed` is the splits' seed here, as in `featx evaluate`
        extract["seed"] = extract.pop("weights_seed")
    protocol = Protocol(splits, test_size, train_per_class, head, tuple(Cs), holdout, seed, drop_small_classes)
    data = load_labelled(source, labels=labels, cache_dir=cache_dir, progress=progress, log=log, **extract)
    return run_protocol(data, protocol, jobs=jobs)


# -- data ----------------------------------------------------------------------------------


def is_feature_source(path: Path) -> bool:
    """A feature file, or a folder holding only feature files (not images)."""
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    if not path.is_dir():
        return False
    has_parquet = False
    for f in path.rglob("*"):
        if f.is_file():
            if f.suffix.lower() == ".parquet":
                has_parquet = True
            elif not f.name.startswith("."):
                return False
    return has_parquet


def load_labelled(
    source: str | Path,
    *,
    labels: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    log=None,
    **extract,
) -> Labelled:
    """Features and labels of `source` (image folder or feature file/folder), problems collected."""
    source = Path(source).expanduser()
    if not source.exists():
        raise MissingData(f"{source}: no such image folder or feature file")
    errors: list[dict] = []
    notes: list[str] = []
    if is_feature_source(source):
        defaults = ExtractConfig()
        ignored = sorted(k for k, v in extract.items() if getattr(defaults, k, object()) != v)
        if ignored:
            notes.append(f"{source} holds features already: the extraction settings {', '.join(ignored)} are not used")
        file = source
        keep = None
        error_file = store.errors_path(source)
        if error_file.exists():
            errors += pq.read_table(error_file).to_pylist()
    else:
        if not source.is_dir():
            raise BadInput(f"{source} is neither an image folder nor a .parquet feature file")
        try:
            config = ExtractConfig(**extract)
        except TypeError as e:  # a misspelt keyword: name the ones that exist
            fields = ", ".join(ExtractConfig.__dataclass_fields__)
            raise BadInput(f"{e}; extraction settings are {fields}") from None
        file, keep, more = cached_features(source, config, cache_dir, progress, log)
        errors += more
        errors += empty_folders(source)
    table = store.read_table(file, ["path", "label", "feature"])
    paths = np.asarray(table.column("path").to_pylist(), dtype=object)
    X = store.feature_matrix(table.column("feature"))
    folder_labels = table.column("label").to_pylist()
    if keep is not None:
        # The cache may hold images that have since left the folder: use the folder as it is.
        mask = np.fromiter((p in keep for p in paths), bool, len(paths))
        paths, X = paths[mask], X[mask]
        folder_labels = [label for label, m in zip(folder_labels, mask) if m]
    order = np.argsort(paths, kind="stable")
    paths, X = paths[order], X[order]
    folder_labels = [folder_labels[i] for i in order]

    if labels is not None:
        given = read_labels(labels)
        multi = isinstance(next(iter(given.values()), ""), list)
        have = np.fromiter((p in given for p in paths), bool, len(paths))
        if not have.any():
            raise BadInput(
                f"--labels {labels} names none of the {len(paths)} images (its first path is "
                f"{next(iter(given), 'none')!r}, the images' {paths[0]!r}); give paths relative to {source}"
            )
        if (~have).sum():
            notes.append(f"{int((~have).sum())} images have no row in {labels} and are left out")
        missing = len(set(given) - set(paths))
        if missing:
            notes.append(f"{missing} paths of {labels} have no features (not found or failed) and are left out")
        paths, X = paths[have], X[have]
        row_labels = [given[p] for p in paths]
    else:
        multi = False
        row_labels = folder_labels
        unlabelled = sum(1 for label in row_labels if label is None)
        if unlabelled:
            notes.append(f"{unlabelled} images are not in a class folder and are left out (use --labels FILE)")
            have = np.array([label is not None for label in row_labels])
            paths, X = paths[have], X[have]
            row_labels = [label for label in row_labels if label is not None]
    if multi:
        classes = tuple(sorted({c for ls in row_labels for c in ls}))
        position = {c: i for i, c in enumerate(classes)}
        y = -np.ones((len(paths), len(classes)), np.int64)
        for i, ls in enumerate(row_labels):
            y[i, [position[c] for c in ls]] = 1
    else:
        classes = tuple(sorted(set(row_labels)))
        position = {c: i for i, c in enumerate(classes)}
        y = np.array([position[label] for label in row_labels], np.int64)
    return Labelled(paths, X, classes, y, multi, store.read_provenance(file), str(file), errors, notes)


def read_labels(path: str | Path) -> dict[str, str | list[str]]:
    """path -> label (column `label`) or path -> list of labels (column `labels`: a list, or `a;b` in CSV)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingData(f"--labels {path}: no such file; give a CSV or Parquet file with columns path,label")
    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        df = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    else:
        raise BadInput(f"--labels {path} must be .csv or .parquet, with columns path,label (or path,labels)")
    if "path" not in df.columns or not ({"label", "labels"} & set(df.columns)):
        raise BadInput(
            f"--labels {path} has columns {list(df.columns)}; it needs path and label (or labels, for multi-label)"
        )
    if "labels" in df.columns:

        def as_list(v):
            if isinstance(v, str):
                return sorted({s.strip() for s in v.split(";") if s.strip()})
            return sorted({str(s) for s in (v if v is not None else [])})

        values = [as_list(v) for v in df["labels"]]
    else:
        values = [
            None if (v is None or (isinstance(v, float) and np.isnan(v)) or v == "") else str(v) for v in df["label"]
        ]
    out = {}
    for p, v in zip(df["path"].astype(str), values):
        if v is None:
            continue
        if p in out and out[p] != v:
            raise BadInput(f"--labels {path} gives {p!r} two labels ({out[p]!r} and {v!r}); keep one row per path")
        out[p] = v
    if not out:
        raise BadInput(f"--labels {path} holds no labelled row")
    return out


def cached_features(
    folder: Path, config: ExtractConfig, cache_dir, progress: bool, log
) -> tuple[Path, set[str], list[dict]]:
    """Features of an image folder through `featx evaluate`'s cache: extracted once, resumed, reused.

    Returns the feature file, the paths the folder holds now, and its failed images.
    """
    from featx.evaluate.cache import cached_features as evaluate_cache
    from featx.extract.discover import discover

    folder = folder.resolve()
    key = hashlib.blake2b(str(folder).encode(), digest_size=4).hexdigest()
    name = f"probe-{re.sub(r'[^A-Za-z0-9_.-]+', '-', folder.name) or 'root'}-{key}"
    # Keyed by settings and the folder's files (paths, sizes, mtimes), in the per-user cache.
    out = evaluate_cache([folder], config, name=name, cache_dir=cache_dir, progress=progress, log=log).file
    now = {item.path for item in discover([folder])}
    errors = []
    if store.errors_path(out).exists():
        errors = [e for e in pq.read_table(store.errors_path(out)).to_pylist() if e["path"] in now]
    return out, now, errors


def empty_folders(root: Path) -> list[dict]:
    """Class folders without a single file in them, as rows of the errors table."""
    from featx.extract.discover import discover

    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            has_images = bool(discover([sub]))
        except BadInput:
            has_images = False
        if not has_images:
            found.append(
                {
                    "path": f"{sub.name}/",
                    "stage": "discover",
                    "error": "EmptyFolder",
                    "message": "no image in this class folder",
                }
            )
    return found


# -- protocol -------------------------------------------------------------------------------


def check_classes(data: Labelled, protocol: Protocol) -> Labelled:
    """Refuse (or, with drop_small_classes, drop) classes with too few images for the protocol."""
    if data.multi_label:
        if protocol.train_per_class is not None:
            raise BadInput("--train-per-class needs one label per image; multi-label data uses --test-size")
        if len(data.paths) < 3:
            raise BadInput(f"{len(data.paths)} labelled images; a probe needs at least 3 (2 to train, 1 to test)")
        positives = (data.y > 0).sum(axis=0)
        small = [(c, int(n)) for c, n in zip(data.classes, positives) if n < 2]
        if small and not protocol.drop_small_classes:
            raise BadInput(
                f"{len(small)} labels have fewer than 2 images: {_listed(small)}; add images, or pass "
                "--drop-small-classes to probe without them"
            )
        keep = positives >= 2
        if small:
            data.notes.append(f"left out {len(small)} labels with fewer than 2 images: {_listed(small)}")
        data.y, data.classes = data.y[:, keep], tuple(c for c, k in zip(data.classes, keep) if k)
        if not data.classes:
            raise BadInput("no label has 2 or more images; nothing to probe")
        return data
    need = protocol.min_images()
    counts = np.bincount(data.y, minlength=len(data.classes))
    small = [(c, int(n)) for c, n in zip(data.classes, counts) if n < need]
    why = (
        f"--train-per-class {protocol.train_per_class} needs {protocol.train_per_class} to train and 1 to test"
        if protocol.train_per_class is not None
        else "2 to train (one held out to choose C) and 1 to test"
    )
    if small:
        if not protocol.drop_small_classes:
            raise BadInput(
                f"{len(small)} classes have fewer than {need} images ({why}): {_listed(small)}; add images"
                + (", lower --train-per-class" if protocol.train_per_class else "")
                + ", or pass --drop-small-classes to probe without them"
            )
        data.notes.append(f"left out {len(small)} classes with fewer than {need} images: {_listed(small)}")
        kept = [i for i, n in enumerate(counts) if n >= need]
        rows = np.isin(data.y, kept)
        remap = -np.ones(len(data.classes), np.int64)
        remap[kept] = np.arange(len(kept))
        data.paths, data.X, data.y = data.paths[rows], data.X[rows], remap[data.y[rows]]
        data.classes = tuple(data.classes[i] for i in kept)
    if len(data.classes) < 2:
        raise BadInput(
            f"{len(data.classes)} class left ({', '.join(data.classes) or 'none'}); a probe needs at least 2"
        )
    return data


def make_splits(data: Labelled, protocol: Protocol) -> list[Split]:
    """Seeded splits: K per class for training (few-shot), or a stratified test fraction."""
    if protocol.train_per_class is not None:
        return caltech_splits(
            data.y,
            n_train=protocol.train_per_class,
            n_test=None,
            splits=protocol.splits,
            seed=protocol.seed,
            classes=data.classes,
        )
    result = []
    n = len(data.paths)
    for s in split_seeds(protocol.splits, protocol.seed):
        rng = np.random.default_rng(s)
        if data.multi_label:
            k = min(max(round(protocol.test_size * n), 1), n - 2)
            test = np.sort(rng.permutation(n)[:k])
        else:
            parts = []
            for c in range(len(data.classes)):
                rows = rng.permutation(np.flatnonzero(data.y == c))
                # At least one test image, and two left to train (one to hold out for C).
                k = min(max(round(protocol.test_size * len(rows)), 1), len(rows) - 2)
                parts.append(rows[:k])
            test = np.sort(np.concatenate(parts))
        result.append(Split(s, np.setdiff1d(np.arange(n), test), test))
    return result


def run_protocol(data: Labelled, protocol: Protocol, *, jobs: int | None = None) -> ProbeResult:
    """Fit and score every split; the report holds means ± std over splits and per-class values."""
    from featx.evaluate.heads import span_coordinates

    data = check_classes(data, protocol)
    splits = make_splits(data, protocol)
    Cs = protocol.Cs
    if protocol.train_per_class == 1 and not data.multi_label and len(Cs) > 1:
        Cs = (1.0,)
        data.notes.append("C fixed at 1: one training image per class leaves none to choose C on")
    n_classes = len(data.classes)
    records, frames = [], []
    confusion = None if data.multi_label else np.zeros((n_classes, n_classes), np.int64)
    for split in splits:
        base = (
            OneVsRest(protocol.head, random_state=split.seed)
            if data.multi_label
            else make_head(protocol.head, random_state=split.seed)
        )
        est = HeldOutC(
            base,
            Cs=Cs,
            holdout=protocol.holdout,
            scoring="voc_ap" if data.multi_label else "mean_class_recall",
            random_state=split.seed,
            n_jobs=jobs,
        )
        X_train, X_test = span_coordinates(data.X[split.train], data.X[split.test])
        y_train, y_test = data.y[split.train], data.y[split.test]
        est.fit(X_train, y_train)
        S = np.asarray(est.decision_function(X_test), dtype=np.float64)
        record = {
            "seed": split.seed,
            "n_train": len(split.train),
            "n_test": len(split.test),
            "C": est.C_,
            "holdout_scores": {f"{c:g}": round(100 * v, 4) for c, v in est.scores_.items()},
        }
        if data.multi_label:
            record.update(multi_label_scores(y_test, S, data.classes))
            frames.append(
                pd.DataFrame(
                    {
                        "path": data.paths[split.test],
                        "split": split.seed,
                        "label": [[c for c, v in zip(data.classes, row) if v > 0] for row in y_test],
                        "predicted": [[c for c, v in zip(data.classes, row) if v > 0] for row in S],
                        "score": [row.astype(np.float32) for row in S],
                    }
                )
            )
        else:
            S = _full_scores(S, est.classes_, n_classes)
            pred = np.argmax(S, axis=1)
            record.update(single_label_scores(y_test, pred, S, data.classes))
            np.add.at(confusion, (y_test, pred), 1)
            frame = pd.DataFrame(
                {
                    "path": data.paths[split.test],
                    "split": split.seed,
                    "label": np.asarray(data.classes, dtype=object)[y_test],
                    "predicted": np.asarray(data.classes, dtype=object)[pred],
                    "score": S[np.arange(len(pred)), pred].astype(np.float32),
                }
            )
            if n_classes > TOP_K:
                top = np.argsort(-S, axis=1, kind="stable")[:, :TOP_K]
                frame["top5"] = [list(np.asarray(data.classes, dtype=object)[t]) for t in top]
            frames.append(frame)
        records.append(record)
    predictions = pd.concat(frames, ignore_index=True)
    report = _report(data, protocol, records)
    if confusion is not None:
        report["confusion"] = {"classes": list(data.classes), "counts": confusion.tolist()}
    return ProbeResult(report, predictions, confusion)


def _full_scores(S: np.ndarray, fitted: np.ndarray, n_classes: int) -> np.ndarray:
    """Decision scores as [n, classes]: binary heads give one column (the second class's score)."""
    if S.ndim == 1:
        S = np.column_stack([-S, S])
    full = np.full((S.shape[0], n_classes), -np.inf)
    full[:, np.asarray(fitted, dtype=np.int64)] = S
    return full


def single_label_scores(y: np.ndarray, pred: np.ndarray, S: np.ndarray, classes: tuple[str, ...]) -> dict:
    """accuracy, mean class recall, top-5 accuracy (more than 5 classes), per-class recall and precision; percent."""
    out = {"accuracy": 100 * float(np.mean(pred == y)), "mean_class_recall": 100 * mean_class_recall(y, pred)}
    if len(classes) > TOP_K:
        top = np.argsort(-S, axis=1, kind="stable")[:, :TOP_K]
        out["top5_accuracy"] = 100 * float(np.mean((top == y[:, None]).any(axis=1)))
    per_class = {}
    for c, name in enumerate(classes):
        tested, predicted = y == c, pred == c
        per_class[name] = {
            "n_test": int(tested.sum()),
            "recall": 100 * float(np.mean(pred[tested] == c)) if tested.any() else None,
            # Undefined when the class was never predicted (not 0: nothing was claimed).
            "precision": 100 * float(np.mean(y[predicted] == c)) if predicted.any() else None,
        }
    out["per_class"] = per_class
    return out


def multi_label_scores(Y: np.ndarray, S: np.ndarray, classes: tuple[str, ...]) -> dict:
    """AP per class (the area under the interpolated PR curve) and their mean; percent."""
    aps = [voc_ap(Y[:, k], S[:, k]) for k in range(len(classes))]
    defined = [a for a in aps if not np.isnan(a)]
    return {
        "mAP": 100 * float(np.mean(defined)) if defined else None,
        "per_class": {
            c: {"n_test": int((Y[:, k] > 0).sum()), "ap": None if np.isnan(a) else 100 * float(a)}
            for k, (c, a) in enumerate(zip(classes, aps))
        },
    }


def _report(data: Labelled, protocol: Protocol, records: list[dict]) -> dict:
    metrics = (
        ["mAP"]
        if data.multi_label
        else ["accuracy", "mean_class_recall"] + (["top5_accuracy"] if len(data.classes) > TOP_K else [])
    )
    summary = {m: _mean_std([r[m] for r in records]) for m in metrics}
    keys = ["ap"] if data.multi_label else ["recall", "precision"]
    per_class = {}
    for c in data.classes:
        per_class[c] = {k: _mean_std([r["per_class"][c][k] for r in records])["mean"] for k in keys}
        per_class[c]["n_test"] = int(sum(r["per_class"][c]["n_test"] for r in records))
    prov = data.provenance
    w = prov.get("weights", {})
    weights = {"random": f"random (seed {w.get('seed')})", "file": f"file {w.get('file')}"}.get(
        w.get("kind"), w.get("name")
    )
    return {
        "source": data.file,
        "task": "multi-label" if data.multi_label else "single-label",
        "classes": list(data.classes),
        "n_images": len(data.paths),
        "protocol": protocol.to_dict(),
        "metrics": summary,
        "per_class": per_class,
        "splits": records,
        "features": {
            "file": data.file,
            "settings_hash": prov.get("settings_hash"),
            "descriptor": prov.get("descriptor"),
            "model": prov.get("model"),
            "weights": weights,
            "dim": int(data.X.shape[1]),
        },
        "errors": data.errors,
        "notes": data.notes,
        "featx_version": __version__,
    }


def _mean_std(values) -> dict:
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None}
    # Sample std over the splits (ddof=1), as `featx evaluate`; undefined for one split.
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else None}


def _listed(pairs: list[tuple[str, int]], n: int = 8) -> str:
    shown = ", ".join(f"{c} ({k})" for c, k in pairs[:n])
    return shown + (f" and {len(pairs) - n} more" if len(pairs) > n else "")


# -- output ---------------------------------------------------------------------------------

METRIC_NAMES = {
    "accuracy": "accuracy",
    "mean_class_recall": "mean class recall",
    "top5_accuracy": "top-5 accuracy",
    "mAP": "mAP (area AP)",
}


def print_report(result: ProbeResult, console=None, max_classes: int = 30) -> None:
    """The summary and per-class tables, and the errors table when images failed."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r = result.report
    proto = r["protocol"]
    how = (
        f"{proto['train_per_class']} training images per class"
        if proto["train_per_class"]
        else f"{100 * proto['test_size']:.0f}% of each class tested"
    )
    t = Table(
        title=f"probe: {len(r['classes'])} classes, {r['n_images']} images, {proto['splits']} "
        f"split{'s' if proto['splits'] != 1 else ''} ({how}), {proto['head']} head",
        title_justify="left",
    )
    t.add_column("metric")
    t.add_column("%", justify="right")
    t.add_column("per split", justify="right")
    for m, v in r["metrics"].items():
        t.add_row(METRIC_NAMES[m], _pm(v), ", ".join(_f(s[m]) for s in r["splits"]))
    captions = [f"features: {r['features']['descriptor']}; weights {r['features']['weights']}"]
    if str(r["features"]["weights"]).startswith("random"):
        captions[0] += " (a random net: near chance on natural images)"
    captions.append("C per split: " + ", ".join(f"{s['C']:g}" for s in r["splits"]))
    captions += r["notes"]
    t.caption = "\n".join(f"• {c}" for c in captions)
    t.caption_justify = "left"
    console.print(t)

    pc = Table(title="per class (mean over splits)", title_justify="left")
    pc.add_column("class")
    keys = ["ap"] if r["task"] == "multi-label" else ["recall", "precision"]
    for k in keys:
        pc.add_column(k if k != "ap" else "AP", justify="right")
    pc.add_column("tested", justify="right")
    items = sorted(r["per_class"].items(), key=lambda kv: (_sortable(kv[1][keys[0]]), kv[0]))
    if len(items) > max_classes:
        half = max_classes // 2
        items = [*items[:half], None, *items[-half:]]
    for item in items:
        if item is None:
            pc.add_row("…", *[""] * (len(keys) + 1))
            continue
        c, v = item
        pc.add_row(c, *[_f(v[k]) for k in keys], str(v["n_test"]))
    console.print(pc)
    if r["errors"]:
        et = Table(title=f"{len(r['errors'])} images or folders left out", title_justify="left")
        for col in ("path", "stage", "error", "message"):
            et.add_column(col)
        for e in r["errors"][:20]:
            et.add_row(*(str(e.get(col, "")) for col in ("path", "stage", "error", "message")))
        console.print(et)


def _pm(v: dict) -> str:
    if v["mean"] is None:
        return "-"
    return f"{v['mean']:.1f} ± {v['std']:.1f}" if v["std"] is not None else f"{v['mean']:.1f}"


def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _sortable(x) -> float:
    return -1.0 if x is None else float(x)


def check_output_path(path: str | Path, suffix: str, option: str) -> Path:
    """Refuse an output path that cannot be written, before any work is done."""
    path = Path(path).expanduser()
    if path.suffix.lower() != suffix:
        raise BadInput(f"{option} {path} must end in {suffix}; e.g. {option} out/probe{suffix}")
    if not path.parent.is_dir():
        raise MissingData(f"{option} {path}: folder {path.parent} does not exist; create it first")
    return path


def write_predictions(result: ProbeResult, path: str | Path) -> Path:
    """One row per test image per split: path, split, label, predicted, score (and top5)."""
    path = check_output_path(path, ".parquet", "--predictions")
    table = pa.Table.from_pandas(result.predictions, preserve_index=False)
    meta = {b"featx_probe": json.dumps({"classes": result.report["classes"], "task": result.report["task"]})}
    store.write_atomic(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), path)
    return path


def write_report(result: ProbeResult, path: str | Path) -> list[Path]:
    """The JSON report, and beside it the confusion matrix and the per-class bars as PNG."""
    path = check_output_path(path, ".json", "--report")
    path.write_text(json.dumps(_json_ready(result.report), indent=2, allow_nan=False) + "\n")
    written = [path]
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (and none on a server)
    if result.confusion is not None:
        written.append(plot_confusion(result, path.with_name(f"{path.stem}-confusion.png")))
    written.append(plot_per_class(result, path.with_name(f"{path.stem}-per-class.png")))
    return written


def _json_ready(obj):
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def plot_confusion(result: ProbeResult, out: Path) -> Path:
    """The confusion matrix summed over splits, each true class's row normalised to 100%."""
    import matplotlib.pyplot as plt

    classes = result.report["classes"]
    counts = result.confusion.astype(np.float64)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    # Cells and names grow with the class count so that ~100 names stay legible (>= 6 pt).
    side = min(max(5.0, 0.17 * n + 2.5), 22.0)
    font = 8 if n <= 30 else 6.5 if n <= 70 else 6
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(100 * rows, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(np.arange(n), classes, rotation=90, fontsize=font)
    ax.set_yticks(np.arange(n), classes, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{100 * rows[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    r = result.report
    acc = r["metrics"]["accuracy"]["mean"]
    ax.set_title(
        f"confusion, % of each true class, summed over {len(r['splits'])} split(s)\n"
        f"accuracy {acc:.1f}% — weights {r['features']['weights']}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, shrink=0.4, label="% of the true class")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_per_class(result: ProbeResult, out: Path) -> Path:
    """Recall and precision (or AP) per class, mean over splits, worst first."""
    import matplotlib.pyplot as plt

    r = result.report
    keys = ["ap"] if r["task"] == "multi-label" else ["recall", "precision"]
    classes = sorted(r["classes"], key=lambda c: (_sortable(r["per_class"][c][keys[0]]), c))
    n = len(classes)
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.2 * n * len(keys) / 1.5 + 1.4)))
    y = np.arange(n)
    h = 0.8 / len(keys)
    colors = {"recall": "#4477aa", "precision": "#66ccee", "ap": "#4477aa"}
    for i, k in enumerate(keys):
        vals = [r["per_class"][c][k] for c in classes]
        ax.barh(
            y + (i - (len(keys) - 1) / 2) * h,
            [np.nan if v is None else v for v in vals],
            h,
            color=colors[k],
            label=k if k != "ap" else "AP",
        )
    ax.set_yticks(y, classes, fontsize=8 if n <= 40 else 6)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("%, mean over splits")
    main = "mAP" if r["task"] == "multi-label" else "mean_class_recall"
    ax.axvline(
        r["metrics"][main]["mean"] or 0,
        color="#cc3311",
        lw=1,
        label=f"{METRIC_NAMES[main]} {r['metrics'][main]['mean'] or 0:.1f}%",
    )
    # Above the axes: bars reach 100, so a legend inside would hide some.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"per class — weights {r['features']['weights']}", fontsize=9)
    ax.margins(y=0.01)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
