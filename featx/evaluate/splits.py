"""Seeded train/test splits of the paper's protocols, and the held-out part used to choose C.

Simonyan & Zisserman, arXiv 1409.1556, Appendix B: Caltech-101 uses random splits of 30
training and up to 50 test images per class, Caltech-256 60 training images per class and the
rest for test; VOC uses its fixed image sets. In every split part of the training images is
held out to choose the SVM's C, which is then refit on all training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featx.errors import BadInput


@dataclass(frozen=True, eq=False)
class Split:
    """Row indices of one train/test split and the seed that drew it."""

    seed: int
    train: np.ndarray
    test: np.ndarray


def split_seeds(splits: int, seed: int) -> list[int]:
    """Split i is drawn with seed + i, so a run of 3 splits extends a run of 1."""
    if splits < 1:
        raise BadInput(f"--splits {splits} must be at least 1")
    return [seed + i for i in range(splits)]


def caltech_splits(
    labels: np.ndarray,
    *,
    n_train: int,
    n_test: int | None,
    splits: int,
    seed: int,
    classes: tuple[str, ...] | None = None,
) -> list[Split]:
    """Per class, `n_train` random training images and up to `n_test` of the rest for test.

    Paper: Appendix B (Caltech-101: 30 / up to 50; Caltech-256: 60 / the rest). `n_test=None`
    takes all the rest. Every class needs n_train + 1 images; a smaller class is an error
    rather than a silently different protocol.
    """
    labels = np.asarray(labels)
    if n_train < 1:
        raise BadInput(f"n_train {n_train} must be at least 1 image per class")
    if n_test is not None and n_test < 1:
        raise BadInput(f"n_test {n_test} must be at least 1 image per class (or omitted: all the rest)")
    values, counts = np.unique(labels, return_counts=True)
    small = [(v, c) for v, c in zip(values, counts) if c < n_train + 1]
    if small:
        name = (lambda v: classes[v]) if classes is not None else (lambda v: v)
        shown = ", ".join(f"{name(v)} ({c})" for v, c in small[:5])
        raise BadInput(
            f"{len(small)} classes have fewer than n_train + 1 = {n_train + 1} images: {shown}"
            f"{' ...' if len(small) > 5 else ''}; use the full dataset, or lower n_train in "
            "the [protocol] of a pipeline file (--pipeline FILE)"
        )
    result = []
    for s in split_seeds(splits, seed):
        rng = np.random.default_rng(s)
        train, test = [], []
        for v in values:
            rows = rng.permutation(np.flatnonzero(labels == v))
            train.append(rows[:n_train])
            test.append(rows[n_train:] if n_test is None else rows[n_train : n_train + n_test])
        result.append(Split(s, np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return result


def fixed_splits(train: np.ndarray, test: np.ndarray, *, splits: int, seed: int) -> list[Split]:
    """The fixed VOC image sets; the seeds then only vary the part held out to choose C."""
    return [Split(s, np.asarray(train), np.asarray(test)) for s in split_seeds(splits, seed)]


def test_fraction_splits(labels: np.ndarray, test_size: float, *, splits: int, seed: int) -> list[Split]:
    """Per class, round(test_size * n) images tested (at least one, and two left to train).

    Two training images per class leave one to hold out for C. Multi-label targets (2-d
    `labels`) are split at random over all rows, keeping two to train.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    result = []
    for s in split_seeds(splits, seed):
        rng = np.random.default_rng(s)
        if labels.ndim == 2:
            k = min(max(round(test_size * n), 1), n - 2)
            test = np.sort(rng.permutation(n)[:k])
        else:
            parts = []
            for c in np.unique(labels):
                rows = rng.permutation(np.flatnonzero(labels == c))
                k = min(max(round(test_size * len(rows)), 1), len(rows) - 2)
                parts.append(rows[:k])
            test = np.sort(np.concatenate(parts))
        result.append(Split(s, np.setdiff1d(np.arange(n), test), test))
    return result


def holdout_split(y: np.ndarray, fraction: float, seed: int, *, stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): `fraction` of the rows held out, per class when `stratify`.

    Per class, round(fraction * n) rows are held out, at least one when the class has two or
    more rows and never all of them, so every class is both fit and scored where it can be.
    Multi-label targets (2-d `y`, VOC) are held out at random over all rows.
    """
    if not 0 < fraction < 1:
        raise BadInput(f"holdout {fraction} must be a fraction between 0 and 1, e.g. 0.2")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    if n < 2:
        raise BadInput(f"cannot hold out part of {n} training rows (n_samples={n}) to choose C; give more images")
    if stratify and y.ndim == 1:
        held = []
        for v in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == v))
            k = min(max(round(fraction * len(rows)), 1), len(rows) - 1)
            held.append(rows[:k])
        val = np.sort(np.concatenate(held))
    else:
        k = min(max(round(fraction * n), 1), n - 1)
        val = np.sort(rng.permutation(n)[:k])
    fit = np.setdiff1d(np.arange(n), val)
    return fit, val
