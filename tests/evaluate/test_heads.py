"""Heads: scikit-learn's estimator contract, C chosen on held-out training rows, VOC's 0 ignored."""

from typing import ClassVar

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from featx.evaluate import heads
from featx.evaluate.heads import HeldOutC, OneVsRest, make_head


@parametrize_with_checks([HeldOutC(LinearSVC(), Cs=(0.1, 1.0), scoring="accuracy")])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


class Spy(ClassifierMixin, BaseEstimator):
    """Records the rows it is fit on; its held-out score prefers C = 1."""

    seen: ClassVar[list] = []

    def __init__(self, C=1.0):
        self.C = C

    def fit(self, X, y):
        Spy.seen.append((self.C, X[:, 0].copy()))
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        # Right everywhere for C = 1, wrong everywhere otherwise.
        truth = np.where(X[:, 1] > 0, self.classes_[1], self.classes_[0])
        return truth if self.C == 1.0 else np.where(X[:, 1] > 0, self.classes_[0], self.classes_[1])


def _two_class_data(n=50):
    X = np.zeros((n, 2), np.float32)
    X[:, 0] = np.arange(n)  # row id, so the spy can tell which rows it saw
    X[:, 1] = np.where(np.arange(n) % 2, 1.0, -1.0)
    y = np.where(np.arange(n) % 2, "b", "a")
    return X, y


def test_c_is_chosen_on_the_held_out_part_then_refit_on_all():
    Spy.seen = []
    X, y = _two_class_data()
    est = HeldOutC(Spy(), Cs=(0.1, 1.0, 10.0), holdout=0.2, random_state=0).fit(X, y)
    assert est.C_ == 1.0
    assert est.scores_ == {0.1: 0.0, 1.0: 1.0, 10.0: 0.0}
    grid_fits, refit = Spy.seen[:3], Spy.seen[3]
    held_out = set(range(50)) - set(grid_fits[0][1].astype(int))
    assert len(held_out) == 10 == est.n_holdout_
    for _, rows in grid_fits:
        assert not held_out & set(rows.astype(int))
    assert refit[0] == 1.0 and len(refit[1]) == 50


def test_ties_go_to_the_smallest_c():
    X = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = np.repeat([0, 1], 20)
    X[:, 0] += 4 * y  # separable: every C scores 1.0
    est = HeldOutC(LinearSVC(), Cs=(10.0, 0.1, 1.0)).fit(X, y)
    assert est.C_ == 0.1


def test_single_c_skips_the_search():
    X, y = _two_class_data()
    est = HeldOutC(LinearSVC(), Cs=(1.0,)).fit(X, y)
    assert est.C_ == 1.0 and est.scores_ == {}


def test_bad_grid_and_head_are_refused():
    X, y = _two_class_data()
    with pytest.raises(ValueError, match="positive values"):
        HeldOutC(LinearSVC(), Cs=(0.0, 1.0)).fit(X, y)
    with pytest.raises(ValueError, match="choose one of svm, logreg"):
        make_head("knn")


@pytest.mark.parametrize("name", ["svm", "logreg"])
def test_heads_separate_easy_classes(name):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    X = (rng.normal(size=(90, 8)) + 3 * np.eye(8)[y]).astype(np.float32)
    est = HeldOutC(make_head(name), scoring="mean_class_recall").fit(X, y)
    assert (est.predict(X) == y).mean() > 0.95


def test_one_vs_rest_leaves_difficult_rows_out(monkeypatch):
    sizes = []

    class Count(LinearSVC):
        def fit(self, X, y):
            sizes.append((len(X), int(y.sum())))
            return super().fit(X, y)

    monkeypatch.setattr(heads, "make_head", lambda name, C, random_state: Count(C=C))
    X = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    Y = -np.ones((10, 2), int)
    Y[:3, 0], Y[3:5, 0] = 1, 0  # class 0: 3 positives, 2 difficult-only
    Y[5:, 1] = 1
    scores = OneVsRest().fit(X, Y).decision_function(X)
    assert sizes == [(8, 3), (10, 5)]
    assert scores.shape == (10, 2)


def test_one_vs_rest_without_positives_scores_constant():
    X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    Y = np.array([[1, -1], [-1, -1], [1, -1], [-1, 0], [1, -1], [-1, -1]])
    scores = OneVsRest().fit(X, Y).decision_function(X)
    assert np.all(scores[:, 1] == -1.0)


def test_a_warm_walk_needs_an_estimator_that_warm_starts():
    X, y = _two_class_data()
    with pytest.raises(ValueError, match="LinearSVC has no warm_start parameter"):
        HeldOutC(LinearSVC(), warm_start=True).fit(X, y)
