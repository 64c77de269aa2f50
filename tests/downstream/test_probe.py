"""`featx probe`: the paper's protocol on a user's labelled data (generated features; one small CLI run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from featx import store
from featx.cli import app
from featx.downstream.labelled import load_labelled
from featx.downstream.probe import make_splits, probe
from featx.downstream.probe_report import write_predictions, write_report
from featx.errors import BadInput
from featx.evaluate.protocol import Protocol

runner = CliRunner()


def feature_file(path: Path, y: list[str], X: np.ndarray, paths: list[str] | None = None) -> Path:
    """A feature file as featx extract writes it, from given rows (no net)."""
    X = np.asarray(X, np.float32)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    paths = paths or [f"{label}/{i:03d}.jpg" for i, label in enumerate(y)]
    prov = {
        "settings_hash": "0" * 16,
        "dim": X.shape[1],
        "model": "vgg16",
        "descriptor": "generated",
        "weights": {"kind": "random", "seed": 0},
    }
    schema = store.feature_schema(X.shape[1], prov)
    store.write_atomic(store.rows_table(schema, paths, y, [1] * len(y), [1] * len(y), X), path)
    return path


def clusters(n_classes: int, per_class, d: int = 32, spread: float = 3.0, seed: int = 0):
    """Labels and rows: one Gaussian blob per class (`spread` apart; 0 gives inseparable noise)."""
    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, list) else [per_class] * n_classes
    centres = spread * rng.standard_normal((n_classes, d))
    y = [f"class{c:03d}" for c, n in enumerate(counts) for _ in range(n)]
    X = np.concatenate([centres[c] + rng.standard_normal((n, d)) for c, n in enumerate(counts)])
    return y, X


def test_separable_classes_are_recalled_and_shuffled_labels_give_chance(tmp_path):
    y, X = clusters(8, 15)
    good = probe(feature_file(tmp_path / "a.parquet", y, X), splits=3)
    assert good.report["metrics"]["mean_class_recall"]["mean"] >= 95
    assert good.report["metrics"]["top5_accuracy"]["mean"] == 100
    shuffled = list(np.random.default_rng(1).permutation(y))
    chance = probe(feature_file(tmp_path / "b.parquet", shuffled, X), splits=3)
    # 8 classes: chance is 12.5%; a probe that leaked test labels would be far above it.
    assert chance.report["metrics"]["mean_class_recall"]["mean"] < 30


def test_predictions_recompute_the_report_exactly(tmp_path):
    y, X = clusters(7, 10, spread=0.6, seed=2)  # overlapping: errors to count
    result = probe(feature_file(tmp_path / "f.parquet", y, X), splits=2, head="logreg")
    pred = pq.read_table(write_predictions(result, tmp_path / "p.parquet")).to_pandas()
    assert list(pred.columns[:5]) == ["path", "split", "label", "predicted", "score"]
    splits = result.report["splits"]
    assert sorted(pred["split"].unique()) == [s["seed"] for s in splits]
    for s in splits:
        p = pred[pred["split"] == s["seed"]]
        assert len(p) == s["n_test"]
        assert 100 * np.mean(p["label"] == p["predicted"]) == s["accuracy"]
        recalls = [np.mean(p[p["label"] == c]["predicted"] == c) for c in sorted(set(p["label"]))]
        assert 100 * np.mean(recalls) == pytest.approx(s["mean_class_recall"], abs=1e-12)
        top5 = np.mean([lab in top for lab, top in zip(p["label"], p["top5"])])
        assert 100 * top5 == s["top5_accuracy"]
        for c, v in s["per_class"].items():
            claimed = p[p["predicted"] == c]
            expected = 100 * np.mean(claimed["label"] == c) if len(claimed) else None
            assert (
                v["precision"] == pytest.approx(expected, abs=1e-12) if expected is not None else v["precision"] is None
            )
    assert result.report["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean([s["accuracy"] for s in splits]))
    assert 0 < result.report["metrics"]["accuracy"]["mean"] < 100


def test_few_shot_takes_exactly_k_per_class_per_seed(tmp_path):
    y, X = clusters(4, [6, 9, 12, 7])
    data = load_labelled(feature_file(tmp_path / "f.parquet", y, X))
    splits = make_splits(data, Protocol(splits=3, n_train=5, seed=4))
    for s in splits:
        assert np.bincount(data.y[s.train]).tolist() == [5, 5, 5, 5]
        assert set(s.train).isdisjoint(s.test) and len(s.train) + len(s.test) == len(y)
    assert [s.seed for s in splits] == [4, 5, 6]
    assert not np.array_equal(splits[0].train, splits[1].train)
    result = probe(tmp_path / "f.parquet", splits=2, train_per_class=5)
    assert [s["n_train"] for s in result.report["splits"]] == [20, 20]


def test_stratified_test_fraction_tests_every_class(tmp_path):
    y, X = clusters(3, [3, 10, 20])
    data = load_labelled(feature_file(tmp_path / "f.parquet", y, X))
    (s,) = make_splits(data, Protocol(splits=1, test_size=0.2))
    assert np.bincount(data.y[s.test]).tolist() == [1, 2, 4]


def test_small_classes_are_named_and_dropped_only_when_asked(tmp_path):
    y, X = clusters(4, [8, 8, 2, 1])
    f = feature_file(tmp_path / "f.parquet", y, X)
    with pytest.raises(
        BadInput, match=r"2 classes have fewer than 3 images.*class002 \(2\), class003 \(1\).*drop_small_classes=True"
    ):
        probe(f)
    result = probe(f, drop_small_classes=True, splits=1)
    assert result.report["classes"] == ["class000", "class001"]
    assert any("left out 2 classes" in n for n in result.report["notes"])
    with pytest.raises(BadInput, match="--train-per-class 8 needs 8 to train and 1 to test"):
        probe(f, train_per_class=8, drop_small_classes=False)


def test_labels_file_for_a_flat_folder_and_multi_label(tmp_path):
    y, X = clusters(3, 10, seed=3)
    flat = [f"img{i:03d}.jpg" for i in range(len(y))]
    f = feature_file(tmp_path / "f.parquet", [None] * len(y), X, paths=flat)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"path": flat, "label": y}).to_csv(csv, index=False)
    single = probe(f, labels=csv, splits=1)
    assert single.report["classes"] == sorted(set(y)) and single.report["n_images"] == 30
    # Multi-label: every image also carries "any"; the cluster labels stay separable.
    multi = tmp_path / "labels.parquet"
    pd.DataFrame({"path": flat, "labels": [[c, "any"] if i % 2 else [c] for i, c in enumerate(y)]}).to_parquet(multi)
    result = probe(f, labels=multi, splits=2)
    assert result.report["task"] == "multi-label" and "mAP" in result.report["metrics"]
    for c in sorted(set(y)):
        assert result.report["per_class"][c]["ap"] > 90
    p = result.predictions
    assert {"path", "split", "label", "predicted", "score"} <= set(p.columns)
    from featx.evaluate.metrics import voc_ap

    classes = result.report["classes"]
    first = p[p["split"] == result.report["splits"][0]["seed"]]
    k = classes.index("class000")
    truth = np.array([1 if "class000" in labs else -1 for labs in first["label"]])
    scores = np.array([s[k] for s in first["score"]])
    assert 100 * voc_ap(truth, scores) == pytest.approx(result.report["splits"][0]["per_class"]["class000"]["ap"])


def test_report_json_and_plots(tmp_path, other_backend):
    import matplotlib

    y, X = clusters(12, 5, spread=1.0)
    result = probe(feature_file(tmp_path / "f.parquet", y, X), splits=1)
    files = write_report(result, tmp_path / "r.json")
    assert matplotlib.get_backend() == other_backend  # drawn on Figures: a notebook's backend stays
    assert [f.name for f in files] == ["r.json", "r-confusion.png", "r-per-class.png"]
    report = json.loads(files[0].read_text())
    assert report["confusion"]["classes"] == report["classes"]
    assert np.sum(report["confusion"]["counts"]) == report["splits"][0]["n_test"]
    with pytest.raises(BadInput, match="must end in .json"):
        write_report(result, tmp_path / "r.txt")


def test_cli_refuses_bad_outputs_before_any_work(tmp_path):
    result = runner.invoke(app, ["probe", str(tmp_path / "nothing"), "--report", str(tmp_path / "r.csv")])
    assert result.exit_code == 2 and "must end in .json" in result.output
    result = runner.invoke(app, ["probe", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no such image folder or feature file" in result.output


@pytest.mark.slow
def test_cli_probe_on_an_image_folder_with_problems(samples, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(samples, folder)
    (folder / "empty").mkdir()
    (folder / "lotus" / "broken.jpg").write_bytes(b"not a jpeg")
    args = [
        "probe",
        str(folder),
        "--model",
        "vgg11",
        "--weights",
        "random",
        "--scales",
        "224",
        "--splits",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--report",
        str(tmp_path / "r.json"),
        "--predictions",
        str(tmp_path / "p.parquet"),
        "--quiet",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mean class recall" in result.output and "untrained net" in result.output
    assert "chance: 25.0% mean class recall (4 classes)" in result.output  # what a random net is held to
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["classes"] == ["anchor", "camera", "crab", "lotus"] and report["n_images"] == 12
    assert {e["path"] for e in report["errors"]} == {"empty/", "lotus/broken.jpg"}
    assert len(pq.read_table(tmp_path / "p.parquet")) == 2 * 4  # one test image per class per split
    assert list((tmp_path / "cache").glob("probe-mine-*.parquet"))


def test_featx_probe_stays_the_function_once_its_module_is_imported():
    import featx
    import featx.downstream.probe

    assert callable(featx.probe) and featx.probe is probe


def test_settings_that_cannot_apply_are_named(tmp_path):
    y, X = clusters(3, 6)
    f = feature_file(tmp_path / "f.parquet", y, X)
    result = probe(f, splits=1, model="vgg11", scales=(256, 384, 512))
    assert any("extraction settings model are not used" in n for n in result.report["notes"])
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(images / "1.jpg")
    with pytest.raises(BadInput, match="extraction settings are model, weights"):
        probe(images.parent, splits=1, modle="vgg11")


def test_a_feature_folder_with_bookkeeping_is_features_not_images(tmp_path):
    # As --engine ray writes it: parts, and `_featx/` state beside them.
    y, X = clusters(3, 6)
    folder = tmp_path / "out"
    folder.mkdir()
    feature_file(folder / "part-000000.parquet", y, X)
    (folder / "_featx").mkdir()
    (folder / "_featx" / "settings.json").write_text("{}")
    result = probe(folder, splits=1)
    assert result.report["n_images"] == 18 and result.report["source"] == str(folder)


def test_report_folders_are_made(tmp_path):
    y, X = clusters(3, 6)
    result = probe(feature_file(tmp_path / "f.parquet", y, X), splits=1)
    written = write_report(result, tmp_path / "new" / "r.json")
    assert written[0] == tmp_path / "new" / "r.json" and written[0].is_file()
    assert write_predictions(result, tmp_path / "other" / "p.parquet").is_file()


def test_cli_probe_with_the_scalable_solver_end_to_end(tmp_path):
    y, X = clusters(5, 30, spread=1.0)
    f = feature_file(tmp_path / "f.parquet", y, X)
    args = ["probe", str(f), "--splits", "2", "--report", str(tmp_path / "r.json"), "--predictions"]
    result = runner.invoke(app, [*args, str(tmp_path / "p.parquet"), "--solver", "scalable"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"]["solver"] == "scalable"
    assert [s["head_solver"] for s in report["splits"]] == ["scalable", "scalable"]
    assert report["metrics"]["mean_class_recall"]["mean"] >= 90
    assert len(pq.read_table(tmp_path / "p.parquet")) == sum(s["n_test"] for s in report["splits"])
    # The default on 150 images: liblinear, the paper's head.
    result = runner.invoke(app, [*args, str(tmp_path / "q.parquet")])
    assert result.exit_code == 0, result.output
    assert {s["head_solver"] for s in json.loads((tmp_path / "r.json").read_text())["splits"]} == {"exact"}


def test_a_streamed_probe_reads_the_file_for_every_pass_and_answers_as_in_memory(tmp_path):
    y, X = clusters(4, [30, 30, 30, 2], spread=0.8, seed=4)
    f = feature_file(tmp_path / "f.parquet", y, X)
    streamed = probe(f, splits=2, solver="streamed", drop_small_classes=True)
    memory = probe(f, splits=2, solver="scalable", drop_small_classes=True)
    assert [s["head_solver"] for s in streamed.report["splits"]] == ["streamed", "streamed"]
    assert streamed.report["classes"] == memory.report["classes"] == ["class000", "class001", "class002"]
    for a, b in zip(streamed.report["splits"], memory.report["splits"]):
        assert a["C"] == b["C"] and a["n_test"] == b["n_test"]
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=100 / b["n_test"] + 1e-9)
    assert list(streamed.predictions["path"]) == list(memory.predictions["path"])


READ_PEAKS = """
import sys, tracemalloc
import pyarrow as pa
from featx.downstream.labelled import load_labelled
tracemalloc.start()
data = load_labelled(sys.argv[1])
print(data.X.nbytes, tracemalloc.get_traced_memory()[1], pa.default_memory_pool().max_memory())
"""


def test_features_are_read_into_one_matrix_without_a_second_copy(tmp_path):
    """NumPy's allocations (traced) peak near the matrix, Arrow's at a batch of row groups: never
    the table and its NumPy copy at once (a fresh process: Arrow's peak is per process)."""
    import subprocess
    import sys

    y, X = clusters(10, 1000, d=512, seed=5)  # 10,000 x 512: a 20 MB matrix
    f = tmp_path / "f.parquet"
    prov = {"settings_hash": "0" * 16, "dim": 512, "model": "vgg16", "descriptor": "generated"}
    schema = store.feature_schema(512, prov)
    table = store.rows_table(schema, [f"{c}/{i:05d}.jpg" for i, c in enumerate(y)], y, [1] * len(y), [1] * len(y), X)
    pq.write_table(table, f, row_group_size=64)  # as featx extract writes: small row groups
    proc = subprocess.run([sys.executable, "-c", READ_PEAKS, str(f)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    matrix, numpy_peak, arrow_peak = map(int, proc.stdout.split())
    assert matrix == 10_000 * 512 * 4
    assert numpy_peak < 1.25 * matrix
    assert arrow_peak < 0.5 * matrix
