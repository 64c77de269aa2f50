"""`featx evaluate` end to end on fake Caltech and VOC trees, with random weights."""

import json

import numpy as np
import pytest
from sklearn.svm import LinearSVC
from typer.testing import CliRunner

from featx.cli import app
from featx.evaluate.heads import span_coordinates
from tests.fake_datasets import make_caltech, make_voc

# The protocol shrunk to a tree of 6 images per class: 3 training, up to 2 test.
TINY_CALTECH = """
name = "tiny-caltech"
dataset = "caltech101"
[protocol]
splits = 2
seed = 0
n_train = 3
n_test = 2
holdout = 0.34
metric = "mean_class_recall"
[features]
models = ["vgg11"]
weights = "random"
scales = [224]
flip = false
aggregate = "stack"
[head]
C = [0.1, 10.0]
[paper]
results = [{ label = "Net-A", models = ["vgg11"], mean = 99.0, std = 0.1 }]
"""


def run(*args):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    return result


@pytest.fixture(scope="module")
def caltech(tmp_path_factory):
    """A fake Caltech copy, its tiny pipeline, and one evaluation (the others reuse its cache)."""
    tmp = tmp_path_factory.mktemp("caltech")
    make_caltech(tmp / "data" / "caltech101" / "101_ObjectCategories")
    (tmp / "tiny.toml").write_text(TINY_CALTECH)
    # out/ does not exist: featx makes it (issue 13.10). fp32 is asked for explicitly (13.9).
    result = run(
        "--pipeline",
        tmp / "tiny.toml",
        "--root",
        tmp / "data",
        "--cache-dir",
        tmp / "cache",
        "--report",
        tmp / "out" / "report.json",
        "--precision",
        "fp32",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    return tmp, result


def test_caltech_end_to_end_prints_the_table_with_the_weights(caltech):
    _tmp, result = caltech
    out = result.stdout
    assert "Caltech-101: mean class recall, %" in out
    assert "4 classes, 24 images, 2 splits" in out
    assert "weights: random (seed 0)" in out and "far below the paper" in out
    assert "Net-A" in out and "99.0 ± 0.1" in out
    assert "incomplete" in out  # a 4-class copy is not the paper's dataset
    assert "precision: fp32 on cpu (--precision fp32)" in out


def test_caltech_report_has_the_issues_shape(caltech):
    tmp, _ = caltech
    report = json.loads((tmp / "out" / "report.json").read_text())
    assert set(report) >= {"dataset", "metric", "classes", "results", "paper", "config"}
    assert (report["dataset"], report["metric"]) == ("caltech101", "mean_class_recall")
    assert report["classes"] == ["BACKGROUND_Google", "Faces", "Faces_easy", "anchor"]
    (row,) = report["results"]
    assert row["models"] == ["vgg11"] and 0 <= row["mean"] <= 100 and row["std"] is not None
    assert [s["seed"] for s in row["splits"]] == [0, 1]
    for s in row["splits"]:
        # n_train counts all training images, the ones held out to choose C included.
        assert (s["n_train"], s["n_test"], s["n_holdout"]) == (12, 8, 4)
        assert s["C"] in (0.1, 10.0) and set(s["holdout_scores"]) == {"0.1", "10"}
        assert np.mean(list(s["per_class"].values())) == pytest.approx(s["value"])
    assert row["mean"] == pytest.approx(np.mean([s["value"] for s in row["splits"]]))
    assert report["paper"]["results"][0]["mean"] == 99.0
    assert report["config"]["weights"] == "random (seed 0)"
    assert report["config"]["precision"] == "fp32"
    assert [(f["precision"], f["device"]) for f in report["config"]["features"]] == [("fp32", "cpu")]
    assert report["config"]["pipeline"]["protocol"]["n_train"] == 3
    assert (tmp / "out" / "report-net-a-recall.png").stat().st_size > 5000


def test_cached_features_are_reused_and_other_settings_are_not(caltech):
    tmp, _ = caltech
    (cached,) = (tmp / "cache").glob("caltech101-*.parquet")
    again = run(
        "--pipeline",
        tmp / "tiny.toml",
        "--root",
        tmp / "data",
        "--cache-dir",
        tmp / "cache",
        "--no-background",
        "--precision",
        "fp32",
        "--report",
        tmp / "out" / "nobg.json",
        "--quiet",
    )
    assert again.exit_code == 0, again.output
    report = json.loads((tmp / "out" / "nobg.json").read_text())
    assert report["config"]["features"][0]["new_rows"] == 0
    assert report["config"]["features"][0]["file"] == str(cached)
    assert "BACKGROUND_Google" not in report["classes"]


def test_features_file_is_evaluated_without_extracting(caltech):
    tmp, _ = caltech
    (cached,) = (tmp / "cache").glob("caltech101-*.parquet")
    first = json.loads((tmp / "out" / "report.json").read_text())
    result = run(
        "--pipeline",
        tmp / "tiny.toml",
        "--features",
        cached,
        "--cache-dir",
        tmp / "nocache",
        "--report",
        tmp / "out" / "from-file.json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp / "out" / "from-file.json").read_text())
    assert not (tmp / "nocache").exists()
    # Same features, same seeds: the same numbers as the run that extracted them.
    assert report["results"][0]["mean"] == pytest.approx(first["results"][0]["mean"])


def test_solver_is_chosen_per_split_and_overridable(caltech):
    tmp, _ = caltech
    (cached,) = (tmp / "cache").glob("caltech101-*.parquet")
    first = json.loads((tmp / "out" / "report.json").read_text())
    # auto on the paper's sizes: liblinear, as always.
    assert {s["head_solver"] for s in first["results"][0]["splits"]} == {"exact"}
    assert first["config"]["pipeline"]["head"]["solver"] == "auto"
    out = tmp / "out" / "scalable.json"
    pipeline = ("--pipeline", tmp / "tiny.toml", "--features", cached)
    result = run(*pipeline, "--solver", "scalable", "--report", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"]["pipeline"]["head"]["solver"] == "scalable"
    for s in report["results"][0]["splits"]:
        assert s["head_solver"] == "scalable" and s["solver"]["passes"] >= 1
        assert s["C"] in (0.1, 10.0) and (s["n_train"], s["n_test"]) == (12, 8)
    result = run(*pipeline, "--solver", "streamed")
    assert result.exit_code == 2 and "streamed" in result.output


def test_user_errors_are_one_line_and_exit_2(caltech, tmp_path):
    tmp, _ = caltech
    result = run("--dataset", "caltech101", "--weights", "random")
    assert result.exit_code == 2 and "--root is missing" in result.stderr
    result = run("--dataset", "caltech101", "--root", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--download" in result.stderr
    # A report path that cannot be written is refused before any work is done.
    (tmp_path / "file").write_text("")
    result = run("--pipeline", tmp / "tiny.toml", "--root", tmp / "data", "--report", tmp_path / "file" / "r.json")
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    # The shipped protocol needs 31 images per class; the fake tree has 6.
    result = run(
        "--dataset",
        "caltech101",
        "--root",
        tmp / "data",
        "--weights",
        "random",
        "--model",
        "vgg11",
        "--scales",
        "224",
        "--no-flip",
        "--cache-dir",
        tmp / "cache",
        "--quiet",
    )
    assert result.exit_code == 2 and "fewer than n_train + 1 = 31 images" in result.stderr


@pytest.mark.slow
def test_voc_end_to_end_with_two_nets_and_their_fusion(tmp_path):
    make_voc(tmp_path / "data", "2007", {"trainval": 10, "test": 8})
    (tmp_path / "out").mkdir()
    result = run(
        "--dataset",
        "voc2007",
        "--root",
        tmp_path / "data",
        "--weights",
        "random",
        "--model",
        "vgg11",
        "--model",
        "vgg13",
        "--scales",
        "224,256",
        "--no-flip",
        "--cache-dir",
        tmp_path / "cache",
        "--report",
        tmp_path / "out" / "voc.json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "PASCAL VOC 2007: mAP (11-point AP), %" in result.stdout
    assert "vgg11 + vgg13" in result.stdout
    report = json.loads((tmp_path / "out" / "voc.json").read_text())
    assert (report["metric"], report["ap"]) == ("mAP", "voc07_11point")
    assert [r["models"] for r in report["results"]] == [["vgg11"], ["vgg13"], ["vgg11", "vgg13"]]
    (s,) = report["results"][0]["splits"]
    assert (s["n_train"], s["n_test"]) == (10, 8)
    assert s["value"] == pytest.approx(s["voc07_mAP"]) and 0 <= s["area_mAP"] <= 100
    # The unlisted image in JPEGImages was not described.
    assert all(f["dim"] == 4096 for f in report["config"]["features"])
    cached = sorted((tmp_path / "cache").glob("voc2007-*.parquet"))
    assert len(cached) == 2
    from featx.store import read_table

    assert "999999.jpg" not in read_table(cached[0], ["path"]).column("path").to_pylist()
    for name in ("voc-vgg11-ap.png", "voc-vgg11-pr.png", "voc-vgg11-vgg13-ap.png"):
        assert (tmp_path / "out" / name).stat().st_size > 5000


def test_span_coordinates_change_nothing_but_speed():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    X = np.abs(rng.normal(size=(45, 200)) + 3 * np.eye(200)[np.r_[labels, labels[:15]]]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    train, test = X[:30], X[30:]
    Z_train, Z_test = span_coordinates(train, test)
    assert Z_train.shape == (30, 30) and Z_test.shape == (15, 30)
    np.testing.assert_allclose(Z_train @ Z_train.T, train @ train.T, atol=1e-5)
    # Inner products with training rows, all a linear head sees, are kept.
    np.testing.assert_allclose(Z_test @ Z_train.T, test @ train.T, atol=1e-5)
    raw = LinearSVC(C=1.0, tol=1e-8, max_iter=100_000).fit(train, labels)
    spanned = LinearSVC(C=1.0, tol=1e-8, max_iter=100_000).fit(Z_train, labels)
    np.testing.assert_allclose(spanned.decision_function(Z_test), raw.decision_function(test), atol=1e-3)


def test_span_coordinates_survive_duplicate_training_rows():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(12, 50)).astype(np.float32)
    train[5] = train[2]  # a duplicate image: the Gram matrix is singular
    test = rng.normal(size=(4, 50)).astype(np.float32)
    Z_train, Z_test = span_coordinates(train, test)
    np.testing.assert_allclose(Z_train @ Z_train.T, train @ train.T, atol=1e-4)
    np.testing.assert_allclose(Z_test @ Z_train.T, test @ train.T, atol=1e-4)


def test_plots_leave_the_callers_backend_alone(caltech, tmp_path, other_backend):
    import matplotlib

    from featx.evaluate.report import Evaluation, write_report

    tmp, _ = caltech
    report = json.loads((tmp / "out" / "report.json").read_text())
    written = write_report(Evaluation(report), tmp_path / "r.json")
    assert [p.name for p in written] == ["r.json", "r-net-a-recall.png"]
    assert json.loads(written[0].read_text()) == report
    assert matplotlib.get_backend() == other_backend
