"""Never lose a run: awkward and bad files, kills at any moment, Ctrl-C, refusals, full disks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import featx
from featx import store
from featx.cli import app
from featx.extract.config import ExtractConfig
from featx.extract.describer import DenseDescriber
from featx.extract.job import plan_job
from featx.extract.run import execute
from tests.awkward import bad_files, good_files, truncated_jpeg
from tests.conftest import assert_same_rows, features_by_path, write_images

SETTINGS = dict(model="vgg11", weights="random", seed=0, scales=(224,))
CLI = ["--model", "vgg11", "--weights", "random", "--scales", "224", "--quiet"]
runner = CliRunner()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    good = good_files(folder / "good")
    bad = bad_files(folder / "bad")
    truncated_jpeg(folder / "bad")
    return folder, good, bad


@pytest.mark.slow
def test_awkward_files_become_rows_and_bad_ones_error_records(mixed, tmp_path):
    folder, good, bad = mixed
    out = tmp_path / "f.parquet"
    result = runner.invoke(app, ["extract", str(folder), "-o", str(out), *CLI])
    assert result.exit_code == 0, result.output
    rows = featx.read_features(out).set_index("path")
    errors = pq.read_table(tmp_path / "f.errors.parquet").to_pandas().set_index("path")
    assert list(errors.columns) == ["stage", "error", "message"]
    for name, (w, h) in good.items():
        assert (rows.loc[f"good/{name}", "width"], rows.loc[f"good/{name}", "height"]) == (w, h), name
    for name, stage in bad.items():
        assert errors.loc[f"bad/{name}", "stage"] == stage, name
        assert f"bad/{name}" not in rows.index
    assert errors.loc["bad/bomb.png", "error"] == "TooManyPixels"
    # A truncated JPEG is decoded or recorded: exactly one of the two.
    assert ("bad/truncated.jpg" in rows.index) != ("bad/truncated.jpg" in errors.index)
    n_failed = len(errors)
    assert f"{len(rows)} images ({len(rows)} new), {n_failed} failures" in result.output
    assert np.isfinite(np.stack(rows["feature"])).all()


def test_strict_exits_1_on_any_failure_and_all_failed_exits_1(mixed, tmp_path):
    folder, _, _ = mixed
    cats = tmp_path / "in"
    write_images(cats, [(64, 48)], label="cats")
    shutil.copy(folder / "bad" / "empty.jpg", cats / "cats" / "empty.jpg")
    ok = runner.invoke(app, ["extract", str(cats), "-o", str(tmp_path / "a.parquet"), *CLI])
    assert ok.exit_code == 0 and "1 failures" in ok.output
    strict = runner.invoke(app, ["extract", str(cats), "-o", str(tmp_path / "b.parquet"), "--strict", *CLI])
    assert strict.exit_code == 1 and "--strict" in strict.output
    none = runner.invoke(
        app,
        [
            "extract",
            str(folder / "bad" / "empty.jpg"),
            str(folder / "bad" / "text.png"),
            "-o",
            str(tmp_path / "c.parquet"),
            *CLI,
        ],
    )
    assert none.exit_code == 1 and "no image could be described" in none.output
    assert not (tmp_path / "c.parquet").exists() and (tmp_path / "c.errors.parquet").exists()


def test_one_images_model_failure_spares_the_rest_of_its_batch(tmp_path, monkeypatch):
    write_images(tmp_path / "in", [(120, 90)] * 4, seed=5)
    ref = tmp_path / "ref.parquet"
    featx.extract_features(tmp_path / "in", ref, batch_size=1, **SETTINGS)
    poison = featx.read_features(ref)["path"].iloc[2]
    poison_pixels = featx.extract.decode.decode(tmp_path / "in" / poison, (224,), 10**9).scaled[224]
    real_run = DenseDescriber.run

    def flaky(self, staged, *args, **kwargs):  # every batch, and every image retried alone, runs here
        if any(torch.equal(staged.pixels[i, :, :h, :w], poison_pixels) for i, (h, w) in enumerate(staged.sizes)):
            raise RuntimeError("simulated device failure")
        return real_run(self, staged, *args, **kwargs)

    monkeypatch.setattr(DenseDescriber, "run", flaky)
    out = tmp_path / "f.parquet"
    result = featx.extract_features(tmp_path / "in", out, batch_size=4, **SETTINGS)
    assert (result.rows, result.failures) == (3, 1)
    errors = pq.read_table(tmp_path / "f.errors.parquet").to_pylist()
    assert errors == [
        {"path": poison, "stage": "model", "error": "RuntimeError", "message": "simulated device failure"}
    ]
    a, b = features_by_path(ref), features_by_path(out)
    for p in b:
        np.testing.assert_allclose(b[p], a[p], atol=2e-6)


def test_a_file_vanishing_after_discovery_is_recorded(tmp_path):
    files = write_images(tmp_path / "in", [(80, 60)] * 3)
    job = plan_job([tmp_path / "in"], ExtractConfig(**SETTINGS))
    files[1].unlink()
    result = execute(job, store.SingleFile(tmp_path / "f.parquet"))
    assert (result.rows, result.failures) == (2, 1)
    err = pq.read_table(tmp_path / "f.errors.parquet").to_pylist()[0]
    assert err["path"] == "cls/img_001.jpg" and err["stage"] == "read"


# -- interruption and resume ------------------------------------------------------------

N_KILL = 12


@pytest.fixture(scope="module")
def kill_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_images(root / "in", [(100, 80)] * 6 + [(80, 100)] * 6, seed=9)
    clean = root / "clean.parquet"
    featx.extract_features(root / "in", clean, rows_per_group=2, **SETTINGS)
    return root / "in", clean


def _sigint_as_on_a_terminal() -> None:
    # A runner started in the background (a CI job, `cmd &`) may hand its children SIGINT
    # ignored, and Python then never raises KeyboardInterrupt: the child runs as a user's
    # foreground command would, where Ctrl-C is delivered.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(inp: Path, out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "featx",
        "extract",
        str(inp),
        "-o",
        str(out),
        "--rows-per-group",
        "2",
        "--batch-size",
        "1",
        *CLI,
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        preexec_fn=_sigint_as_on_a_terminal,
    )


def wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("the run never reached the point to interrupt")


def pieces(out: Path) -> list[Path]:
    return sorted(store.partial_dir(out).glob("rows-*.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before_first_piece", "mid_run"])
def test_sigkill_then_rerun_equals_a_clean_run(kill_input, tmp_path, when):
    inp, clean = kill_input
    out = tmp_path / "f.parquet"
    proc = start(inp, out)
    if when == "before_first_piece":
        reached = wait_for(lambda: store.partial_dir(out).exists(), proc)
    else:
        reached = wait_for(lambda: len(pieces(out)) >= 2, proc)
    assert reached, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # never a half-written output
    kept = len(pieces(out))
    if when == "mid_run":
        assert kept >= 2
    rerun = runner.invoke(app, ["extract", str(inp), "-o", str(out), "--rows-per-group", "2", *CLI])
    assert rerun.exit_code == 0, rerun.output
    assert f"{N_KILL} images ({N_KILL - 2 * kept} new)" in rerun.output
    assert_same_rows(clean, out)
    assert not store.partial_dir(out).exists()


def test_kill_during_finalisation_states_resume_cleanly(kill_input, tmp_path):
    inp, clean = kill_input
    out = tmp_path / "f.parquet"
    featx.extract_features(inp, out, rows_per_group=2, **SETTINGS)
    # State 1: killed while writing the merged file: a partial temp file beside the pieces.
    out.unlink()
    pieces_dir = store.partial_dir(out)
    pieces_dir.mkdir()
    store.write_json(featx.read_provenance(clean), pieces_dir / "settings.json")
    table = pq.read_table(clean)
    for i in range(0, table.num_rows, 5):
        store.write_atomic(table.slice(i, 5), pieces_dir / f"rows-{i:06d}.parquet")
    (pieces_dir / ".final.parquet.123-abc.tmp").write_bytes(b"PAR1 half a file")
    result = featx.extract_features(inp, out, rows_per_group=2, **SETTINGS)
    assert (result.new_rows, result.rows) == (0, N_KILL)
    assert_same_rows(clean, out)
    assert not pieces_dir.exists()
    # State 2: killed after the rename, before the pieces were removed: no duplicates.
    pieces_dir.mkdir()
    store.write_json(featx.read_provenance(clean), pieces_dir / "settings.json")
    store.write_atomic(table.slice(0, 5), pieces_dir / "rows-000000.parquet")
    result = featx.extract_features(inp, out, rows_per_group=2, **SETTINGS)
    assert result.rows == N_KILL
    assert_same_rows(clean, out)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeps_work_and_says_how_to_resume(kill_input, tmp_path):
    inp, clean = kill_input
    out = tmp_path / "f.parquet"
    proc = start(inp, out)
    assert wait_for(lambda: len(pieces(out)) >= 1, proc), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert not out.exists() and len(pieces(out)) >= 1
    rerun = runner.invoke(app, ["extract", str(inp), "-o", str(out), "--rows-per-group", "2", *CLI])
    assert rerun.exit_code == 0, rerun.output
    assert_same_rows(clean, out)


def test_changed_settings_refused_for_unfinished_run_too(kill_input, tmp_path):
    inp, _ = kill_input
    out = tmp_path / "f.parquet"
    store.partial_dir(out).mkdir()
    state = store.partial_dir(out) / "settings.json"
    store.write_json({"settings_hash": "0" * 16, "settings": {"model": "vgg16"}}, state)
    for change, name in [
        ({"model": "vgg13"}, "model"),
        ({"scales": (256,)}, "scales"),
        ({"precision": "bf16"}, "precision"),
        ({"aggregate": "stack"}, "aggregate"),
    ]:
        with pytest.raises(ValueError, match=f"{name}=.*overwrite=True"):
            featx.extract_features(inp, out, **(SETTINGS | change))
    assert json.loads(state.read_text())["settings_hash"] == "0" * 16


# -- the environment fails -----------------------------------------------------------------


def test_unwritable_output_folder_is_one_line(kill_input):
    inp, _ = kill_input
    target = Path("/proc/featx-test.parquet")  # writable by no one, root included
    result = runner.invoke(app, ["extract", str(inp), "-o", str(target), *CLI])
    assert result.exit_code == 2 and "cannot write in /proc" in result.output
    assert "Traceback" not in result.output


def test_disk_full_is_one_line_and_resumable(kill_input, tmp_path, monkeypatch):
    inp, clean = kill_input
    out = tmp_path / "f.parquet"
    real = store.atomic.write_atomic
    calls = {"n": 0}

    def fill_up(table, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(table, path)

    monkeypatch.setattr(store.atomic, "write_atomic", fill_up)
    result = runner.invoke(app, ["extract", str(inp), "-o", str(out), "--rows-per-group", "2", *CLI])
    assert result.exit_code == 2 and "disk full" in result.output and "rerun the same command" in result.output
    assert not out.exists()
    monkeypatch.setattr(store.atomic, "write_atomic", real)
    assert runner.invoke(app, ["extract", str(inp), "-o", str(out), "--rows-per-group", "2", *CLI]).exit_code == 0
    assert_same_rows(clean, out)


def test_weights_for_another_architecture_or_corrupt(tmp_path, samples):
    from featx.net.backbones.vgg import torchvision_model as torchvision_vgg
    from featx.net.weights import Weights

    other = tmp_path / "vgg11.pth"
    torch.save(torchvision_vgg("vgg11", Weights({"kind": "random", "seed": 0}, None)).state_dict(), other)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x04 definitely not a checkpoint")
    for file, message in [(other, "does not fit vgg16"), (corrupt, "cannot read it as a torch state dict")]:
        result = runner.invoke(
            app,
            [
                "extract",
                str(samples / "crab"),
                "-o",
                str(tmp_path / "x.parquet"),
                "--weights",
                str(file),
                "--scales",
                "224",
                "--quiet",
            ],
        )
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "x.parquet").exists()
        assert not store.partial_dir(tmp_path / "x.parquet").exists()


@pytest.mark.slow
def test_sigkill_during_finalisation_keeps_the_previous_file_and_rerun_completes(kill_input, tmp_path):
    """A real kill while the merged file is being written: OUT stays the previous complete file."""
    given, clean = kill_input
    out = tmp_path / "f.parquet"
    # A previous complete output, large enough that merging it takes a moment, holding other
    # images that are still there (hard links of one file: resume keeps only current images).
    inp = tmp_path / "in"
    shutil.copytree(given, inp)
    (inp / "old").mkdir()
    first = next(given.rglob("*.jpg"))
    prov = featx.read_provenance(clean)
    schema = store.with_stats(store.feature_schema(4096, prov))
    n_old = 6000
    for i in range(n_old):
        os.link(first, inp / "old" / f"{i:05d}.jpg")
    st = first.stat()
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(out, schema) as w:
        for start_row in range(0, n_old, 1000):
            paths = [f"old/{i:05d}.jpg" for i in range(start_row, start_row + 1000)]
            rows = store.rows_table(
                store.feature_schema(4096, prov),
                paths,
                ["old"] * 1000,
                [1] * 1000,
                [1] * 1000,
                rng.random((1000, 4096), dtype=np.float32),
            )
            rows = rows.append_column("file_size", pa.array([st.st_size] * 1000, pa.int64()))
            rows = rows.append_column("file_mtime_ns", pa.array([st.st_mtime_ns] * 1000, pa.int64()))
            w.write_table(rows.cast(schema))
    before = out.stat().st_mtime_ns, out.stat().st_size
    proc = start(inp, out)
    reached = wait_for(lambda: any(store.partial_dir(out).glob(".final.parquet.*.tmp")), proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached, "the run ended before finalisation could be interrupted"
    assert (out.stat().st_mtime_ns, out.stat().st_size) == before  # untouched, complete
    assert pq.ParquetFile(out).metadata.num_rows == n_old
    rerun = runner.invoke(app, ["extract", str(inp), "-o", str(out), *CLI])
    assert rerun.exit_code == 0, rerun.output
    assert f"{n_old + N_KILL} images (0 new)" in rerun.output
    df = featx.read_features(out, columns=["path"])
    assert len(df) == n_old + N_KILL and df["path"].is_unique
    new = featx.read_features(out, filters=[("label", "!=", "old")])
    reference = featx.read_features(clean).set_index("path")
    for path, feature in zip(new["path"], new["feature"]):
        np.testing.assert_allclose(feature, reference.loc[path, "feature"], atol=2e-6)


def test_overwrite_replaces_an_output_that_is_garbage_or_foreign(kill_input, tmp_path):
    """issue 22.2: the refusal says --overwrite, and --overwrite then works (it never reads OUT)."""
    inp, clean = kill_input
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"\x00 not a parquet file " * 100)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), foreign)
    for out in (garbage, foreign):
        cmd = [sys.executable, "-m", "featx", "extract", str(inp), "-o", str(out), *CLI]
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert "pass --overwrite to replace it" in refused.stderr
        replaced = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, timeout=600)
        assert replaced.returncode == 0, replaced.stderr
        assert_same_rows(clean, out)
