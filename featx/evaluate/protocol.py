"""The one protocol runner: seeded splits -> C chosen on held-out training rows -> refit -> test scores.

Simonyan & Zisserman, arXiv 1409.1556, Appendix B: a linear SVM on the L2-normalised
descriptors (of one net, or of several stacked), its C chosen without touching the test data,
results as the mean (± std) over seeded splits. `featx evaluate` (Caltech, VOC), the VOC2012
action experiment and `featx probe` all fit through `run_protocol` and read their reports
from its per-split outcomes (`class_record`, `ap_record`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featx.errors import BadInput
from featx.evaluate.heads import DEFAULT_CS, HEADS, HeldOutC, OneVsRest, fixed_solver, make_head, span_coordinates
from featx.evaluate.metrics import mean_ap, mean_class_recall, percent, precision_recall, voc07_ap, voc_ap
from featx.evaluate.rows import StoredRows, as_rows
from featx.evaluate.solvers import check_solver, choose_solver
from featx.evaluate.splits import Split, caltech_splits, fixed_splits, test_fraction_splits

# What C is chosen by and what is reported: Caltech's mean class recall, or VOC's mean AP
# (the devkit's 11-point AP up to VOC2009, the area under the PR curve from VOC2010 on).
METRICS = ("mean_class_recall", "voc07_ap", "voc_ap")
# How stacked descriptors are normalised (late fusion): see `fuse`.
STACK_NORMS = ("final", "blocks")
# The keys a pipeline file's [protocol] table may set; the others are the probe's.
PIPELINE_FIELDS = ("splits", "seed", "n_train", "n_test", "holdout", "metric", "background", "box_margin", "stack_norm")
# Single-label reports give top-5 accuracy when there are more classes than this.
TOP_K = 5
# The scalable head's tolerances (featx.evaluate.linear.LinearHead's tol): the refit's, and the
# looser one of the held-out fits that choose C (the same C wins on the tests).
REFIT_TOL = 1e-5
GRID_TOL = 1e-4


@dataclass(frozen=True)
class Protocol:
    """How images are split, how C is chosen, and what is measured (Appendix B)."""

    splits: int = 3
    seed: int = 0
    # Training images per class (Caltech: 30 or 60; the probe's --train-per-class), and at most
    # this many test images per class (None: all the rest). Without n_train the probe tests a
    # stratified `test_size` of each class; VOC ignores all three: its image sets are fixed.
    n_train: int | None = None
    n_test: int | None = None
    test_size: float = 0.2
    # Fraction of the training images held out to choose C (then refit on all of them).
    holdout: float = 0.2
    metric: str = "mean_class_recall"
    # Caltech: keep the background / clutter class, as the paper does.
    background: bool = True
    # VOC action: the choices the paper leaves open. The person's box grown by this fraction of
    # its width and height on each side (clipped to the image) before it is described; and how
    # stacked descriptors are normalised (`fuse`).
    box_margin: float = 0.0
    stack_norm: str = "final"
    # Probe: run without the classes that have too few images (default: refuse, naming them).
    drop_small_classes: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.splits < 1:
            raise BadInput(f"--splits {self.splits} must be at least 1")
        if self.metric not in METRICS:
            raise BadInput(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.n_train is not None and self.n_train < 1:
            raise BadInput(f"--train-per-class (n_train) {self.n_train} must be at least 1 image per class")
        if self.n_test is not None and self.n_test < 1:
            raise BadInput(f"n_test {self.n_test} must be at least 1 image per class (or omitted: all the rest)")
        if self.n_train is None and not 0 < self.test_size < 1:
            raise BadInput(f"--test-size {self.test_size} must be a fraction between 0 and 1, e.g. 0.2")
        if not 0 < self.holdout < 1:
            raise BadInput(f"holdout {self.holdout} must be a fraction between 0 and 1, e.g. 0.2")
        if not 0 <= self.box_margin < 1:
            raise BadInput(f"box_margin {self.box_margin} must be a fraction in [0, 1), e.g. 0.1")
        if self.stack_norm not in STACK_NORMS:
            raise BadInput(f"stack_norm {self.stack_norm!r} must be 'final' or 'blocks'")


@dataclass(frozen=True)
class Head:
    """The classifier, the grid its C is chosen from (Appendix B: a linear SVM), and what
    solves it: `solver` one of featx.evaluate.solvers.SOLVERS (auto: liblinear, the paper's, for
    paper-sized problems; the scalable torch head above EXACT_MAX_ROWS training rows)."""

    name: str = "svm"
    C: tuple[float, ...] = DEFAULT_CS
    solver: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "C", tuple(float(c) for c in self.C))
        if self.name not in HEADS:
            raise BadInput(f"unknown --head {self.name!r}; choose one of {', '.join(HEADS)}")
        if not self.C or min(self.C) <= 0:
            raise BadInput(f"[head] C {list(self.C)} must list positive values, e.g. [0.1, 1, 10]")
        check_solver(self.solver)


def fuse(blocks: Sequence[np.ndarray], norm: str = "final") -> np.ndarray:
    """Late fusion: L2-normalised descriptors side by side; "final" L2-normalises the stack again.

    Paper, Appendix B: "stacking" the descriptors of Net-D and Net-E (VOC action: also of the
    image and the person's box). Re-normalising only rescales (by 1/sqrt(blocks)), which keeps
    the C grid meaning the same for every row; "blocks" leaves the stack as it is.
    """
    if len(blocks) == 1:
        return blocks[0]
    X = np.hstack(blocks)
    if norm == "blocks":
        return X
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def draw_splits(
    protocol: Protocol,
    labels: np.ndarray,
    *,
    classes: tuple[str, ...] | None = None,
    fixed: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Split]:
    """The protocol's seeded splits: `fixed` (train rows, test rows: VOC's image sets, where the
    seeds only vary the held-out part), else n_train per class (Caltech, few-shot), else a
    stratified test fraction."""
    p = protocol
    if fixed is not None:
        return fixed_splits(*fixed, splits=p.splits, seed=p.seed)
    if p.n_train is not None:
        return caltech_splits(labels, n_train=p.n_train, n_test=p.n_test, splits=p.splits, seed=p.seed, classes=classes)
    return test_fraction_splits(labels, p.test_size, splits=p.splits, seed=p.seed)


@dataclass(frozen=True, eq=False)
class Outcome:
    """One split fitted and scored: the fit's facts, and the test rows' labels and decision scores."""

    split: Split
    # seed, n_train, n_test, C, n_holdout, holdout_scores, convergence_warnings, head_solver
    # (exact, scalable or streamed) and solver (liblinear's dual or primal; the torch fit's facts)
    fit: dict
    truth: np.ndarray  # [n] class index, or [n, classes] in {1, -1, 0} (multi-label)
    # [n, classes]; single-label: -inf for a class the split has no training image of.
    scores: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        """Single-label: the class with the highest score per test row."""
        return np.argmax(self.scores, axis=1)


def fit_split(X, y: np.ndarray, split: Split, protocol: Protocol, head: Head, n_classes: int, *, jobs=None) -> Outcome:
    """Fit on the split's training rows (C chosen on a held-out part of them, by the protocol's
    metric), refit on all of them, and score the test rows. `X` is a float32 matrix, or rows of
    a feature file (featx.evaluate.rows.StoredRows, streamed); `y` is a class index per row, or
    {1, -1, 0} per row and class (one-vs-rest; 0 is left out of that class). The solver is
    `head.solver`'s choice for this split (featx.evaluate.solvers.choose_solver)."""
    solver = choose_solver(head.solver, len(split.train), isinstance(X, StoredRows))
    if solver == "exact":
        est, scores = _fit_exact(X.matrix() if isinstance(X, StoredRows) else X, y, split, protocol, head, jobs)
        details = est.solver_
    else:
        est, scores = _fit_scalable(X, y, split, protocol, head)
        details = _torch_facts(est)
    multi_label = y.ndim == 2
    scores = np.asarray(scores, dtype=np.float64)
    if not multi_label:
        scores = _class_columns(scores, est.classes_, n_classes)
    fit = {
        "seed": split.seed,
        "n_train": len(split.train),
        "n_test": len(split.test),
        "C": est.C_,
        "n_holdout": est.n_holdout_,
        "holdout_scores": {f"{C:g}": round(100 * s, 4) for C, s in est.scores_.items()},
        "convergence_warnings": est.convergence_warnings_,
        "head_solver": solver,
        "solver": details,
    }
    return Outcome(split, fit, y[split.test], scores)


