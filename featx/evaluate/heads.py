"""Classifiers on top of the descriptors, with C chosen on held-out training data only.

Simonyan & Zisserman, arXiv 1409.1556, Appendix B: a linear SVM on the L2-normalised
descriptors; one-vs-rest per class (VOC); the hyper-parameter is chosen without touching
the test data. `--head logreg` swaps in logistic regression. Both follow scikit-learn's
estimator contract, so they clone, grid and pickle like any estimator.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import scipy.linalg
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils import get_tags
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from featx.errors import BadInput
from featx.evaluate.metrics import mean_ap, mean_class_recall, voc07_ap, voc_ap
from featx.evaluate.rows import is_rows, take_rows
from featx.evaluate.splits import holdout_split

HEADS = ("svm", "logreg")
# Log-spaced grid around C = 1, the usual optimum for L2-normalised descriptors.
DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
SCORINGS = ("mean_class_recall", "voc07_ap", "voc_ap", "accuracy")


def make_head(name: str = "svm", C: float = 1.0, random_state: int = 0, dual: bool | str = "auto") -> BaseEstimator:
    """An unfitted linear classifier: `svm` (LinearSVC, the paper's) or `logreg`.

    `dual` is LinearSVC's solver choice ("auto": liblinear's dual when rows < columns);
    HeldOutC fixes it once per fit so that every C and the refit share one solver.
    """
    if name == "svm":
        return LinearSVC(C=C, dual=dual, max_iter=10_000, random_state=random_state)
    if name == "logreg":
        return LogisticRegression(C=C, max_iter=2_000, random_state=random_state)
    raise BadInput(f"unknown --head {name!r}; choose one of {', '.join(HEADS)}")


class OneVsRest(ClassifierMixin, BaseEstimator):
    """One binary head per column of Y in {1, -1, 0}; rows with 0 are left out of that class.

    VOC's 0 marks images whose only objects of the class are "difficult": the devkit ignores
    them in the metric, and featx ignores them in training as well (Appendix B, VOC).
    """

    def __init__(self, head: str = "svm", C: float = 1.0, random_state: int = 0, dual: bool | str = "auto"):
        self.head = head
        self.C = C
        self.random_state = random_state
        self.dual = dual

    def fit(self, X, Y):
        X, Y = validate_data(self, X, Y, multi_output=True, dtype=np.float32)
        Y = np.asarray(Y)
        if Y.ndim != 2:
            raise ValueError(f"OneVsRest needs Y of shape (images, classes), got {Y.shape}")
        self.estimators_ = []
        for k in range(Y.shape[1]):
            rows = Y[:, k] != 0
            y = Y[rows, k] > 0
            if y.all() or not y.any():
                # One-sided data (possible in a small held-out fit part): a constant score
                # ranks nothing, which is what such a class can honestly do.
                self.estimators_.append(float(1.0 if y.all() else -1.0))
                continue
            est = make_head(self.head, self.C, self.random_state)
            if self.dual != "auto" and "dual" in est.get_params():
                est.set_params(dual=self.dual)
            self.estimators_.append(est.fit(X[rows], y))
        self.n_outputs_ = Y.shape[1]
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        out = np.empty((X.shape[0], self.n_outputs_))
        for k, est in enumerate(self.estimators_):
            out[:, k] = est if isinstance(est, float) else est.decision_function(X)
        return out

    def predict(self, X) -> np.ndarray:
        return np.where(self.decision_function(X) > 0, 1, -1)

    def score(self, X, Y, sample_weight=None) -> float:
        return mean_ap(np.asarray(Y), self.decision_function(X), ap=voc07_ap)[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = False
        return tags


class HeldOutC(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Choose C on a held-out part of the training data, then refit on all of it.

    Paper: Appendix B (C is never chosen on test data). `scoring` is the protocol's metric:
    "mean_class_recall" (Caltech), "voc07_ap" / "voc_ap" (mean AP, VOC) or "accuracy".
    Among equally good C the smallest (the most regularised) wins.

    `warm_start`: walk the grid from the smallest C up, each fit starting from the last one's
    solution (an estimator with a `warm_start` parameter, e.g. LinearHead), and refit from the
    chosen C's; `grid_params` are set for the held-out fits only (e.g. a looser tol). Without it
    each C is fit on its own, in `n_jobs` processes. X may be rows of featx.evaluate.rows (a
    matrix's rows or a feature file, never copied whole) for an estimator that reads them.
    `walked_` keeps the held-out fits of a warm walk, by C.
    """

    def __init__(
        self,
        estimator=None,
        Cs=DEFAULT_CS,
        holdout: float = 0.2,
        scoring: str = "mean_class_recall",
        random_state: int = 0,
        n_jobs: int | None = None,
        warm_start: bool = False,
        grid_params: dict | None = None,
    ):
        self.estimator = estimator
        self.Cs = Cs
        self.holdout = holdout
        self.scoring = scoring
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.warm_start = warm_start
        self.grid_params = grid_params

    def fit(self, X, y):
        if is_rows(X):
            self.n_features_in_ = X.dim
        else:
            X, y = validate_data(self, X, y, multi_output=True, dtype=np.float32)
        if self.scoring not in SCORINGS:
            raise BadInput(f"unknown scoring {self.scoring!r}; choose one of {', '.join(SCORINGS)}")
        Cs = sorted(float(c) for c in np.atleast_1d(self.Cs))
        if not Cs or min(Cs) <= 0:
            raise BadInput(f"C grid {self.Cs} must hold positive values, e.g. [0.1, 1, 10]")
        base = fixed_solver(make_head() if self.estimator is None else self.estimator, X.shape)
        y_arr = np.asarray(y)
        if y_arr.ndim == 2 and y_arr.shape[1] == 1 and not get_tags(base).target_tags.multi_output:
            y_arr = column_or_1d(y_arr, warn=True)
        if y_arr.ndim == 1:
            self.classes_ = np.unique(y_arr)
        fit, val = holdout_split(y_arr, self.holdout, self.random_state, stratify=y_arr.ndim == 1)
        self.scores_ = {}
        self.convergence_warnings_ = 0
        start = self.walked_ = None
        if len(Cs) > 1:
            if self.warm_start:
                runs, start = self._walk(base, Cs, take_rows(X, fit), y_arr[fit], take_rows(X, val), y_arr[val])
                self.walked_ = start
            else:
                # Each C is fit and scored on its own (in processes with n_jobs: liblinear's random
                # state is global, so threads would make the result depend on timing).
                runs = Parallel(n_jobs=self.n_jobs, prefer="processes")(
                    delayed(_fit_and_score)(base, C, X[fit], y_arr[fit], X[val], y_arr[val], self.scoring) for C in Cs
                )
            for C, (score, n_warned) in zip(Cs, runs):
                self.scores_[C] = score
                self.convergence_warnings_ += n_warned
            scored = [C for C in Cs if not np.isnan(self.scores_[C])]
            # Nothing scorable (e.g. no positive held out): fall back to the most regularised C.
            self.C_ = max(scored, key=lambda C: (self.scores_[C], -C)) if scored else Cs[0]
        else:
            self.C_ = Cs[0]
        self.n_fit_, self.n_holdout_ = len(fit), len(val)
        self.solver_ = {k: v for k, v in base.get_params(deep=False).items() if k == "dual"}
        refit = clone(base).set_params(C=self.C_)
        if start is not None:
            # From the held-out fit of the chosen C, with the refit's own parameters.
            own = {k: base.get_params()[k] for k in self.grid_params or {}}
            refit = copy.deepcopy(start[self.C_]).set_params(**own)
        self.estimator_, n_warned = _fit(refit, X, y_arr)
        self.convergence_warnings_ += n_warned
        return self

    def _walk(self, base, Cs, X_fit, y_fit, X_val, y_val):
        """The grid from the smallest C up, each fit from the last one's solution: per C its
        (held-out score, convergence warnings), and its fitted estimator (a start for the refit)."""
        if "warm_start" not in base.get_params():
            raise BadInput(
                f"HeldOutC(warm_start=True) walks the grid by warm starts; {type(base).__name__} has no warm_start "
                "parameter: use featx.evaluate.linear.LinearHead, or warm_start=False"
            )
        est = clone(base).set_params(warm_start=True, **(self.grid_params or {}))
        runs, fitted = [], {}
        for C in Cs:
            est, n_warned = _fit(est.set_params(C=C), X_fit, y_fit)
            runs.append((_score(est, X_val, y_val, self.scoring), n_warned))
            fitted[C] = copy.deepcopy(est)
        return runs, fitted

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        if not is_rows(X):
            X = validate_data(self, X, reset=False, dtype=np.float32)
        return self.estimator_.decision_function(X)

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        if not is_rows(X):
            X = validate_data(self, X, reset=False, dtype=np.float32)
        return self.estimator_.predict(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        inner = get_tags(make_head() if self.estimator is None else self.estimator).target_tags
        tags.target_tags.multi_output = inner.multi_output
        tags.target_tags.single_output = inner.single_output
        return tags


def fixed_solver(estimator, shape: tuple[int, int]) -> BaseEstimator:
    """`estimator` with dual="auto" resolved once, for data of `shape` (rows, columns).

    LinearSVC resolves "auto" at each fit from that fit's own rows (dual when rows < columns),
    so the held-out fits, on fewer rows, could run another solver than the refit on all of
    them. Resolved once, every C is compared under the solver the refit then uses.
    """
    params = estimator.get_params(deep=False)
    if params.get("dual") != "auto" or params.get("head", "svm") != "svm":
        return estimator
    if params.get("loss") == "hinge":
        dual = True  # liblinear solves the hinge loss in the dual only
    elif params.get("penalty") == "l1":
        dual = False  # and the l1 penalty in the primal only
    else:
        dual = bool(shape[0] < shape[1])
    return clone(estimator).set_params(dual=dual)


def _fit(est, X, y):
    """Fit, counting convergence warnings instead of printing them (the report carries the count).

    liblinear's iteration cap rarely binds on L2-normalised descriptors; when it does the
    solution is still usable.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        est.fit(X, y)
    n_warned = 0
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            n_warned += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return est, n_warned


def _score(est, X, y, scoring: str) -> float:
    if scoring == "mean_class_recall":
        return mean_class_recall(y, est.predict(X))
    if scoring == "accuracy":
        return float(np.mean(est.predict(X) == y))
    ap = voc07_ap if scoring == "voc07_ap" else voc_ap
    return mean_ap(y, est.decision_function(X), ap=ap)[0]


def _fit_and_score(base, C, X_fit, y_fit, X_val, y_val, scoring) -> tuple[float, int]:
    est, n_warned = _fit(clone(base).set_params(C=C), X_fit, y_fit)
    return _score(est, X_val, y_val, scoring), n_warned


def span_coordinates(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows as coordinates in the span of the training rows, when that is smaller than D.

    A linear head's weights lie in the span of its training rows (representer theorem), so
    its decisions depend on the data only through inner products with those rows. With the
    Gram matrix G = L L^T of the training rows, the rows of L have exactly these inner
    products, and a test row becomes the solution of L z = (its products with the training
    rows). Caltech-101's 3,060 x 12,288 problem (D&E: x 24,576) becomes 3,060 x 3,060, several
    times faster to fit. The basis comes from training rows only: nothing is learnt from test.
    """
    n, d = train.shape
    if n >= d:
        return train, test
    a = train.astype(np.float64)
    gram = a @ a.T
    cross = test.astype(np.float64) @ a.T
    try:
        factor = scipy.linalg.cholesky(gram, lower=True, check_finite=False)
        z_test = scipy.linalg.solve_triangular(factor, cross.T, lower=True, check_finite=False).T
    except np.linalg.LinAlgError:
        # Duplicate training rows make G singular: keep the directions that carry data.
        values, vectors = np.linalg.eigh(gram)
        keep = values > values.max() * n * np.finfo(np.float64).eps
        factor = vectors[:, keep] * np.sqrt(values[keep])
        z_test = cross @ (vectors[:, keep] / np.sqrt(values[keep]))
    return factor.astype(np.float32), z_test.astype(np.float32)
