"""The one planning step both engines execute: discover, regions, shard, what is left, write errors.

No net runs here: rows are synthetic, so each check takes well under a second.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featx import store
from featx.errors import BadInput
from featx.extract.config import ExtractConfig
from featx.extract.job import ExtractResult, Tally, plan_job, write_error, writing
from featx.extract.run import open_output
from featx.extract.shard import shard_of
from tests.conftest import write_images

DIM = 4
PROV = {"settings_hash": "a" * 16, "settings": {"model": "vgg11"}, "dim": DIM}
CONFIG = ExtractConfig(model="vgg11", weights="random", scales=(224,))


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "in"
    write_images(root, [(40, 30)] * 3, seed=1, label="cats")
    write_images(root, [(30, 40)] * 3, seed=2, label="dogs")
    return root


def write_rows(output: store.Output, job, paths: list[str]) -> None:
    """A finished run that described `paths` of `job` (synthetic features)."""
    schema = store.feature_schema(DIM, PROV)
    with output:
        job.todo(output, PROV)
        n = len(paths)
        output.add(store.rows_table(schema, paths, ["c"] * n, [1] * n, [1] * n, np.ones((n, DIM), np.float32)), [])
        output.finish(schema) if isinstance(output, store.SingleFile) else output.finish()


def test_both_outputs_leave_the_same_todo_for_one_job(images, tmp_path):
    job = plan_job(images, CONFIG)
    paths = [it.path for it in job.items]
    assert paths == sorted(paths) and len(paths) == 6
    outputs = {"local": tmp_path / "f.parquet", "ray": tmp_path / "features"}
    for engine, target in outputs.items():
        write_rows(open_output(target, engine), job, paths[:4])
    # Since: one described image changed; the last two were never described.
    changed = job.files[paths[1]]
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    todo = {}
    for engine, target in outputs.items():
        output = open_output(target, engine)
        with output:
            todo[engine] = [it.path for it in job.todo(output, PROV)]
        assert not output.up_to_date
    assert todo["local"] == todo["ray"] == [paths[1], paths[4], paths[5]]


def test_an_output_holding_everything_is_up_to_date(images, tmp_path):
    job = plan_job(images, CONFIG)
    for engine, target in {"local": tmp_path / "f.parquet", "ray": tmp_path / "features"}.items():
        write_rows(open_output(target, engine), job, [it.path for it in job.items])
        output = open_output(target, engine)
        with output:
            assert job.todo(output, PROV) == [] and output.up_to_date
        result = job.result(output, PROV, 0.0, Tally())
        assert (result.rows, result.new_rows, result.interrupted) == (6, 0, False)


def test_a_job_with_regions_and_a_shard_keeps_the_regions_of_its_images(images):
    rows = [
        ("cats/img_000.jpg", "a", 0, 0, 20, 20),
        ("cats/img_000.jpg", "b", 5, 5, 30, 25),
        ("dogs/img_001.jpg", "c", 0, 0, 10, 10),
        ("nowhere.jpg", "d", 0, 0, 10, 10),
    ]
    regions = pd.DataFrame(rows, columns=["path", "region", "x1", "y1", "x2", "y2"])
    whole = plan_job(images, CONFIG, regions=regions)
    assert whole.unit == "regions" and whole.regions is not None
    assert [it.key for it in whole.items] == [(p, r) for p, r, *_ in rows[:3]]
    # A region no image answers is recorded, and the output records its path too.
    assert [r["path"] for r in whole.region_errors] == ["nowhere.jpg"]
    assert whole.files["nowhere.jpg"] == images / "nowhere.jpg"
    for k in range(2):
        part = plan_job(images, CONFIG, regions=regions, shard=(k, 2))
        assert all(shard_of(it.path, 2) == k for it in part.items)
        assert [it.key for it in part.items] == [it.key for it in whole.items if shard_of(it.path, 2) == k]
        assert part.regions == whole.regions  # one table, one identity, whichever shard


def test_no_images_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match=r"no images found under .*empty; check the PATH"):
        plan_job(tmp_path / "empty", CONFIG)


def test_the_wrong_kind_of_output_is_refused_before_discovery(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BadInput, match="is a folder; give a file name"):
        open_output(tmp_path / "folder", "local")
    with pytest.raises(BadInput, match="is a file; --engine ray writes a folder"):
        open_output(tmp_path / "file", "ray")
    with pytest.raises(BadInput, match="engine 'spark' is not one of local, ray"):
        open_output(tmp_path / "x", "spark")


def test_write_errors_are_one_line_with_the_fix(tmp_path):
    full = write_error(OSError(errno.ENOSPC, "No space left on device", "x"), tmp_path / "f.parquet")
    assert str(full) == (
        f"disk full while writing {tmp_path / 'f.parquet'}; free some space and rerun the same command to resume"
    )
    denied = write_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "p")), tmp_path)
    assert str(denied) == f"cannot write {tmp_path / 'p'} (Permission denied); check the -o folder"
    with pytest.raises(BadInput, match="disk full"), writing(tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_the_result_line_says_what_the_run_did(tmp_path):
    result = ExtractResult(
        tmp_path / "f.parquet",
        rows=7,
        new_rows=3,
        failures=1,
        seconds=2.0,
        settings_hash="a" * 16,
        errors_file=tmp_path / "f.errors.parquet",
        changes=store.Changes(added=2, replaced=1, dropped=2),
        unit="regions",
    )
    assert result.summary() == (
        f"{tmp_path / 'f.parquet'}: 7 regions (3 new, 1 replaced, 2 dropped), 1 failures, 2.0 s, 1.50 regions/s; "
        f"failures listed in {tmp_path / 'f.errors.parquet'}"
    )
    stopped = ExtractResult(tmp_path / "f.parquet", 0, 3, 0, 1.0, "a" * 16, interrupted=True, kept_in=tmp_path / "p")
    assert stopped.resume_hint(overwrite=True) == (
        f"interrupted after 3 new images; they are kept in {tmp_path / 'p'} — rerun the same command "
        "(with --overwrite or without) to resume"
    )
