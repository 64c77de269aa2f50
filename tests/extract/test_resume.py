"""Outputs a user can trust (issue 13): exact resume, --overwrite resumes, one writer, fsync."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

import featx
from featx import store
from featx.cli import app
from featx.extract.local import LocalRun
from tests.conftest import assert_same_rows, write_images

SETTINGS = dict(model="vgg11", weights="random", seed=0, layer="pool5", scales=(32,), precision="fp32")
CLI = [
    "--model",
    "vgg11",
    "--weights",
    "random",
    "--layer",
    "pool5",
    "--scales",
    "32",
    "--precision",
    "fp32",
    "--quiet",
    "--rows-per-group",
    "2",
    "--workers",
    "0",
]
runner = CliRunner()


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "in"
    write_images(root, [(40, 30)] * 4, seed=1, label="cats")
    write_images(root, [(30, 40)] * 3, seed=2, label="dogs")
    return root


def extract(images, out, *more):
    return runner.invoke(app, ["extract", str(images), "-o", str(out), *CLI, *more])


def interrupt_after(monkeypatch, pieces: int):
    """Ctrl-C once `pieces` row groups are persisted."""
    real, calls = LocalRun.flush, {"n": 0}

    def flush(self, *args):
        if calls["n"] == pieces:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(LocalRun, "flush", flush)


def test_resume_equals_a_fresh_run_and_info_says_what_changed(images, tmp_path):
    out = tmp_path / "f.parquet"
    assert extract(images, out).exit_code == 0
    # Since: one image removed, one replaced (same path, new content), one moved to another class.
    (images / "cats" / "img_000.jpg").unlink()
    shutil.copy(images / "dogs" / "img_000.jpg", images / "cats" / "img_001.jpg")
    st = (images / "cats" / "img_001.jpg").stat()
    os.utime(images / "cats" / "img_001.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (images / "birds").mkdir()
    os.rename(images / "dogs" / "img_002.jpg", images / "birds" / "img_002.jpg")

    rerun = extract(images, out)
    assert rerun.exit_code == 0, rerun.output
    assert "6 images (2 new, 1 replaced, 2 dropped)" in rerun.output
    fresh = tmp_path / "fresh.parquet"
    assert extract(images, fresh).exit_code == 0
    assert_same_rows(fresh, out, atol=1e-6)
    assert featx.read_features(out).set_index("path").loc["birds/img_002.jpg", "label"] == "birds"
    info = runner.invoke(app, ["info", str(out)])
    assert "last changed by the run finished" in info.output
    assert "it added 1, replaced 1 (changed since), dropped 2 (gone since)" in info.output


def test_interrupted_overwrite_resumes_with_the_same_command(images, tmp_path, monkeypatch):
    out = tmp_path / "f.parquet"
    assert extract(images, out, "--no-flip").exit_code == 0
    before = out.read_bytes()
    interrupt_after(monkeypatch, 2)
    stopped = extract(images, out, "--overwrite")
    assert stopped.exit_code == 130
    assert "rerun the same command (with --overwrite or without) to resume" in stopped.output
    assert out.read_bytes() == before  # the previous output stays complete until the new one is
    monkeypatch.undo()
    resumed = extract(images, out, "--overwrite")
    assert resumed.exit_code == 0, resumed.output
    assert "7 images (3 new" in resumed.output  # 4 kept from the interrupted run
    fresh = tmp_path / "fresh.parquet"
    assert extract(images, fresh).exit_code == 0
    assert_same_rows(fresh, out, atol=1e-6)
    assert featx.read_provenance(out)["flip"] is True


def test_interrupted_overwrite_resumes_without_the_flag_too(images, tmp_path, monkeypatch):
    out = tmp_path / "f.parquet"
    assert extract(images, out, "--no-flip").exit_code == 0
    interrupt_after(monkeypatch, 1)
    assert extract(images, out, "--overwrite").exit_code == 130
    monkeypatch.undo()
    resumed = extract(images, out)
    assert resumed.exit_code == 0 and "7 images (5 new" in resumed.output, resumed.output
    assert featx.read_provenance(out)["flip"] is True


HOLD = """
import sys
from pathlib import Path
from featx.store import OutputLock
lock = OutputLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def test_a_second_run_on_one_output_is_refused_or_waits(images, tmp_path):
    out = tmp_path / "f.parquet"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = extract(images, out)
        assert refused.exit_code == 2 and "Traceback" not in refused.output
        assert f"is being written by pid {holder.pid} on " in refused.output and "--wait" in refused.output
        assert len(refused.output.strip().splitlines()) == 1
        assert not out.exists() and not store.partial_dir(out).exists()
        threading.Timer(1.0, holder.stdin.close).start()
        waited = runner.invoke(app, ["-v", "extract", str(images), "-o", str(out), *CLI, "--wait"])
        assert waited.exit_code == 0, waited.output
        assert f"waiting for pid {holder.pid}" in waited.output and "7 images (7 new)" in waited.output
    finally:
        if holder.poll() is None:
            holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to name fsynced files")
def test_every_file_a_resume_trusts_is_fsynced_with_its_folder(images, tmp_path, monkeypatch):
    (images / "cats" / "broken.jpg").write_bytes(b"not a jpeg")  # an errors file too
    out = tmp_path / "f.parquet"
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    featx.extract_features(images, out, rows_per_group=2, workers=0, **SETTINGS)
    monkeypatch.undo()

    published = [(i, e) for i, e in enumerate(events) if e[0] == "replace"]
    names = {Path(e[2]).name for _, e in published}
    assert {"settings.json", "f.parquet", "f.errors.parquet"} <= names
    assert any(n.startswith("rows-") for n in names) and any(n.startswith("errors-") for n in names)
    for i, (_, src, dst) in published:
        assert ("fsync", src) in events[:i], f"{dst} renamed into place before its data was on disk"
        assert ("fsync", str(Path(dst).parent)) in events[i:], f"the rename to {dst} was never made durable"


def test_ctrl_c_before_anything_is_persisted_says_nothing_is_kept(images, tmp_path, monkeypatch):
    out = tmp_path / "f.parquet"
    interrupt_after(monkeypatch, 0)
    stopped = extract(images, out)
    assert stopped.exit_code == 130
    assert "interrupted before any images were persisted, so nothing is kept" in stopped.output
    assert "kept in" not in stopped.output and not store.partial_dir(out).exists()


def test_the_first_row_group_is_small_so_an_early_ctrl_c_keeps_rows(tmp_path, monkeypatch):
    """With 64 rows per group, a long first group would be lost to a Ctrl-C: the first holds 8."""
    root = tmp_path / "in"
    write_images(root, [(40, 30)] * 12, seed=3, label="cats")
    out = tmp_path / "f.parquet"
    args = ["extract", str(root), "-o", str(out), *CLI[:-4], "--rows-per-group", "64"]
    interrupt_after(monkeypatch, 1)
    stopped = runner.invoke(app, args)
    assert stopped.exit_code == 130, stopped.output
    assert f"interrupted after 8 new images; they are kept in {store.partial_dir(out)}" in stopped.output
    monkeypatch.undo()
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0 and "12 images (4 new)" in resumed.output, resumed.output