def _fit_exact(X: np.ndarray, y: np.ndarray, split: Split, protocol: Protocol, head: Head, jobs):
    """liblinear (the paper's head), the C grid in `jobs` processes."""
    if y.ndim == 2:
        base = OneVsRest(head.name, random_state=split.seed)
    else:
        base = make_head(head.name, random_state=split.seed)
    # One solver for every fit of the split, chosen from the descriptors' own shape (fewer
    # training images than dimensions: liblinear's dual), so the span coordinates below, which
    # have as many columns as rows, change the speed and nothing else.
    base = fixed_solver(base, (len(split.train), X.shape[1]))
    est = HeldOutC(
        base, Cs=head.C, holdout=protocol.holdout, scoring=protocol.metric, random_state=split.seed, n_jobs=jobs
    )
    X_train, X_test = span_coordinates(X[split.train], X[split.test])
    est.fit(X_train, y[split.train])
    return est, est.decision_function(X_test)


def _fit_scalable(X, y: np.ndarray, split: Split, protocol: Protocol, head: Head):
    """The torch head (featx.evaluate.linear) on every core or the GPU: the C grid one value
    after another, each from the last one's solution, on the rows without copying them."""
    from featx.evaluate.linear import LinearHead  # torch: loaded when this head runs

    est = HeldOutC(
        LinearHead(head.name, tol=REFIT_TOL, device="auto"),
        Cs=head.C,
        holdout=protocol.holdout,
        scoring=protocol.metric,
        random_state=split.seed,
        warm_start=True,
        grid_params={"tol": GRID_TOL},
    )
    rows = as_rows(X)
    est.fit(rows.take(split.train), y[split.train])
    return est, est.decision_function(rows.take(split.test))


