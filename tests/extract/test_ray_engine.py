"""--engine ray: the same rows, features, schema, metadata and errors as the local engine.

One local Ray instance (2 CPUs) serves the whole module; every Ray run costs a few seconds of
worker start-up on top of the net, so the runs are shared between tests where they can be.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import featx
from featx import store
from featx.store import errors_path
from tests.conftest import write_images

ray = pytest.importorskip("ray")

from featx.cli import app  # noqa: E402
from featx.extract import ray_engine  # noqa: E402

SETTINGS = dict(model="vgg11", weights="random", seed=0, scales=(224,), batch_size=4)
PART = 2  # rows_per_group: images per part, so five images give several parts


def extract_ray(*args, **kwargs) -> featx.ExtractResult:
    return featx.extract_features(*args, engine="ray", **kwargs)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the test session: start-up costs seconds, so it is paid once."""
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            object_store_memory=200 * 1024**2,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root, [(300, 225), (300, 225), (240, 320)], seed=1, label="dogs")
    write_images(root, [(260, 230), (300, 225)], seed=2, label="cats")
    (root / "cats" / "broken.jpg").write_bytes(b"this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def local(folder, tmp_path_factory):
    return featx.extract_features(folder, tmp_path_factory.mktemp("local") / "f.parquet", **SETTINGS)


@pytest.fixture(scope="module")
def on_ray(ray_local, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "features"
    return extract_ray(folder, out, rows_per_group=PART, **SETTINGS)


def by_path(path) -> pd.DataFrame:
    return featx.read_features(path).sort_values("path").reset_index(drop=True)


def test_same_rows_and_features_as_the_local_engine(local, on_ray):
    a, b = by_path(local.output), by_path(on_ray.output)
    assert len(a) == len(b) == 5
    pd.testing.assert_frame_equal(a.drop(columns="feature"), b.drop(columns="feature"))
    assert np.abs(np.stack(a["feature"]) - np.stack(b["feature"])).max() < 1e-5
    assert (on_ray.rows, on_ray.new_rows, on_ray.failures) == (5, 5, 1)


def test_same_schema_and_featx_metadata(local, on_ray):
    parts = sorted(on_ray.output.glob("part-*.parquet"))
    assert len(parts) == 3  # five images in parts of two; the broken one has no row
    expected = pq.read_schema(local.output)
    # Equal fields and equal metadata, but for the record of what a run did (which run, when):
    # the local file carries its own; a folder keeps it in _featx/ (store.read_last_run).
    assert store.LAST_RUN_KEY in expected.metadata
    expected = expected.with_metadata({k: v for k, v in expected.metadata.items() if k != store.LAST_RUN_KEY})
    for part in parts:
        schema = pq.read_schema(part)
        assert schema.equals(expected, check_metadata=True), part
    assert store.read_last_run(on_ray.output)["added"] == 5
    assert featx.read_provenance(on_ray.output) == featx.read_provenance(local.output)
    assert on_ray.settings_hash == local.settings_hash


def test_failures_are_recorded_like_the_local_engine(local, on_ray):
    assert on_ray.errors_file == errors_path(on_ray.output)
    a, b = pd.read_parquet(local.errors_file), pd.read_parquet(on_ray.errors_file)
    assert list(b.columns) == ["path", "stage", "error", "message"]
    pd.testing.assert_frame_equal(a, b)
    assert b["path"].tolist() == ["cats/broken.jpg"] and b["stage"].tolist() == ["decode"]


def test_featx_pandas_and_pyarrow_read_the_folder(on_ray):
    X, y = featx.load_xy(on_ray.output)
    assert X.shape == (5, 4096) and X.dtype == np.float32
    assert sorted(set(y)) == ["cats", "dogs"]
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    dogs = featx.read_features(on_ray.output, filters=[("label", "=", "dogs")])
    assert len(dogs) == 3
    # featx's bookkeeping lives in _featx/, which Parquet dataset readers skip.
    assert len(pd.read_parquet(on_ray.output)) == 5
    assert pq.read_table(on_ray.output).num_rows == 5


def test_resume_computes_only_the_missing_part(on_ray, folder, tmp_path):
    out = tmp_path / "features"
    shutil.copytree(on_ray.output, out)
    parts = sorted(out.glob("part-*.parquet"))
    lost = parts[1]
    lost_rows = pq.ParquetFile(lost).metadata.num_rows
    kept = {p: os.stat(p).st_mtime_ns for p in parts if p != lost}
    lost.unlink()

    result = extract_ray(folder, out, rows_per_group=PART, **SETTINGS)
    assert result.new_rows == lost_rows and result.rows == 5 and result.failures == 1
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept  # finished parts untouched
    a, b = by_path(on_ray.output), by_path(out)
    assert a["path"].tolist() == b["path"].tolist()
    assert np.abs(np.stack(a["feature"]) - np.stack(b["feature"])).max() < 1e-5


def test_other_settings_are_refused_unless_overwrite(on_ray, folder, tmp_path):
    out = tmp_path / "features"
    shutil.copytree(on_ray.output, out)
    with pytest.raises(ValueError, match=r"other settings \(scales=\[224\] there, \[256\] now.*overwrite=True"):
        extract_ray(folder, out, rows_per_group=PART, **(SETTINGS | {"scales": (256,)}))
    # The CLI says the same in one line, exit code 2.
    args = [
        "extract",
        str(folder),
        "-o",
        str(out),
        "--engine",
        "ray",
        "--model",
        "vgg11",
        "--weights",
        "random",
        "--scales",
        "256",
        "--quiet",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output


def test_folders_featx_did_not_write_and_files_are_refused(ray_local, folder, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="did not write .*notes.txt"):
        extract_ray(folder, tmp_path / "mine", overwrite=True, **SETTINGS)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "f.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; --engine ray writes a folder"):
        extract_ray(folder, tmp_path / "f.parquet", **SETTINGS)


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ValueError, match=r"pip install 'featx\[ray\]'"):
        ray_engine._import_ray()


def test_ray_options_need_the_ray_engine(folder, tmp_path):
    r = CliRunner().invoke(app, ["extract", str(folder), "-o", str(tmp_path / "f.parquet"), "--ray-address", "auto"])
    assert r.exit_code == 2 and "need --engine ray" in r.output


def test_auto_precision_is_resolved_once_on_a_worker_of_a_cluster(on_ray, monkeypatch):
    # A cluster of several nodes: the driver's own hardware says nothing about the actors'.
    alive = [{"Alive": True, "NodeID": "elsewhere", "Resources": {"CPU": 2}}] * 2
    monkeypatch.setattr(ray, "nodes", lambda: alive)
    config = featx.ExtractConfig(precision="auto", device="auto")
    pinned = ray_engine._pin_precision(ray, config, "cpu", {"num_cpus": 1})
    assert pinned.precision == ray_engine._auto_precision("cpu") and pinned.device == "cpu"
    fixed = ray_engine._pin_precision(ray, config.replace(precision="fp32"), "cpu", {"num_cpus": 1})
    assert fixed.precision == "fp32"


def test_cpu_actors_must_leave_cpus_to_decode(ray_local):
    with pytest.raises(ValueError, match="leave none to decode images; use fewer --ray-actors"):
        ray_engine._actor_plan(ray, featx.ExtractConfig(device="cpu"), actors=2)
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        ray_engine._actor_plan(ray, featx.ExtractConfig(device="cuda"), actors=None)
    assert ray_engine._actor_plan(ray, featx.ExtractConfig(), actors=None) == ("cpu", 1, {"num_cpus": 1}, 1)


def test_info_counts_the_failures_of_a_ray_folder(on_ray):
    from typer.testing import CliRunner

    from featx.cli import app

    result = CliRunner().invoke(app, ["info", str(on_ray.output)])
    assert result.exit_code == 0, result.output
    errors = errors_path(on_ray.output)
    assert f"1 image, listed in {errors}" in result.output


@pytest.mark.slow
def test_regions_on_ray_equal_the_local_engine(ray_local, folder, tmp_path):
    regions = pd.DataFrame(
        [
            ("dogs/img_000.jpg", "a", 0, 0, 150, 200),
            ("dogs/img_000.jpg", "b", 100, 20, 300, 225),
            ("cats/img_001.jpg", "c", 10, 10, 250, 220),
            ("cats/img_000.jpg", "bad", 0, 0, 999, 10),
        ],
        columns=["path", "region", "x1", "y1", "x2", "y2"],
    )
    local = featx.extract_features(folder, tmp_path / "local.parquet", regions=regions, **SETTINGS)
    on_ray = extract_ray(folder, tmp_path / "ray", regions=regions, rows_per_group=PART, **SETTINGS)
    a = featx.read_features(local.output).sort_values(["path", "region"]).reset_index(drop=True)
    b = featx.read_features(on_ray.output).sort_values(["path", "region"]).reset_index(drop=True)
    assert a["region"].tolist() == ["c", "a", "b"]
    pd.testing.assert_frame_equal(a.drop(columns="feature"), b.drop(columns="feature"))
    assert np.abs(np.stack(a["feature"]) - np.stack(b["feature"])).max() < 1e-5
    assert local.failures == on_ray.failures == 1
    errors = pq.read_table(on_ray.errors_file).to_pylist()
    assert [(e["region"], e["error"]) for e in errors] == [("bad", "BoxOutsideImage")]
    again = extract_ray(folder, tmp_path / "ray", regions=regions, rows_per_group=PART, **SETTINGS)
    assert again.new_rows == 0 and again.rows == 3


def test_both_engines_take_the_same_todo_from_one_job(local, on_ray, folder, tmp_path, monkeypatch):
    from featx.extract.job import Job, plan_job
    from featx.extract.run import execute, open_output

    # Copies of the images (stats kept) and of both engines' outputs, then one image changed.
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    shutil.copy2(local.output, tmp_path / "f.parquet")
    shutil.copytree(on_ray.output, tmp_path / "features")
    changed = images / "dogs" / "img_001.jpg"
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    seen, real = {}, Job.todo

    def todo(self, output, provenance, overwrite=False):
        left = real(self, output, provenance, overwrite)
        seen[type(output).__name__] = [it.path for it in left]
        return left

    monkeypatch.setattr(Job, "todo", todo)
    job = plan_job(images, featx.ExtractConfig(rows_per_group=PART, **SETTINGS))
    a = execute(job, open_output(tmp_path / "f.parquet", "local"))
    b = execute(job, open_output(tmp_path / "features", "ray"), engine="ray")
    # The failed image is retried by every new run; the changed one is described again.
    assert seen["SingleFile"] == seen["DatasetFolder"] == ["cats/broken.jpg", "dogs/img_001.jpg"]
    assert (a.rows, a.new_rows, a.failures) == (b.rows, b.new_rows, b.failures) == (5, 1, 1)
    assert a.changes == b.changes
    x, y = by_path(a.output), by_path(b.output)
    pd.testing.assert_frame_equal(x.drop(columns="feature"), y.drop(columns="feature"))
    assert np.abs(np.stack(x["feature"]) - np.stack(y["feature"])).max() < 1e-5


def test_disk_full_on_ray_is_one_line_and_resumable(on_ray, folder, tmp_path, monkeypatch):
    out = tmp_path / "features"
    real = store.atomic.write_atomic
    calls = {"n": 0}

    def fill_up(table, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(table, path)

    monkeypatch.setattr(store.atomic, "write_atomic", fill_up)
    args = ["extract", str(folder), "-o", str(out), "--engine", "ray", "--rows-per-group", str(PART), "--quiet"]
    args += ["--model", "vgg11", "--weights", "random", "--scales", "224", "--batch-size", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"disk full while writing {out}; free some space and rerun the same command to resume" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setattr(store.atomic, "write_atomic", real)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "5 images" in again.output and "1 failures" in again.output
    a, b = by_path(on_ray.output), by_path(out)
    assert a["path"].tolist() == b["path"].tolist()
    assert np.abs(np.stack(a["feature"]) - np.stack(b["feature"])).max() < 1e-5


@pytest.mark.slow
def test_rays_progress_bars_and_loggers_are_the_callers_again_after_a_run(ray_local, folder, tmp_path):
    """featx quiets Ray Data for its run only (issue 22.15): a notebook's settings come back."""
    context = ray.data.DataContext.get_current()
    names = ("ray.data", "ray.data._internal.progress")
    before = (context.enable_progress_bars, [logging.getLogger(n).level for n in names])
    context.enable_progress_bars = True
    for n in names:
        logging.getLogger(n).setLevel(17)
    try:
        result = extract_ray(folder, tmp_path / "features", rows_per_group=PART, **SETTINGS)
        assert result.rows == 5
        assert context.enable_progress_bars is True
        assert [logging.getLogger(n).level for n in names] == [17, 17]
    finally:
        context.enable_progress_bars = before[0]
        for n, level in zip(names, before[1]):
            logging.getLogger(n).setLevel(level)
