"""LinearHead, the scalable torch head: liblinear's objectives and answers, warm starts along the
C grid, rows read piece by piece (in memory or streamed from a feature file) with memory flat in
the row count, scikit-learn's estimator contract."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from featx import store
from featx.evaluate import rows as rows_module
from featx.evaluate.heads import OneVsRest
from featx.evaluate.linear import LinearHead
from featx.evaluate.rows import MatrixRows, StoredRows


def blobs(n=400, d=16, k=4, spread=0.6, seed=0):
    """L2-normalised rows around one centre per class (overlapping: the optimum is not trivial)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = (spread * rng.normal(size=(k, d))[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


def signs(y, classes):
    S = -np.ones((len(y), len(classes)))
    S[np.arange(len(y)), np.searchsorted(classes, y)] = 1
    return S[:, 1:] if len(classes) == 2 else S


def svm_objective(coef, intercept, X, S, C):
    """liblinear's L2-regularised squared hinge, the bias a regularised weight; S = 0 is left out."""
    Z = X.astype(np.float64) @ coef.T + intercept
    return 0.5 * ((coef**2).sum() + (intercept**2).sum()) + C * ((np.maximum(0, 1 - S * Z) * (S != 0)) ** 2).sum()


def logreg_objective(coef, intercept, X, y, C):
    """scikit-learn's: multinomial cross-entropy (binary logistic for two classes), bias free."""
    Z = X.astype(np.float64) @ coef.T + intercept
    if coef.shape[0] == 1:
        s = np.where(y == y.max(), 1.0, -1.0)
        data = np.logaddexp(0, -s * Z[:, 0]).sum()
    else:
        data = (np.log(np.exp(Z - Z.max(1, keepdims=True)).sum(1)) + Z.max(1) - Z[np.arange(len(y)), y]).sum()
    return 0.5 * (coef**2).sum() + C * data


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("C", [0.1, 10.0])
def test_svm_reaches_liblinears_objective_and_answers(k, C):
    X, y = blobs(k=k)
    train, test = slice(0, 300), slice(300, None)
    ref = LinearSVC(C=C, dual=False, tol=1e-10, max_iter=100_000).fit(X[train], y[train])
    ours = LinearHead("svm", C, tol=1e-7).fit(X[train], y[train])
    assert ours.coef_.shape == ref.coef_.shape
    assert ours.decision_function(X[test]).shape == ref.decision_function(X[test]).shape
    S = signs(y[train], ref.classes_)
    want = svm_objective(ref.coef_, ref.intercept_, X[train], S, C)
    assert svm_objective(ours.coef_, ours.intercept_, X[train], S, C) == pytest.approx(want, rel=1e-6)
    np.testing.assert_array_equal(ours.predict(X[test]), ref.predict(X[test]))


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("C", [0.1, 10.0])
def test_logreg_reaches_scikit_learns_objective_and_answers(k, C):
    X, y = blobs(k=k, seed=1)
    train, test = slice(0, 300), slice(300, None)
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(X[train], y[train])
    ours = LinearHead("logreg", C, tol=1e-7).fit(X[train], y[train])
    assert ours.coef_.shape == ref.coef_.shape
    want = logreg_objective(ref.coef_, ref.intercept_, X[train], y[train], C)
    assert logreg_objective(ours.coef_, ours.intercept_, X[train], y[train], C) == pytest.approx(want, rel=1e-6)
    np.testing.assert_array_equal(ours.predict(X[test]), ref.predict(X[test]))
    np.testing.assert_allclose(ours.decision_function(X[test]), ref.decision_function(X[test]), atol=1e-3 * (1 + C))


@pytest.mark.parametrize("loss", ["svm", "logreg"])
def test_multi_label_leaves_difficult_rows_out_as_one_vs_rest_does(loss):
    """VOC's 0: that row is out of that class's loss. Per class, the objective and answers of
    LinearSVC / LogisticRegression on that class's rows, as featx's OneVsRest fits them."""
    X, y = blobs(n=360, k=3, seed=2)
    Y = np.where(np.eye(3)[y] > 0, 1, -1)
    Y[np.random.default_rng(3).random(Y.shape) < 0.1] = 0  # some "difficult" entries
    Y[:, 2] = np.where(Y[:, 2] > 0, 0, Y[:, 2])  # class 2: no positive left
    C = 1.0
    ours = LinearHead(loss, C, tol=1e-7).fit(X[:300], Y[:300])
    for k in (0, 1):
        rows = Y[:300, k] != 0
        y_k = (Y[:300, k][rows] > 0).astype(int)
        if loss == "svm":
            est = LinearSVC(C=C, dual=False, tol=1e-10, max_iter=100_000).fit(X[:300][rows], y_k)
            want = svm_objective(est.coef_, est.intercept_, X[:300], Y[:300, k : k + 1], C)
            got = svm_objective(ours.coef_[k : k + 1], ours.intercept_[k : k + 1], X[:300], Y[:300, k : k + 1], C)
        else:
            est = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(X[:300][rows], y_k)
            want = logreg_objective(est.coef_, est.intercept_, X[:300][rows], y_k, C)
            got = logreg_objective(ours.coef_[k : k + 1], ours.intercept_[k : k + 1], X[:300][rows], y_k, C)
        assert got == pytest.approx(want, rel=1e-6)
        np.testing.assert_array_equal(ours.predict(X[300:])[:, k], np.where(est.predict(X[300:]) > 0, 1, -1))
    ref = OneVsRest(loss, C).fit(X[:300], Y[:300])
    # A class with one side only: the constant score OneVsRest gives it.
    np.testing.assert_array_equal(ours.decision_function(X[300:])[:, 2], ref.decision_function(X[300:])[:, 2])


def test_warm_start_walks_the_grid_to_the_cold_solutions_in_fewer_passes():
    X, y = blobs(n=500, k=5, seed=4)
    S = signs(y, np.arange(5))
    walked = LinearHead("svm", tol=1e-6, warm_start=True)
    passes = {"warm": 0, "cold": 0}
    for C in (0.01, 0.1, 1.0, 10.0):
        walked.set_params(C=C).fit(X, y)
        cold = LinearHead("svm", C, tol=1e-6).fit(X, y)
        passes["warm"] += walked.n_passes_
        passes["cold"] += cold.n_passes_
        assert svm_objective(walked.coef_, walked.intercept_, X, S, C) == pytest.approx(
            svm_objective(cold.coef_, cold.intercept_, X, S, C), rel=1e-6
        )
        np.testing.assert_array_equal(walked.predict(X), cold.predict(X))
    assert passes["warm"] < passes["cold"]


def test_a_matrixs_rows_are_fit_without_copying_them_as_their_copy_is():
    X, y = blobs(n=500, seed=5)
    index = np.random.default_rng(0).permutation(500)[:350]
    viewed = LinearHead("svm", 1.0, tol=1e-6).fit(MatrixRows(X, index), y[index])
    copied = LinearHead("svm", 1.0, tol=1e-6).fit(X[index], y[index])
    np.testing.assert_allclose(viewed.coef_, copied.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(viewed.decision_function(MatrixRows(X, index)), copied.decision_function(X[index]))


def feature_file(path, X, y):
    prov = {"settings_hash": "0" * 16, "dim": X.shape[1], "model": "vgg16", "descriptor": "generated"}
    schema = store.feature_schema(X.shape[1], prov)
    paths = [f"{c}/{i:05d}.jpg" for i, c in enumerate(y)]
    store.write_atomic(store.rows_table(schema, paths, [str(c) for c in y], [1] * len(y), [1] * len(y), X), path)
    return path


@pytest.mark.parametrize("loss", ["svm", "logreg"])
def test_a_streamed_fit_follows_the_in_memory_fit(tmp_path, monkeypatch, loss):
    """Rows read from the feature file for every pass, 64 at a time and in the file's order (not
    the rows' own): the in-memory fit's solution, and its test accuracy within a point."""
    monkeypatch.setattr(rows_module, "piece_rows", lambda dim: 64)
    X, y = blobs(n=1000, d=24, k=6, spread=0.4, seed=6)
    path = feature_file(tmp_path / "f.parquet", X, y)
    order = np.random.default_rng(1).permutation(1000)  # row i here is the file's row order[i]
    positions = np.empty(1000, np.int64)
    positions[order] = np.arange(1000)
    stored = StoredRows(path, positions, X.shape[1])
    train, test = np.arange(800), np.arange(800, 1000)
    streamed = LinearHead(loss, 1.0, tol=1e-6).fit(stored.take(train), y[order][train])
    memory = LinearHead(loss, 1.0, tol=1e-6).fit(X[order][train], y[order][train])
    np.testing.assert_allclose(streamed.coef_, memory.coef_, rtol=1e-3, atol=1e-3)
    accuracy = [np.mean(h.predict(stored.take(test)) == y[order][test]) for h in (streamed, memory)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.01
    np.testing.assert_array_equal(stored.take(test).matrix(), X[order][test])


def test_rows_kept_on_the_device_give_the_fit_read_piece_by_piece(monkeypatch):
    """On a GPU the rows are copied there once when they fit; the same fit (tried here on the
    CPU, the device's free memory stubbed), its rows read once in all."""
    monkeypatch.setattr(rows_module, "piece_rows", lambda dim: 64)
    X, y = blobs(n=400, seed=7)
    reads = []

    class Counted(MatrixRows):
        def pieces(self):
            reads.append(1)
            return super().pieces()

    piecewise = LinearHead("logreg", 1.0, tol=1e-6).fit(Counted(X), y)
    assert len(reads) == piecewise.n_passes_
    monkeypatch.setattr("featx.evaluate.linear._free_memory", lambda device: 1 << 40)
    reads.clear()
    resident = LinearHead("logreg", 1.0, tol=1e-6).fit(Counted(X), y)
    assert len(reads) == 1 < resident.n_passes_
    np.testing.assert_array_equal(resident.coef_, piecewise.coef_)


class CountingRows:
    """`n` rows made a piece at a time on demand, counting the pieces alive at once."""

    def __init__(self, n: int, d: int = 16, k: int = 4, piece: int = 50):
        self.n, self.dim, self.k, self.piece = n, d, k, piece
        self.centres = np.random.default_rng(0).normal(size=(k, d))
        self.alive = self.most_alive = self.made = 0

    def __len__(self):
        return self.n

    def labels(self):
        return np.arange(self.n) % self.k

    def _freed(self):
        self.alive -= 1

    def pieces(self):
        for start in range(0, self.n, self.piece):
            where = np.arange(start, min(start + self.piece, self.n))
            rng = np.random.default_rng(start)
            X = (0.7 * self.centres[where % self.k] + rng.normal(size=(len(where), self.dim))).astype(np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            self.alive += 1
            self.made += 1
            self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(X, self._freed)
            yield where, X


@pytest.mark.parametrize("loss", ["svm", "logreg"])
def test_memory_of_a_streamed_fit_does_not_grow_with_the_rows(monkeypatch, loss):
    """One piece at a time (and the next being made), whatever the row count; nothing kept of
    the rows after the fit but the weights."""
    monkeypatch.setattr(rows_module, "is_rows", lambda X: True)
    monkeypatch.setattr("featx.evaluate.linear.is_rows", lambda X: True)
    seen = {}
    for n in (400, 1600):
        source = CountingRows(n)
        head = LinearHead(loss, 1.0, tol=1e-4).fit(source, source.labels())
        assert source.made == head.n_passes_ * n // source.piece  # every pass read every row once
        seen[n] = source.most_alive
        assert source.alive == 0
        assert all(v.size <= 16 * 4 for v in vars(head).values() if isinstance(v, np.ndarray))
    assert seen[400] == seen[1600] <= 2


def test_a_fit_cut_short_says_so():
    X, y = blobs(n=300, k=4, seed=8)
    with pytest.warns(ConvergenceWarning, match="stopped after [23] iterations before reaching tol 1e-08"):
        head = LinearHead("svm", 100.0, tol=1e-8, max_iter=3).fit(X, y)
    assert not head.converged_ and head.n_iter_ <= 3
    assert LinearHead("svm", 0.1).fit(X, y).converged_


@parametrize_with_checks([LinearHead(), LinearHead("logreg")])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)
