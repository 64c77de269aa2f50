"""Linear heads for large problems: a squared-hinge linear SVM and logistic regression in torch.

liblinear (scikit-learn's LinearSVC and LogisticRegression) is the paper's head (arXiv 1409.1556,
Appendix B) and stays the head of paper-sized problems, but it runs on one core and a C grid
one value after another: 20,000 x 4,096 rows of 100 classes take minutes, 100,000 do not finish
in half an hour. `LinearHead` minimises the same objectives on every core (and the GPU when
there is one), in full batch by L-BFGS while X is in memory:

    svm:     sum_k  1/2 |w_k|^2 + 1/2 b_k^2 + C sum_i max(0, 1 - y_ik (w_k . x_i + b_k))^2
             one-vs-rest (y_ik = +1 for class k, -1 else), liblinear's L2-regularised L2-loss
             SVC, whose bias is a weight on a constant feature and so regularised as well;
    logreg:  1/2 |W|^2 + C sum_i -log softmax(W x_i + b)_(y_i)   multinomial, bias not
             regularised (scikit-learn's LogisticRegression); binary per column for multi-label.

Multi-label targets are a [n, classes] matrix in {1, -1, 0}; 0 (VOC's "difficult") leaves that
row out of that class's loss. A fit started from the previous fit's solution (`warm_start`)
walks a C grid cheaply, from the most regularised C up.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from featx.errors import BadInput

LOSSES = ("svm", "logreg")


class LinearHead(ClassifierMixin, BaseEstimator):
    """A linear classifier fit in torch by full-batch L-BFGS: `svm` (squared hinge, one-vs-rest)
    or `logreg` (multinomial). Same objective as liblinear's; see the module docstring.

    `device`: "cpu", "cuda" or "auto" (the GPU when there is one). torch's intra-op threads
    (every core by default) run the products. `tol` bounds the gradient's largest entry of the
    objective divided by the number of rows.
    """

    def __init__(
        self,
        loss: str = "svm",
        C: float = 1.0,
        *,
        tol: float = 1e-5,
        max_iter: int = 500,
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
        X, y = validate_data(self, X, y, multi_output=True, dtype=np.float32, order="C")
        y = np.asarray(y)
        device = _device(self.device)
        targets = self._targets(y)
        Xt = torch.from_numpy(X).to(device)
        W, b = self._start(X.shape[1], len(self.classes_), device)
        self.n_iter_ = _lbfgs(
            lambda W, b: self._objective(Xt, targets.to(device), W, b), W, b, self.tol, self.max_iter
        )
        self.coef_ = W.detach().cpu().numpy().T.copy()  # [classes, D], scikit-learn's layout
        self.intercept_ = b.detach().cpu().numpy().copy()
        return self

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        """The loss's targets: class indices (multinomial logreg) or a {1, -1, 0} matrix."""
        if y.ndim == 2:
            bad = np.setdiff1d(np.unique(y), (1, -1, 0))
            if bad.size:
                raise BadInput(f"multi-label targets must be 1, -1 or 0 (ignored), got {bad.tolist()}")
            self.multi_label_ = True
            self.classes_ = np.arange(y.shape[1])
            return torch.from_numpy(y.astype(np.float32))
        self.multi_label_ = False
        self.classes_, index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise BadInput(f"one class only ({self.classes_[0]!r}); a classifier needs at least 2")
        if self.loss == "logreg":
            return torch.from_numpy(index.astype(np.int64))
        signs = -np.ones((len(y), len(self.classes_)), np.float32)
        signs[np.arange(len(y)), index] = 1.0
        return torch.from_numpy(signs)

    def _start(self, dim: int, outputs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        previous = getattr(self, "coef_", None)
        if self.warm_start and previous is not None and previous.shape == (outputs, dim):
            W = torch.from_numpy(previous.T.copy()).to(device)
            b = torch.from_numpy(self.intercept_.copy()).to(device)
        else:
            W = torch.zeros(dim, outputs, device=device)
            b = torch.zeros(outputs, device=device)
        return W.requires_grad_(), b.requires_grad_()

    def _objective(self, X: torch.Tensor, T: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(C * loss + penalty) / n, accumulated in float64 (n is up to millions of rows)."""
        Z = X @ W + b
        if self.loss == "logreg" and not self.multi_label_:
            data = torch.nn.functional.cross_entropy(Z, T, reduction="none").double().sum()
            penalty = 0.5 * (W.double() ** 2).sum()
        elif self.loss == "logreg":
            # Binary logistic per column; 0 targets weigh nothing.
            data = (torch.nn.functional.softplus(-T * Z) * (T != 0)).double().sum()
            penalty = 0.5 * (W.double() ** 2).sum()
        else:
            margin = (1.0 - T * Z).clamp_min(0.0) * (T != 0)
            data = (margin * margin).double().sum()
            penalty = 0.5 * ((W.double() ** 2).sum() + (b.double() ** 2).sum())
        return (self.C * data + penalty) / X.shape[0]

    def fit_stream(self, chunks, classes, rows: int, *, epochs: int = 5, lr: float = 0.05):
        """Fit from minibatches that do not fit in memory together: `chunks()` yields (X, y)
        pieces (e.g. a Parquet file's row groups) afresh for each of `epochs` passes.

        Adam on the same objective (each piece's loss scaled to the whole of `rows`), its step
        decaying over the passes, the weights averaged over the last pass (Polyak): memory is one
        piece plus the weights, whatever `rows` is. `classes`: every label (or the column count
        of multi-label targets), since a piece may not hold them all.
        """
        if self.loss not in LOSSES:
            raise BadInput(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        device = _device(self.device)
        multi = isinstance(classes, (int, np.integer))
        self.classes_ = np.arange(int(classes)) if multi else np.asarray(sorted(classes))
        self.multi_label_ = multi
        W, b = None, None
        steps = 0
        for epoch in range(epochs):
            for X, y in chunks():
                X = np.ascontiguousarray(X, dtype=np.float32)
                if W is None:
                    self.n_features_in_ = X.shape[1]
                    W, b = self._start(X.shape[1], len(self.classes_), device)
                    optimizer = torch.optim.Adam([W, b], lr=lr)
                    total = None
                    mean_W, mean_b, averaged = torch.zeros_like(W), torch.zeros_like(b), 0
                T = self._stream_targets(np.asarray(y)).to(device)
                Xt = torch.from_numpy(X).to(device)
                with torch.enable_grad():
                    optimizer.zero_grad()
                    # This piece's loss as if every row were like it; the penalty once per step.
                    value = self._objective(Xt, T, W, b) * 1.0
                    penalty = self._penalty(W, b)
                    value = value + penalty * (1.0 / rows - 1.0 / X.shape[0])
                    value.backward()
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
                optimizer.step()
                steps += 1
                if epoch == epochs - 1:
                    averaged += 1
                    mean_W += (W.detach() - mean_W) / averaged
                    mean_b += (b.detach() - mean_b) / averaged
        if W is None:
            raise BadInput("no rows to fit; the stream yielded nothing")
        self.n_iter_ = steps
        self.coef_ = mean_W.cpu().numpy().T.copy()
        self.intercept_ = mean_b.cpu().numpy().copy()
        return self

    def _stream_targets(self, y: np.ndarray) -> torch.Tensor:
        if self.multi_label_:
            return torch.from_numpy(y.astype(np.float32))
        index = np.searchsorted(self.classes_, y)
        if self.loss == "logreg":
            return torch.from_numpy(index.astype(np.int64))
        signs = -np.ones((len(y), len(self.classes_)), np.float32)
        signs[np.arange(len(y)), index] = 1.0
        return torch.from_numpy(signs)

    def _penalty(self, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        penalty = 0.5 * (W.double() ** 2).sum()
        if self.loss == "svm":
            penalty = penalty + 0.5 * (b.double() ** 2).sum()
        return penalty

    # -- predict -------------------------------------------------------------------------
    def decision_function(self, X) -> np.ndarray:
        """[n, classes] scores; higher is more of the class."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return X @ self.coef_.T + self.intercept_

    def predict(self, X) -> np.ndarray:
        S = self.decision_function(X)
        if self.multi_label_:
            return np.where(S > 0, 1, -1)
        return self.classes_[np.argmax(S, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lbfgs(objective, W: torch.Tensor, b: torch.Tensor, tol: float, max_iter: int) -> int:
    """Minimise `objective(W, b)` in place by L-BFGS with a strong-Wolfe line search; iterations run."""
    optimizer = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        with torch.enable_grad():
            value = objective(W, b)
            value.backward()
        return value.float()

    optimizer.step(closure)
    return int(optimizer.state[optimizer._params[0]].get("n_iter", 0))
