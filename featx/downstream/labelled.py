"""A user's labelled data for `featx probe`: features (from a feature file, or an image folder
described through the feature cache) with their labels (class folders, or a labels file).

Problems do not stop the probe: failed images and empty class folders are collected as rows of
the errors table, and anything left out is said in a note. Paths and labels are read first; the
features of the rows kept are then read once, row group by row group, into one preallocated
matrix (never the Parquet table and a NumPy copy at once), or left in the file to be streamed
(featx.evaluate.rows.StoredRows) when the matrix would not fit in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from featx import store
from featx.errors import BadInput, MissingData, option
from featx.evaluate.cache import cached_features
from featx.evaluate.rows import StoredRows
from featx.evaluate.solvers import keep_on_disk
from featx.extract.config import ExtractConfig
from featx.extract.discover import discover
from featx.store.read import is_feature_source, read_features_into


@dataclass
class Labelled:
    """Features with their labels: single-label (y: class index) or multi-label (Y: ±1)."""

    paths: np.ndarray
    X: np.ndarray | StoredRows  # float32 [n, D], or the rows left in the feature file (streamed)
    classes: tuple[str, ...]
    y: np.ndarray  # [n] class index, or [n, C] in {1, -1} when multi_label
    multi_label: bool
    provenance: dict
    file: str
    errors: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Rows:
    """The rows of a feature source, sorted by path, before labels are applied: their paths,
    folder labels and row numbers in the file (features are read once labels have chosen rows)."""

    file: Path
    paths: np.ndarray
    stored: np.ndarray
    folder_labels: list[str | None]
    errors: list[dict]
    notes: list[str]


def load_labelled(
    source: str | Path,
    config: ExtractConfig | None = None,
    *,
    labels: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    log=None,
    solver: str = "auto",
) -> Labelled:
    """Features and labels of `source` (image folder or feature file/folder), problems collected.

    An image folder is described with `config` (default: ExtractConfig()) through the cached,
    resumable extraction of `featx evaluate`; a feature source is used as it is. The features
    stay in their file (streamed) where `solver` says so (featx.evaluate.solvers.keep_on_disk).
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise MissingData(f"{source}: no such image folder or feature file")
    if labels is None and source.is_dir() and not is_feature_source(source):
        check_class_folders(source)  # before minutes of extraction
    rows = _rows(source, config, cache_dir=cache_dir, progress=progress, log=log)
    if labels is not None:
        paths, stored, row_labels, multi = _from_labels_file(rows, labels, source)
    else:
        paths, stored, row_labels, multi = _from_class_folders(rows)
    classes, y = _encode(row_labels, multi)
    prov = store.read_provenance(rows.file)
    X = features(rows.file, stored, solver)
    return Labelled(paths, X, classes, y, multi, prov, str(rows.file), rows.errors, rows.notes)


def check_class_folders(folder: Path) -> None:
    """Refuse, before any image is described, a folder whose images are not in 2 or more class folders."""
    items = discover([folder])
    if not items:
        raise BadInput(f"{folder} holds no images; give a folder with one subfolder of images per class")
    classes = sorted({item.label for item in items if item.label is not None})
    if len(classes) >= 2:
        return
    loose = sum(1 for item in items if item.label is None)
    found = f"only one class folder ({classes[0]})" if classes else "no class subfolders"
    raise BadInput(
        f"{folder} has {found}"
        + (f" and {loose} images directly in it" if loose else "")
        + "; a probe needs 2 or more classes: put each class's images in a subfolder of its own "
        f"(e.g. {folder / 'CLASS'}), or label them with {option('labels', 'FILE')}"
    )


def features(file: Path, stored: np.ndarray, solver: str = "auto") -> np.ndarray | StoredRows:
    """The feature rows `stored` (row numbers in the file), in that order: one
    float32 matrix filled row group by row group (rows of NaN or infinity refused as read), or the rows
    left in the file for `solver` to stream."""
    files = store.feature_files(file) if file.is_dir() else [file]
    positions = -np.ones(sum(pq.ParquetFile(f).metadata.num_rows for f in files), np.int64)
    positions[stored] = np.arange(len(stored))
    dim = pq.read_schema(files[0]).field("feature").type.list_size
    if keep_on_disk(solver, len(stored), dim):
        return StoredRows(file, positions, dim)
    return read_features_into(file, np.empty((len(stored), dim), np.float32), positions)


def _rows(source: Path, config: ExtractConfig | None, *, cache_dir, progress: bool, log) -> _Rows:
    errors: list[dict] = []
    notes: list[str] = []
    keep = None
    if is_feature_source(source):
        if config is not None:
            defaults = ExtractConfig()
            ignored = [
                f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(defaults, f.name)
            ]
            if ignored:
                notes.append(
                    f"{source} holds features already: the extraction settings {', '.join(ignored)} are not used"
                )
        file = source
        errors += _failures(store.errors_path(source), notes)
    else:
        if not source.is_dir():
            raise BadInput(f"{source} is neither an image folder nor a .parquet feature file")
        file, keep, failed = folder_features(source, config or ExtractConfig(), cache_dir, progress, log)
        errors += failed
        errors += empty_folders(source)
    table = store.read_table(file, ["path", "label"])
    paths = np.asarray(table.column("path").to_pylist(), dtype=object)
    stored = np.arange(len(paths))
    folder_labels = table.column("label").to_pylist()
    if keep is not None:
        # The cache may hold images that have since left the folder: use the folder as it is.
        mask = np.fromiter((p in keep for p in paths), bool, len(paths))
        paths, stored = paths[mask], stored[mask]
        folder_labels = [label for label, m in zip(folder_labels, mask) if m]
    order = np.argsort(paths, kind="stable")
    return _Rows(file, paths[order], stored[order], [folder_labels[i] for i in order], errors, notes)


