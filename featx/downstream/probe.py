"""`featx probe`: how well do the features transfer to your own labelled images?

The paper's protocol (Simonyan & Zisserman, arXiv 1409.1556, Appendix B) applied to any
folder, through the runner `featx evaluate` uses (featx.evaluate.protocol): seeded splits, a
linear head on the L2-normalised descriptors with C chosen on a held-out part of the training
images only, then refit; mean ± std over the splits. The result is a JSON-ready report (values
in percent) and one predictions row per test image per split, from which every number of the
report can be recomputed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from featx import __version__
from featx.downstream.labelled import Labelled, load_labelled
from featx.errors import BadInput, option
from featx.evaluate.protocol import (
    TOP_K,
    Head,
    Outcome,
    Protocol,
    ap_record,
    class_record,
    draw_splits,
    mean_std,
    run_protocol,
    top_k,
)
from featx.evaluate.rows import StoredRows, piece_rows
from featx.evaluate.splits import Split
from featx.extract.config import ExtractConfig
from featx.store.text import weights_text


@dataclass
class ProbeResult:
    """The report (JSON-ready, percent), the predictions table and the summed confusion counts."""

    report: dict
    predictions: pd.DataFrame
    confusion: np.ndarray | None = None


def probe(
    source: str | Path,
    config: ExtractConfig | None = None,
    protocol: Protocol | None = None,
    *,
    head: Head | str | None = None,
    labels: str | Path | None = None,
    cache_dir: str | Path | None = None,
    jobs: int | None = None,
    progress: bool = False,
    log=None,
    **settings,
) -> ProbeResult:
    """How well the descriptors separate the classes of `source` (arXiv 1409.1556, Appendix B protocol).

    `source` is an image folder (labels: its subfolders, or `labels`) described with `config`
    through the cached, resumable extraction of `featx evaluate`, or a feature file/folder from
    `featx extract`. `protocol` says how to split (its `seed` seeds the splits; the config's,
    random weights) and `head` which classifier and solver (a Head, or its name). Single settings
    may be given as keywords instead: the protocol's (splits, test_size, train_per_class,
    holdout, seed, drop_small_classes), the head's (Cs, solver) and the config's (model,
    weights, ...; `weights_seed` for the config's seed), e.g.
    `featx.probe("features.parquet", splits=5, solver="scalable")`.
    """
    config, protocol, head = _with_keywords(config, protocol, head, settings)
    data = load_labelled(
        source, config, labels=labels, cache_dir=cache_dir, progress=progress, log=log, solver=head.solver
    )
    return run_probe(data, protocol, head, jobs=jobs)


# The keyword names of single settings: the protocol's, the head's, the extraction config's.
_PROTOCOL_KEYWORDS = {
    "splits": "splits",
    "test_size": "test_size",
    "train_per_class": "n_train",
    "holdout": "holdout",
    "seed": "seed",
    "drop_small_classes": "drop_small_classes",
}
_CONFIG_KEYWORDS = {("weights_seed" if f.name == "seed" else f.name): f.name for f in dataclasses.fields(ExtractConfig)}


def _with_keywords(config, protocol, head, keywords: dict) -> tuple[ExtractConfig | None, Protocol, Head]:
    """The config, protocol and head with the single settings given as keywords applied."""
    by_kind: dict[str, dict] = {"protocol": {}, "head": {}, "config": {}}
    for key, value in keywords.items():
        if key in _PROTOCOL_KEYWORDS:
            by_kind["protocol"][_PROTOCOL_KEYWORDS[key]] = value
        elif key == "Cs":
            by_kind["head"]["C"] = value
        elif key == "solver":
            by_kind["head"]["solver"] = value
        elif key in _CONFIG_KEYWORDS:
            by_kind["config"][_CONFIG_KEYWORDS[key]] = value
        else:
            raise BadInput(
                f"probe() got an unknown setting {key!r}; protocol settings are {', '.join(_PROTOCOL_KEYWORDS)}, "
                f"Cs, solver; extraction settings are {', '.join(_CONFIG_KEYWORDS)}"
            )
    protocol = dataclasses.replace(protocol or Protocol(), **by_kind["protocol"])
    head = Head(head) if isinstance(head, str) else head or Head()
    head = dataclasses.replace(head, **by_kind["head"])
    if by_kind["config"]:
        config = (config or ExtractConfig()).replace(**by_kind["config"])
    return config, protocol, head


def run_probe(data: Labelled, protocol: Protocol | None = None, head: Head | None = None, *, jobs=None) -> ProbeResult:
    """Fit and score every split; the report holds means ± std over splits and per-class values.

    C is chosen by the task's metric: mean class recall (single-label) or area AP (multi-label).
    """
    metric = "voc_ap" if data.multi_label else "mean_class_recall"
    protocol = dataclasses.replace(protocol or Protocol(), metric=metric)
    head = head or Head()
    data = check_classes(data, protocol)
    splits = make_splits(data, protocol)
    grid = head
    if protocol.n_train == 1 and not data.multi_label and len(head.C) > 1:
        grid = dataclasses.replace(head, C=(1.0,))
        data.notes.append("C fixed at 1: one training image per class leaves none to choose C on")
    outcomes = run_protocol(data.X, data.y, splits, protocol, grid, len(data.classes), jobs=jobs)
    records = [outcome.fit | split_scores(outcome, data.classes) for outcome in outcomes]
    predictions = pd.concat([_predictions(data, outcome) for outcome in outcomes], ignore_index=True)
    report = _report(data, protocol, head, records)
    confusion = None
    if not data.multi_label:
        n = len(data.classes)
        confusion = np.zeros((n, n), np.int64)
        for outcome in outcomes:
            np.add.at(confusion, (outcome.truth, outcome.predicted), 1)
        report["confusion"] = {"classes": list(data.classes), "counts": confusion.tolist()}
    return ProbeResult(report, predictions, confusion)


def check_classes(data: Labelled, protocol: Protocol) -> Labelled:
    """Refuse (or, with drop_small_classes, drop) classes with too few images for the protocol."""
    if data.multi_label:
        if protocol.n_train is not None:
            raise BadInput("--train-per-class needs one label per image; multi-label data uses --test-size")
        if len(data.paths) < 3:
            raise BadInput(f"{len(data.paths)} labelled images; a probe needs at least 3 (2 to train, 1 to test)")
        positives = (data.y > 0).sum(axis=0)
        small = [(c, int(n)) for c, n in zip(data.classes, positives) if n < 2]
        if small and not protocol.drop_small_classes:
            raise BadInput(
                f"{len(small)} labels have fewer than 2 images: {_listed(small)}; add images, or pass "
                f"{option('drop-small-classes')} to probe without them"
            )
        keep = positives >= 2
        if small:
            data.notes.append(f"left out {len(small)} labels with fewer than 2 images: {_listed(small)}")
        data.y, data.classes = data.y[:, keep], tuple(c for c, k in zip(data.classes, keep) if k)
        if not data.classes:
            raise BadInput("no label has 2 or more images; nothing to probe")
        return data
    # K to train and one to test, or two to train (one held out for C) and one to test.
    need = protocol.n_train + 1 if protocol.n_train is not None else 3
    counts = np.bincount(data.y, minlength=len(data.classes))
    small = [(c, int(n)) for c, n in zip(data.classes, counts) if n < need]
    why = (
        f"--train-per-class {protocol.n_train} needs {protocol.n_train} to train and 1 to test"
        if protocol.n_train is not None
        else "2 to train (one held out to choose C) and 1 to test"
    )
    if small:
        if not protocol.drop_small_classes:
            raise BadInput(
                f"{len(small)} classes have fewer than {need} images ({why}): {_listed(small)}; add images"
                + (", lower --train-per-class" if protocol.n_train else "")
                + f", or pass {option('drop-small-classes')} to probe without them"
            )
        data.notes.append(f"left out {len(small)} classes with fewer than {need} images: {_listed(small)}")
        kept = [i for i, n in enumerate(counts) if n >= need]
        rows = np.flatnonzero(np.isin(data.y, kept))
        remap = -np.ones(len(data.classes), np.int64)
        remap[kept] = np.arange(len(kept))
        data.paths, data.X, data.y = data.paths[rows], keep_rows(data.X, rows), remap[data.y[rows]]
        data.classes = tuple(data.classes[i] for i in kept)
    if len(data.classes) < 2:
        raise BadInput(
            f"{len(data.classes)} class left ({', '.join(data.classes) or 'none'}); a probe needs at least 2"
        )
    return data


def make_splits(data: Labelled, protocol: Protocol) -> list[Split]:
    """Seeded splits: K per class for training (few-shot), or a stratified test fraction."""
    return draw_splits(protocol, data.y, classes=data.classes)


def split_scores(outcome: Outcome, classes: tuple[str, ...]) -> dict:
    """What one split measured, percent. Single-label: accuracy, mean class recall, top-5,
    recall and precision per class. Multi-label: AP per class (the area under the interpolated
    PR curve) with its test positives, and their mean."""
    if outcome.truth.ndim == 1:
        return class_record(outcome, classes)
    aps = ap_record(outcome, classes)
    positives = (outcome.truth > 0).sum(axis=0)
    return {
        "mAP": None if np.isnan(aps["area_mAP"]) else aps["area_mAP"],
        "per_class": {c: {"n_test": int(n), "ap": aps["per_class"][c]["area_ap"]} for c, n in zip(classes, positives)},
    }


def _predictions(data: Labelled, outcome: Outcome) -> pd.DataFrame:
    """One row per test image: path, split, label, predicted, score (and top5, more than 5 classes)."""
    test, S, truth = outcome.split.test, outcome.scores, outcome.truth
    names = np.asarray(data.classes, dtype=object)
    if data.multi_label:
        return pd.DataFrame(
            {
                "path": data.paths[test],
                "split": outcome.split.seed,
                "label": [[c for c, v in zip(data.classes, row) if v > 0] for row in truth],
                "predicted": [[c for c, v in zip(data.classes, row) if v > 0] for row in S],
                "score": [row.astype(np.float32) for row in S],
            }
        )
    pred = outcome.predicted
    frame = pd.DataFrame(
        {
            "path": data.paths[test],
            "split": outcome.split.seed,
            "label": names[truth],
            "predicted": names[pred],
            "score": S[np.arange(len(pred)), pred].astype(np.float32),
        }
    )
    if len(data.classes) > TOP_K:
        frame["top5"] = [list(names[t]) for t in top_k(S)]
    return frame


def _report(data: Labelled, protocol: Protocol, head: Head, records: list[dict]) -> dict:
    metrics = (
        ["mAP"]
        if data.multi_label
        else ["accuracy", "mean_class_recall"] + (["top5_accuracy"] if len(data.classes) > TOP_K else [])
    )
    summary = {m: mean_std([r[m] for r in records]) for m in metrics}
    keys = ["ap"] if data.multi_label else ["recall", "precision"]
    per_class = {}
    for c in data.classes:
        per_class[c] = {k: mean_std([r["per_class"][c][k] for r in records])["mean"] for k in keys}
        per_class[c]["n_test"] = int(sum(r["per_class"][c]["n_test"] for r in records))
    prov = data.provenance
    return {
        "source": data.file,
        "task": "multi-label" if data.multi_label else "single-label",
        "classes": list(data.classes),
        "n_images": len(data.paths),
        "protocol": {
            "splits": protocol.splits,
            "test_size": None if protocol.n_train is not None else protocol.test_size,
            "train_per_class": protocol.n_train,
            "head": head.name,
            "Cs": list(head.C),
            "solver": head.solver,
            "holdout": protocol.holdout,
            "seed": protocol.seed,
            "drop_small_classes": protocol.drop_small_classes,
        },
        "metrics": summary,
        "per_class": per_class,
        "splits": records,
        "features": {
            "file": data.file,
            "settings_hash": prov.get("settings_hash"),
            "descriptor": prov.get("descriptor"),
            "model": prov.get("model"),
            "weights": weights_text(prov),
            "dim": int(data.X.shape[1]),
        },
        "errors": data.errors,
        "notes": data.notes,
        "featx_version": __version__,
    }


def keep_rows(X, rows: np.ndarray):
    """Rows `rows` (increasing) of the features: a matrix compacted in place, a piece at a time
    (no second copy of it), or stored rows renumbered."""
    if isinstance(X, StoredRows):
        return X.take(rows)
    step = piece_rows(X.shape[1])
    for start in range(0, len(rows), step):
        # Each row moves to a lower or equal place, so a piece never overwrites rows still to move.
        piece = rows[start : start + step]
        X[start : start + len(piece)] = X[piece]
    return X[: len(rows)]


def _listed(pairs: list[tuple[str, int]], n: int = 8) -> str:
    shown = ", ".join(f"{c} ({k})" for c, k in pairs[:n])
    return shown + (f" and {len(pairs) - n} more" if len(pairs) > n else "")
