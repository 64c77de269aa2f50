"""The paper's transfer metrics: mean class recall (Caltech) and average precision (VOC).

Simonyan & Zisserman, arXiv 1409.1556, Appendix B: Caltech results are mean class recall,
VOC results are mean AP over the 20 classes. The AP functions follow the PASCAL VOC devkit
(VOCevalcls.m): ``voc07_ap`` is the 11-point interpolated AP used up to VOC2009 (so for
VOC2007), ``voc_ap`` the area under the interpolated curve used from VOC2010 on.
All functions return fractions in [0, 1]; the report multiplies by 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Devkit ground truth: 1 = positive, -1 = negative, 0 = only "difficult" objects (ignored).
VOC_LABELS = (1, -1, 0)


def mean_class_recall(y_true: Sequence, y_pred: Sequence) -> float:
    """Recall of each class present in `y_true`, averaged over classes (Appendix B, Caltech)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be 1-d and of equal length")
    if y_true.size == 0:
        raise ValueError("mean_class_recall of no samples is undefined; pass at least one")
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def precision_recall(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every rank of the scores, as the VOC devkit computes them."""
    labels, scores = _check_voc(labels, scores)
    # A stable sort keeps equal scores in input order, as MATLAB's sort in the devkit does.
    order = np.argsort(-scores, kind="stable")
    ranked = labels[order]
    # Difficult-only images (0) stay in the ranking but count as neither hit nor false alarm.
    tp = np.cumsum(ranked > 0)
    fp = np.cumsum(ranked < 0)
    n_pos = int(np.sum(labels > 0))
    recall = tp / n_pos if n_pos else np.full(tp.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
    # Ranks that hold only difficult images so far have no precision yet; the devkit's 0/0
    # NaNs never win a max, so 0 is the same.
    precision = np.nan_to_num(precision, nan=0.0)
    return precision, recall


def voc07_ap(labels: Sequence[int], scores: Sequence[float]) -> float:
    """11-point interpolated average precision, labels in {1, -1, 0} (VOC2007 devkit).

    NaN when there is no positive image (AP is undefined then).
    """
    precision, recall = precision_recall(labels, scores)
    if np.isnan(recall).all():
        return float("nan")
    ap = 0.0
    for t in np.linspace(0.0, 1.0, 11):
        reached = recall >= t - 1e-12
        ap += (precision[reached].max() if reached.any() else 0.0) / 11
    return float(ap)


def voc_ap(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the monotone precision/recall curve, labels in {1, -1, 0} (VOC2010+ devkit).

    NaN when there is no positive image (AP is undefined then).
    """
    precision, recall = precision_recall(labels, scores)
    if np.isnan(recall).all():
        return float("nan")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    # Interpolate: precision at recall r is the best precision at any recall >= r.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def mean_ap(labels: np.ndarray, scores: np.ndarray, ap=voc07_ap) -> tuple[float, np.ndarray]:
    """Mean over classes (columns) of `ap`, and the per-class APs; classes without positives skipped."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 2-d (images x classes)")
    per_class = np.array([ap(labels[:, k], scores[:, k]) for k in range(labels.shape[1])])
    if np.isnan(per_class).all():
        return float("nan"), per_class
    return float(np.nanmean(per_class)), per_class


def percent(x: float) -> float | None:
    """A fraction as percent for a report; an undefined value (NaN: AP without positives) as None."""
    return None if np.isnan(x) else 100 * float(x)


def _check_voc(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be 1-d and of equal length")
    bad = np.setdiff1d(np.unique(labels), VOC_LABELS)
    if bad.size:
        raise ValueError(f"VOC labels must be 1 (positive), -1 (negative) or 0 (difficult), got {bad.tolist()}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; check the features and the classifier")
    return labels.astype(np.int64), scores