def _from_labels_file(rows: _Rows, labels: str | Path, source: Path):
    """(paths, row numbers in the file, labels per row, multi-label?) with the labels of a CSV or
    Parquet file."""
    paths, stored = rows.paths, rows.stored
    given = read_labels(labels)
    multi = isinstance(next(iter(given.values()), ""), list)
    have = np.fromiter((p in given for p in paths), bool, len(paths))
    if not have.any():
        raise BadInput(
            f"--labels {labels} names none of the {len(paths)} images (its first path is "
            f"{next(iter(given), 'none')!r}, the images' {paths[0]!r}); give paths relative to {source}"
        )
    if (~have).sum():
        rows.notes.append(f"{int((~have).sum())} images have no row in {labels} and are left out")
    missing = len(set(given) - set(paths))
    if missing:
        rows.notes.append(f"{missing} paths of {labels} have no features (not found or failed) and are left out")
    paths, stored = paths[have], stored[have]
    return paths, stored, [given[p] for p in paths], multi


def _from_class_folders(rows: _Rows):
    """(paths, row numbers in the file, labels per row, False): each image's class folder, loose
    images left out."""
    paths, stored, row_labels = rows.paths, rows.stored, rows.folder_labels
    unlabelled = sum(1 for label in row_labels if label is None)
    if unlabelled:
        rows.notes.append(
            f"{unlabelled} images are not in a class folder and are left out (use {option('labels', 'FILE')})"
        )
        have = np.array([label is not None for label in row_labels])
        paths, stored = paths[have], stored[have]
        row_labels = [label for label in row_labels if label is not None]
    return paths, stored, row_labels, False


def class_key(name: str) -> tuple[str, str]:
    """The one order of class names, wherever they are listed (classes, tables, plots): by
    name regardless of case ("ant" < "Bee" < "cat"), ties by exact name."""
    return (name.casefold(), name)


def _encode(row_labels: list, multi: bool) -> tuple[tuple[str, ...], np.ndarray]:
    """The sorted class names, and y: a class index per row, or ±1 per row and class (multi-label)."""
    if multi:
        classes = tuple(sorted({c for ls in row_labels for c in ls}, key=class_key))
        position = {c: i for i, c in enumerate(classes)}
        y = -np.ones((len(row_labels), len(classes)), np.int64)
        for i, ls in enumerate(row_labels):
            y[i, [position[c] for c in ls]] = 1
        return classes, y
    classes = tuple(sorted(set(row_labels), key=class_key))
    position = {c: i for i, c in enumerate(classes)}
    return classes, np.array([position[label] for label in row_labels], np.int64)


def read_labels(path: str | Path) -> dict[str, str | list[str]]:
    """path -> label (column `label`) or path -> list of labels (column `labels`: a list, or `a;b` in CSV)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingData(f"--labels {path}: no such file; give a CSV or Parquet file with columns path,label")
    if path.suffix.lower() not in (".parquet", ".csv", ".tsv", ".txt"):
        raise BadInput(f"--labels {path} must be .csv or .parquet, with columns path,label (or path,labels)")
    try:
        if path.suffix.lower() == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except (ValueError, pa.ArrowException, OSError) as e:  # pandas and pyarrow say "unreadable" so
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the OS speaking about the file (permission, ...): said as such
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"--labels {path} is not a readable {path.suffix[1:].upper()} table ({why}); "
            "give one with columns path,label (or path,labels)"
        ) from None
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


def _failures(error_file: Path, notes: list[str]) -> list[dict]:
    """The rows of a feature file's errors table; a damaged one is said in a note, not fatal."""
    if not error_file.exists():
        return []
    try:
        return pq.read_table(error_file).to_pylist()
    except (OSError, pa.ArrowException) as e:
        notes.append(f"{error_file} is unreadable ({e}), so failed images are not listed; delete it")
        return []


def folder_features(
    folder: Path, config: ExtractConfig, cache_dir, progress: bool, log
) -> tuple[Path, set[str], list[dict]]:
    """Features of an image folder through `featx evaluate`'s cache: extracted once, resumed, reused.

    Returns the feature file, the paths the folder holds now, and its failed images.
    """
    folder = folder.resolve()
    key = hashlib.blake2b(str(folder).encode(), digest_size=4).hexdigest()
    name = f"probe-{re.sub(r'[^A-Za-z0-9_.-]+', '-', folder.name) or 'root'}-{key}"
    # Keyed by settings and the folder's files (paths, sizes, mtimes), in the per-user cache.
    out = cached_features([folder], config, name=name, cache_dir=cache_dir, progress=progress, log=log).file
    now = {item.path for item in discover([folder])}
    notes: list[str] = []
    errors = [e for e in _failures(store.errors_path(out), notes) if e.get("path") in now]
    for note in notes:
        (log or (lambda message: None))(f"warning: {note}")
    return out, now, errors


def empty_folders(root: Path) -> list[dict]:
    """Class folders without a single image in them, as rows of the errors table."""
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
