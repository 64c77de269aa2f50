"""Linear heads for large problems: a squared-hinge linear SVM and logistic regression in torch.

liblinear (scikit-learn's LinearSVC and LogisticRegression) is the paper's head (arXiv 1409.1556,
Appendix B) and stays the head of paper-sized problems, but it runs on one core and a C grid
one value after another: 20,000 x 4,096 rows of 100 classes take minutes, 100,000 do not finish
in half an hour. `LinearHead` minimises the same objectives by full-batch L-BFGS on every core
(and the GPU when there is one):

    svm:     sum_k  1/2 |w_k|^2 + 1/2 b_k^2 + C sum_i max(0, 1 - y_ik (w_k . x_i + b_k))^2
             one-vs-rest (y_ik = +1 for class k, -1 else; one column for two classes),
             liblinear's L2-regularised L2-loss SVC, whose bias is a weight on a constant
             feature and so regularised as well;
    logreg:  1/2 |W|^2 + C sum_i -log softmax(W x_i + b)_(y_i)   multinomial, bias not
             regularised (scikit-learn's LogisticRegression); binary for two classes and
             per column for multi-label.

The rows are read piece by piece for every evaluation of the objective and its gradient (one
"pass"): from a matrix in memory, or from a feature file on disk (featx.evaluate.rows), so the
memory of a fit is one piece plus the weights and L-BFGS's history whatever the row count, and
a fit streamed from disk follows the in-memory fit's iterates to the same optimum.

Why not stochastic minibatch steps for the streamed fit: on these weakly regularised problems
(C times the rows large) first-order methods stay far from the optimum for many epochs. On
16,000 x 512 rows of 50 classes (svm, C = 1), after 10 epochs of 1,024-row minibatches the
objective was still 32% above the optimum with Adam (cosine-decayed step, averaged last epoch)
and 19% above with SVRG at its largest stable step, where L-BFGS converged in ~100 passes. Such
early-stopped solutions are regularised by epochs and step sizes rather than by C, which would
make choosing C on held-out rows meaningless. A pass of L-BFGS costs what an epoch costs.

Multi-label targets are a [n, classes] matrix in {1, -1, 0}; 0 (VOC's "difficult") leaves that
row out of that class's loss, and a class with only one side among its rows gets the constant
score of featx.evaluate.heads.OneVsRest. A fit started from the previous fit's solution
(`warm_start`) walks a C grid cheaply, from the most regularised C up.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from featx.errors import BadInput
from featx.evaluate.rows import MatrixRows, is_rows

LOSSES = ("svm", "logreg")
# On a GPU the rows of a fit are copied there once when they take at most this share of its free
# memory (else they travel piece by piece for every pass).
DEVICE_SHARE = 0.5


class LinearHead(ClassifierMixin, BaseEstimator):
    """A linear classifier fit by full-batch L-BFGS in torch: `svm` (squared hinge, one-vs-rest)
    or `logreg` (multinomial). liblinear's objectives; see the module docstring.

    `X` is an array, or rows of featx.evaluate.rows (a matrix's rows without copying them, or a
    feature file read from disk for every pass). `tol`: the fit stops when the gradient's largest
    entry is below `tol` times its value at zero weights (liblinear's kind of test).
    `device`: "cpu", "cuda[:N]" or "auto" (the GPU when there is one); on the CPU torch's threads
    (every core by default) run the products.
    """

    def __init__(
        self,
        loss: str = "svm",
        C: float = 1.0,
        *,
        tol: float = 1e-4,
        max_iter: int = 1000,
        warm_start: bool = False,
        device: str = "cpu",
    ):
        self.loss = loss
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.device = device

    # -- fit -----------------------------------------------------------------------------
    def fit(self, X, y):
        if self.loss not in LOSSES:
            raise BadInput(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not self.C > 0:
            raise BadInput(f"C {self.C} must be positive")
        if is_rows(X):
            rows, y = X, np.asarray(y)
            if len(y) != len(rows):
                raise BadInput(f"{len(rows)} rows but {len(y)} labels; give one label per row")
            self.n_features_in_ = rows.dim
        else:
            X, y = validate_data(self, X, y, multi_output=True, dtype=np.float32, order="C")
            rows, y = MatrixRows(X), np.asarray(y)
        previous = self._previous(rows.dim)
        targets = self._targets(y)
        device = _device(self.device)
        W, b = self._start(previous, rows.dim, device)
        objective = _Objective(self, rows, targets, device)
        W, b, g0 = objective.minimise(W, b, self.tol, self.max_iter, None if previous is None else previous[2])
        self.coef_ = W.cpu().numpy().T.copy()  # [outputs, D], scikit-learn's layout
        self.intercept_ = b.cpu().numpy().copy()
        if self.multi_label_ and self.constant_.any():
            # A class with positives only or negatives only: a constant score ranks nothing,
            # which is what such a class can honestly do (as OneVsRest).
            self.coef_[self.constant_] = 0.0
            self.intercept_[self.constant_] = np.where(self.side_[self.constant_] > 0, 1.0, -1.0)
        self.grad_scale_, self.device_ = g0, str(device)
        self.n_iter_, self.n_passes_, self.converged_ = objective.n_iter, objective.passes, objective.converged
        if not self.converged_:
            warnings.warn(
                f"LinearHead ({self.loss}, C={self.C:g}) stopped after {self.n_iter_} iterations before "
                f"reaching tol {self.tol:g}; raise max_iter",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _previous(self, dim: int) -> tuple[np.ndarray, np.ndarray, float] | None:
        """The solution to start from: the last fit's, when warm-starting one of the same shape."""
        if not self.warm_start or getattr(self, "coef_", None) is None or self.coef_.shape[1] != dim:
            return None
        return self.coef_, self.intercept_, self.grad_scale_

    def _targets(self, y: np.ndarray) -> np.ndarray:
        """Sets classes_ and the kind of outputs; returns compact targets: class index per row
        (single-label) or int8 {1, -1, 0} per row and class (multi-label)."""
        if y.ndim == 2:
            bad = np.setdiff1d(np.unique(y), (1, -1, 0))
            if bad.size and y.shape[1] == 1:
                y = column_or_1d(y, warn=True)  # labels as a column, as scikit-learn takes them
            elif bad.size:
                raise BadInput(f"multi-label targets must be 1, -1 or 0 (ignored), got {bad.tolist()}")
        if y.ndim == 2:
            Y = y.astype(np.int8)
            positive, negative = (Y > 0).any(axis=0), (Y < 0).any(axis=0)
            self.multi_label_ = True
            self.classes_ = np.arange(Y.shape[1])
            self.constant_ = ~(positive & negative)
            self.side_ = np.where(positive, 1, -1)
            self.outputs_ = Y.shape[1]
            Y[:, self.constant_] = 0  # no loss: their weights stay at zero
            return Y
        check_classification_targets(y)
        self.multi_label_ = False
        self.classes_, index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise BadInput(f"one class only ({self.classes_[0]!r}); a classifier needs at least 2 classes")
        self.outputs_ = 1 if len(self.classes_) == 2 else len(self.classes_)
        return index.reshape(-1).astype(np.int64)

    def _start(self, previous, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if previous is not None and previous[0].shape[0] == self.outputs_:
            W = torch.from_numpy(previous[0].T.copy())
            b = torch.from_numpy(previous[1].copy())
        else:
            W = torch.zeros(dim, self.outputs_)
            b = torch.zeros(self.outputs_)
        return W.to(device), b.to(device)

    # -- predict -------------------------------------------------------------------------
    def decision_function(self, X) -> np.ndarray:
        """[n, classes] scores, higher is more of the class; [n] for two classes (the second's)."""
        check_is_fitted(self)
        if is_rows(X):
            if X.dim != self.n_features_in_:
                raise BadInput(f"rows of {X.dim} dims; this head was fit on {self.n_features_in_}")
            out = np.empty((len(X), self.coef_.shape[0]), np.float32)
            for where, piece in X.pieces():
                out[where] = piece @ self.coef_.T + self.intercept_
        else:
            X = validate_data(self, X, reset=False, dtype=np.float32)
            out = X @ self.coef_.T + self.intercept_
        return out[:, 0] if out.shape[1] == 1 and not self.multi_label_ else out

    def predict(self, X) -> np.ndarray:
        S = self.decision_function(X)
        if self.multi_label_:
            return np.where(S > 0, 1, -1)
        if S.ndim == 1:
            return self.classes_[(S > 0).astype(np.int64)]
        return self.classes_[np.argmax(S, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


class _Objective:
    """The head's objective over its rows, divided by C times the rows (so that L-BFGS sees
    values and gradients of the same size for every C and row count), evaluated in passes."""

    def __init__(self, head: LinearHead, rows, targets: np.ndarray, device: torch.device):
        self.head, self.rows, self.targets, self.device = head, rows, targets, device
        self.multinomial = head.loss == "logreg" and not head.multi_label_ and head.outputs_ > 1
        self.resident = _resident(rows, device)
        self.passes = self.n_iter = 0
        self.converged = True

    def _pieces(self):
        if self.resident is not None:
            yield from self.resident
            return
        for where, piece in self.rows.pieces():
            yield where, _tensor(piece, self.device)

    def _signs(self, where: np.ndarray) -> torch.Tensor:
        """{1, -1, 0} targets of the rows `where` (one column for two classes)."""
        t = self.targets[where]
        if t.ndim == 2:
            return torch.from_numpy(t.astype(np.float32)).to(self.device)
        if self.head.outputs_ == 1:
            return torch.from_numpy(np.where(t == 1, 1.0, -1.0).astype(np.float32)[:, None]).to(self.device)
        S = -np.ones((len(t), self.head.outputs_), np.float32)
        S[np.arange(len(t)), t] = 1.0
        return torch.from_numpy(S).to(self.device)

    def evaluate(self, W: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One pass over the rows: the objective, its gradient in W and in b."""
        self.passes += 1
        loss = torch.zeros((), dtype=torch.float64, device=W.device)
        gW, gb = torch.zeros_like(W), torch.zeros_like(b)
        for where, X in self._pieces():
            Z = torch.addmm(b, X, W)
            if self.multinomial:
                t = torch.from_numpy(self.targets[where]).to(self.device)
                loss += (torch.logsumexp(Z, 1) - Z.gather(1, t[:, None])[:, 0]).sum(dtype=torch.float64)
                dZ = torch.softmax(Z, 1)
                dZ[torch.arange(len(t), device=self.device), t] -= 1.0
            elif self.head.loss == "svm":
                S = self._signs(where)
                margin = (1.0 - S * Z).clamp_min_(0.0).mul_(S != 0)
                loss += (margin * margin).sum(dtype=torch.float64)
                dZ = margin.mul_(S).mul_(-2.0)
            else:
                S = self._signs(where)
                U = -S * Z
                loss += (torch.nn.functional.softplus(U) * S.abs()).sum(dtype=torch.float64)
                dZ = torch.sigmoid(U).mul_(S).neg_()
            gW.addmm_(X.T, dZ)
            gb += dZ.sum(0)
        C = float(self.head.C)
        penalty = 0.5 * (W.double() ** 2).sum()
        gW.add_(W, alpha=1.0 / C)
        if self.head.loss == "svm":
            penalty = penalty + 0.5 * (b.double() ** 2).sum()
            gb.add_(b, alpha=1.0 / C)
        n = max(len(self.rows), 1)
        value = float((loss + penalty / C) / n)
        return value, gW.div_(n), gb.div_(n)

    def minimise(self, W: torch.Tensor, b: torch.Tensor, tol: float, max_iter: int, scale: float | None = None):
        """L-BFGS with a strong-Wolfe line search, until the gradient's largest entry is below
        `tol` times its value at zero weights (`scale`, known from an earlier fit of this
        problem, else measured here: the objective is divided by C, so it holds for every C).
        Returns W, b and that scale."""
        first = None
        if scale is None:
            zero = (torch.zeros_like(W), torch.zeros_like(b))
            first = self.evaluate(*zero)
            scale = max(float(first[1].abs().max()), float(first[2].abs().max()), 1e-30)
            if W.abs().max() > 0 or b.abs().max() > 0:
                first = None  # measured at zero, but the fit starts elsewhere
        optimizer = torch.optim.LBFGS(
            [W, b],
            lr=1.0,
            max_iter=max_iter,
            max_eval=max_iter * 5 // 4,  # torch's default
            tolerance_grad=tol * scale,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            nonlocal first
            if first is not None:  # the pass at zero weights, already made
                (value, gW, gb), first = first, None
            else:
                value, gW, gb = self.evaluate(W, b)
            W.grad, b.grad = gW, gb
            return value

        optimizer.step(closure)
        state = optimizer.state[W]
        self.n_iter = int(state.get("n_iter", 0))
        grad = max(float(W.grad.abs().max()), float(b.grad.abs().max()))
        # Stopped short of tol by the iteration or evaluation cap (not by a step too small to
        # change anything in float32, which is as converged as it gets).
        capped = self.n_iter >= max_iter or int(state.get("func_evals", 0)) >= max_iter * 5 // 4
        self.converged = grad <= tol * scale or not capped
        return W.detach(), b.detach(), scale


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _tensor(piece: np.ndarray, device: torch.device) -> torch.Tensor:
    if not piece.flags.writeable:  # a view of Arrow memory: torch wants memory it may write
        piece = piece.copy()
    return torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32)).to(device)


def _resident(rows, device: torch.device) -> list | None:
    """On a GPU, the rows' pieces copied there once when they fit (else None: piece by piece)."""
    free = _free_memory(device)
    if free is None or len(rows) * rows.dim * 4 > DEVICE_SHARE * free:
        return None
    return [(where, _tensor(piece, device)) for where, piece in rows.pieces()]


def _free_memory(device: torch.device) -> int | None:
    """A GPU's free memory in bytes; None on the CPU, where the rows are read for every pass
    (a copy of them would double the memory)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
