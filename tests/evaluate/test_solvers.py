"""Which solver fits a split: liblinear for the paper's sizes, the torch head above them, streamed
when the features exceed the memory budget; chosen per split, recorded in the report, overridable."""

from __future__ import annotations

import numpy as np
import pytest

from featx.downstream.labelled import Labelled
from featx.downstream.probe import run_probe
from featx.evaluate import protocol, solvers
from featx.evaluate.heads import HeldOutC
from featx.evaluate.linear import LinearHead
from featx.evaluate.pipeline import builtin_pipeline
from featx.evaluate.protocol import GRID_TOL, REFIT_TOL, Head, Protocol
from featx.evaluate.solvers import EXACT_MAX_ROWS, choose_solver, keep_on_disk, memory_budget
from featx.evaluate.splits import caltech_splits


def test_auto_keeps_liblinear_for_every_paper_protocol_and_scales_above():
    assert choose_solver("auto", 257 * 60, stored=False) == "exact"  # Caltech-256, 60 per class
    assert choose_solver("auto", 11_540, stored=False) == "exact"  # VOC2012 trainval
    assert choose_solver("auto", EXACT_MAX_ROWS, stored=False) == "exact"
    assert choose_solver("auto", EXACT_MAX_ROWS + 1, stored=False) == "scalable"
    assert choose_solver("auto", 1_000_000, stored=True) == "streamed"
    # Asked for: as asked.
    assert choose_solver("exact", 1_000_000, stored=False) == "exact"
    assert choose_solver("scalable", 10, stored=False) == "scalable"
    assert choose_solver("streamed", 10, stored=True) == "streamed"
    with pytest.raises(ValueError, match="--solver streamed reads the features from their file"):
        choose_solver("streamed", 10, stored=False)
    with pytest.raises(ValueError, match="unknown --solver 'fast'; choose one of auto, exact, scalable, streamed"):
        Head(solver="fast")


def test_features_stay_on_disk_when_the_matrix_exceeds_the_memory_budget(monkeypatch):
    assert 0 < memory_budget() < 1 << 50
    monkeypatch.setattr(solvers, "memory_budget", lambda: 4 * 1000 * 4096)
    assert not keep_on_disk("auto", 1000, 4096) and keep_on_disk("auto", 1001, 4096)
    assert keep_on_disk("scalable", 1001, 4096) and not keep_on_disk("scalable", 1000, 4096)
    assert not keep_on_disk("exact", 10**6, 4096)  # liblinear needs the matrix: asked, it gets it
    assert keep_on_disk("streamed", 10, 4)


def _problem(per_class=40, n_classes=4, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    X = (0.8 * rng.normal(size=(n_classes, dim))[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


def test_each_split_records_its_solver_and_auto_switches_by_size(monkeypatch):
    X, y = _problem()
    (split,) = caltech_splits(y, n_train=30, n_test=10, splits=1, seed=0)
    p, head = Protocol(splits=1, n_train=30), Head()
    exact = protocol.fit_split(X, y, split, p, head, 4)
    assert exact.fit["head_solver"] == "exact" and exact.fit["solver"] == {"dual": False}
    monkeypatch.setattr(solvers, "EXACT_MAX_ROWS", 100)  # 120 training rows: above it
    scalable = protocol.fit_split(X, y, split, p, head, 4)
    assert scalable.fit["head_solver"] == "scalable"
    facts = scalable.fit["solver"]
    assert facts["device"] == "cpu" and facts["threads"] >= 1 and facts["passes"] >= facts["iterations"] >= 1
    assert facts["holdout_passes"] >= len(head.C)  # the walk: at least a pass per C
    assert (facts["tol"], facts["holdout_tol"]) == (REFIT_TOL, GRID_TOL)
    # Both fit the same objective: the same C, and (nearly) the same answers.
    assert scalable.fit["C"] == exact.fit["C"]
    assert np.mean(scalable.predicted == exact.predicted) >= 0.97
    assert set(scalable.fit["holdout_scores"]) == set(exact.fit["holdout_scores"])


def test_the_probe_report_says_which_solver_was_asked_and_which_ran():
    X, y = _problem(per_class=15)
    data = Labelled(np.array([f"{i}.jpg" for i in range(len(y))], dtype=object), X, tuple("abcd"), y, False, {}, "x")
    report = run_probe(data, Protocol(splits=2), Head(solver="scalable")).report
    assert report["protocol"]["solver"] == "scalable"
    assert [s["head_solver"] for s in report["splits"]] == ["scalable", "scalable"]


@pytest.mark.parametrize("loss", ["svm", "logreg"])
def test_a_warm_walk_with_a_looser_held_out_tol_chooses_the_c_of_tight_cold_fits(loss):
    X, y = _problem(per_class=60, n_classes=5, dim=32, seed=1)
    walked = HeldOutC(LinearHead(loss, tol=REFIT_TOL), warm_start=True, grid_params={"tol": GRID_TOL}).fit(X, y)
    cold = HeldOutC(LinearHead(loss, tol=1e-7)).fit(X, y)
    assert walked.C_ == cold.C_
    assert walked.scores_ == pytest.approx(cold.scores_, abs=0.02)
    assert walked.estimator_.tol == REFIT_TOL  # the refit at the refit's tolerance


def test_pipelines_carry_the_solver_and_evaluate_refuses_streaming():
    from featx.evaluate.pipeline import parse_pipeline

    p = parse_pipeline({"dataset": "caltech101", "protocol": {"n_train": 30}, "head": {"solver": "scalable"}})
    assert p.head.solver == "scalable" and p.to_dict()["head"]["solver"] == "scalable"
    assert builtin_pipeline("caltech101").head.solver == "auto"
    assert builtin_pipeline("voc2007").override(solver="exact").head.solver == "exact"
    with pytest.raises(ValueError, match="solver 'streamed'.*featx evaluate holds them in memory"):
        builtin_pipeline("caltech101").override(solver="streamed")
    with pytest.raises(ValueError, match=r"\[head\].*unknown --solver 'quick'"):
        parse_pipeline({"dataset": "caltech101", "protocol": {"n_train": 30}, "head": {"solver": "quick"}})
