"""The one protocol runner: held-out C, the solver per split, fusion, and what a split measures,
as featx evaluate, the VOC action experiment and featx probe read it."""

from typing import ClassVar

import numpy as np
import pytest
from sklearn.svm import LinearSVC

from featx.downstream.labelled import Labelled
from featx.downstream.probe import run_probe, split_scores
from featx.evaluate import protocol
from featx.evaluate import run as ev
from featx.evaluate.datasets import DatasetIndex
from featx.evaluate.pipeline import builtin_pipeline
from featx.evaluate.protocol import Head, Outcome, Protocol, ap_record, class_record, fuse
from featx.evaluate.splits import Split, caltech_splits


def run_split(pipeline, index, X, split, jobs=None) -> dict:
    """One split of `featx evaluate`: fitted by the runner, recorded as the report records it."""
    outcome = protocol.fit_split(
        X, index.labels, split, pipeline.protocol, pipeline.head, len(index.classes), jobs=jobs
    )
    return ev.split_record(pipeline, index.classes, outcome)


def _synthetic(n_classes=4, per_class=12, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    X = (rng.normal(size=(len(labels), dim)) + 2 * np.eye(dim)[labels]).astype(np.float32)
    X[:, -1] = np.arange(len(labels))  # the row id, to see which rows a head is fit on
    index = DatasetIndex(
        name="caltech101",
        image_dir=None,
        paths=tuple(map(str, range(len(labels)))),
        classes=tuple("abcd"[:n_classes]),
        labels=labels,
    )
    return index, X


class SpySVC(LinearSVC):
    """A LinearSVC that records which rows (by the id in the last column) it is fit on."""

    fits: ClassVar[list] = []

    def fit(self, X, y):
        SpySVC.fits.append(set(X[:, -1].astype(int)))
        return super().fit(X, y)


def test_c_is_never_chosen_on_test_data(monkeypatch):
    index, X = _synthetic()
    pipeline = builtin_pipeline("caltech101").override(models=["vgg11"])
    (split,) = caltech_splits(index.labels, n_train=8, n_test=4, splits=1, seed=0)
    SpySVC.fits = []
    monkeypatch.setattr(protocol, "make_head", lambda name, random_state=0: SpySVC(random_state=random_state))
    record = run_split(pipeline, index, X, split)
    train, test = set(split.train), set(split.test)
    # One fit per C on the same 80% of the training rows, then the refit on all of them.
    assert len(SpySVC.fits) == len(pipeline.head.C) + 1
    assert all(rows < train and not rows & test for rows in SpySVC.fits[:-1])
    assert SpySVC.fits[-1] == train
    # And the outcome does not move when the test rows are replaced by noise and their
    # labels shuffled.
    noisy = X.copy()
    noisy[split.test, :-1] = np.random.default_rng(1).normal(size=(len(split.test), X.shape[1] - 1)) * 100
    labels = index.labels.copy()
    labels[split.test] = np.random.default_rng(2).permutation(labels[split.test])
    poisoned = run_split(pipeline, DatasetIndex(**{**index.__dict__, "labels": labels}), noisy, split)
    assert poisoned["C"] == record["C"]
    assert poisoned["holdout_scores"] == record["holdout_scores"]
    assert poisoned["n_train"] == record["n_train"] == 32


def test_late_fusion_stacks_and_renormalises():
    a = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    b = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    fused = fuse([a, b])
    assert fused.shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(fused, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(fused[0], np.array([1, 0, 0, 1]) / np.sqrt(2), rtol=1e-6)
    # "blocks": each block stays L2-normalised, the stack is left as it is (norm sqrt(2)).
    np.testing.assert_array_equal(fuse([a, b], "blocks"), np.hstack([a, b]))
    assert fuse([a]) is a


def test_parallel_grid_gives_the_same_choice():
    index, X = _synthetic(per_class=20)
    pipeline = builtin_pipeline("caltech101").override(models=["vgg11"])
    (split,) = caltech_splits(index.labels, n_train=12, n_test=8, splits=1, seed=0)
    one = run_split(pipeline, index, X, split)
    two = run_split(pipeline, index, X, split, jobs=2)
    assert (one["C"], one["holdout_scores"], one["value"]) == (two["C"], two["holdout_scores"], two["value"])


class SolverSpySVC(LinearSVC):
    """A LinearSVC that records the liblinear solver each fit runs (documented rule of "auto")."""

    solvers: ClassVar[list] = []

    def fit(self, X, y):
        dual = self.dual if isinstance(self.dual, bool) else X.shape[0] < X.shape[1]
        SolverSpySVC.solvers.append(dual)
        return super().fit(X, y)


def test_refit_runs_the_solver_the_held_out_selection_ran(monkeypatch):
    """Fewer training images than dimensions: the span coordinates are square, the held-out
    fits have fewer rows than columns; every fit of a split must still run one solver."""
    index, X = _synthetic(per_class=12, dim=60)
    pipeline = builtin_pipeline("caltech101").override(models=["vgg11"])
    (split,) = caltech_splits(index.labels, n_train=8, n_test=4, splits=1, seed=0)
    SolverSpySVC.solvers = []
    monkeypatch.setattr(protocol, "make_head", lambda name, random_state=0: SolverSpySVC(random_state=random_state))
    record = run_split(pipeline, index, X, split)
    assert len(SolverSpySVC.solvers) == len(pipeline.head.C) + 1
    # 32 training images < 60 dimensions: liblinear's dual, as without the span coordinates.
    assert set(SolverSpySVC.solvers) == {True}
    assert record["solver"] == {"dual": True}


# -- one hand-computed case, read by every caller ------------------------------------------


def _outcome(truth, scores) -> Outcome:
    fit = {"seed": 7, "n_train": 10, "n_test": len(truth), "C": 1.0}
    return Outcome(Split(7, np.arange(10), np.arange(10, 10 + len(truth))), fit, np.asarray(truth), np.asarray(scores))


# Five test images of classes a, a, b, b, c; predicted a, b, b, b, a (the highest score).
SINGLE = _outcome(
    [0, 0, 1, 1, 2],
    [[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.7, 0.2], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4]],
)
# Two classes over four images; y has no positive (AP undefined). Ranked by x's scores: row 3
# (0: ignored), row 0 (hit), row 1 (miss), row 2 (hit): precision 1 at recall 1/2, 2/3 at 1.
MULTI = _outcome([[1, -1], [-1, -1], [1, -1], [0, -1]], [[0.9, 0.0], [0.8, 0.0], [0.3, 0.0], [0.95, 0.0]])
AREA = 0.5 * 1 + 0.5 * 2 / 3  # area under the interpolated curve
ELEVEN = (6 * 1 + 5 * 2 / 3) / 11  # recall >= 0, 0.1, ..., 0.5 reach precision 1; 0.6 ... 1 reach 2/3


def test_what_a_single_label_split_measured():
    r = class_record(SINGLE, ("a", "b", "c"))
    assert r["accuracy"] == pytest.approx(60)
    assert r["mean_class_recall"] == pytest.approx((50 + 100 + 0) / 3)
    assert {c: v["recall"] for c, v in r["per_class"].items()} == pytest.approx({"a": 50, "b": 100, "c": 0})
    assert r["per_class"]["a"]["precision"] == pytest.approx(50)
    assert r["per_class"]["b"]["precision"] == pytest.approx(200 / 3)
    assert r["per_class"]["c"]["precision"] is None  # never predicted: nothing claimed
    assert "top5_accuracy" not in r  # 3 classes


def test_evaluate_action_and_probe_read_a_split_alike():
    # Caltech (featx evaluate): mean class recall, recall per class.
    caltech = builtin_pipeline("caltech101")
    record = ev.split_record(caltech, ("a", "b", "c"), SINGLE)
    assert record["value"] == pytest.approx(50)
    assert record["per_class"] == pytest.approx({"a": 50, "b": 100, "c": 0})
    assert (record["seed"], record["C"]) == (7, 1.0)
    # featx probe: the same numbers under its own keys.
    probed = split_scores(SINGLE, ("a", "b", "c"))
    assert probed["mean_class_recall"] == record["value"] and probed["accuracy"] == pytest.approx(60)
    # Multi-label: VOC2007 reports the 11-point AP, VOC2012 and the action experiment the area.
    voc07 = ev.split_record(builtin_pipeline("voc2007"), ("x", "y"), MULTI)
    assert voc07["value"] == pytest.approx(100 * ELEVEN)
    assert (voc07["voc07_mAP"], voc07["area_mAP"]) == pytest.approx((100 * ELEVEN, 100 * AREA))
    assert voc07["per_class"]["x"] == pytest.approx({"voc07_ap": 100 * ELEVEN, "area_ap": 100 * AREA})
    assert voc07["per_class"]["y"] == {"voc07_ap": None, "area_ap": None}
    action = ap_record(MULTI, ("x", "y"), builtin_pipeline("voc2012-action").protocol.metric)
    assert action["value"] == pytest.approx(100 * AREA)
    multi = split_scores(MULTI, ("x", "y"))
    assert multi["mAP"] == pytest.approx(100 * AREA)
    assert multi["per_class"] == {"x": {"n_test": 2, "ap": pytest.approx(100 * AREA)}, "y": {"n_test": 0, "ap": None}}


def test_probe_and_evaluate_fit_a_split_the_same_way():
    index, X = _synthetic(per_class=12)
    X = X[:, :-1]  # no row id
    pipeline = builtin_pipeline("caltech101").override(models=["vgg11"], splits=1)
    (split,) = caltech_splits(index.labels, n_train=8, n_test=4, splits=1, seed=0)
    record = run_split(pipeline, index, X, split)
    data = Labelled(np.array(index.paths, dtype=object), X, index.classes, index.labels, False, {}, "x")
    probed = run_probe(data, Protocol(splits=1, n_train=8), pipeline.head).report["splits"][0]
    assert (probed["C"], probed["holdout_scores"], probed["solver"]) == (
        record["C"],
        record["holdout_scores"],
        record["solver"],
    )
    assert probed["mean_class_recall"] == record["value"] and probed["n_test"] == record["n_test"] == 16


def test_the_protocol_checks_itself():
    with pytest.raises(ValueError, match="--splits 0 must be at least 1"):
        Protocol(splits=0)
    with pytest.raises(ValueError, match="--test-size 1.5"):
        Protocol(test_size=1.5)
    Protocol(n_train=5, test_size=1.5)  # K per class: the test fraction is not used
    with pytest.raises(ValueError, match="--train-per-class \\(n_train\\) 0"):
        Protocol(n_train=0)
    with pytest.raises(ValueError, match="stack_norm 'both'"):
        Protocol(stack_norm="both")
    with pytest.raises(ValueError, match="unknown --head 'knn'"):
        Head("knn")
    assert Head(C=[1, 10]).C == (1.0, 10.0)