def _torch_facts(est: HeldOutC) -> dict:
    """What the report says of a torch fit: where it ran, the refit's iterations and passes over
    its rows, and the passes of the held-out fits that chose C."""
    import torch

    head = est.estimator_
    return {
        "device": head.device_,
        "threads": torch.get_num_threads() if head.device_ == "cpu" else None,
        "iterations": head.n_iter_,
        "passes": head.n_passes_,
        "holdout_passes": sum(fitted.n_passes_ for fitted in (est.walked_ or {}).values()),
        "tol": head.tol,
        "holdout_tol": GRID_TOL,
    }


def run_protocol(
    X, y: np.ndarray, splits: Sequence[Split], protocol: Protocol, head: Head, n_classes: int, *, jobs=None
) -> list[Outcome]:
    """Every split of `splits` fitted and scored (`fit_split`), in order."""
    return [fit_split(X, y, split, protocol, head, n_classes, jobs=jobs) for split in splits]


def _class_columns(S: np.ndarray, fitted: np.ndarray, n_classes: int) -> np.ndarray:
    """Decision scores as [n, classes]: a binary head gives one column (the second class's score)."""
    if S.ndim == 1:
        S = np.column_stack([-S, S])
    full = np.full((S.shape[0], n_classes), -np.inf)
    full[:, np.asarray(fitted, dtype=np.int64)] = S
    return full


# -- what a split measured -------------------------------------------------------------------


def class_record(outcome: Outcome, classes: Sequence[str]) -> dict:
    """Single-label, percent: accuracy, mean class recall (Caltech's metric), top-5 accuracy (more
    than 5 classes), and per class the test images, recall and precision."""
    y, pred, S = outcome.truth, outcome.predicted, outcome.scores
    out = {"accuracy": 100 * float(np.mean(pred == y)), "mean_class_recall": 100 * mean_class_recall(y, pred)}
    if len(classes) > TOP_K:
        out["top5_accuracy"] = 100 * float(np.mean((top_k(S) == y[:, None]).any(axis=1)))
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


def ap_record(outcome: Outcome, classes: Sequence[str], metric: str = "voc_ap") -> dict:
    """Multi-label, percent: both devkit APs per class and their means, `value` the one `metric`
    names (VOC2007: 11-point; VOC2012 and action: area). Classes without positives are skipped."""
    m07, ap07 = mean_ap(outcome.truth, outcome.scores, ap=voc07_ap)
    marea, area = mean_ap(outcome.truth, outcome.scores, ap=voc_ap)
    return {
        "value": 100 * (m07 if metric == "voc07_ap" else marea),
        "voc07_mAP": 100 * m07,
        "area_mAP": 100 * marea,
        "per_class": {c: {"voc07_ap": percent(a), "area_ap": percent(b)} for c, a, b in zip(classes, ap07, area)},
    }


def pr_curves(outcome: Outcome, classes: Sequence[str]) -> dict:
    """Multi-label: class -> (precision, recall) at every rank of its test scores (the PR plots)."""
    return {c: precision_recall(outcome.truth[:, k], outcome.scores[:, k]) for k, c in enumerate(classes)}


def top_k(S: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The k best-scoring classes of each row, best first (ties: the lower class index first)."""
    return np.argsort(-S, axis=1, kind="stable")[:, :k]


def mean_std(values: Sequence[float | None]) -> dict:
    """Mean and sample std (ddof=1) over the splits of the defined values; std None for one."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else None}
