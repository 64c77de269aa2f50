"""The one storage layer both engines write through: resume, settings, locking, durability.

Synthetic rows (no net), so every behaviour is checked for the single file and the dataset
folder alike, in well under a second each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from featx import store
from featx.errors import Locked, SettingsMismatch

DIM = 4
PROV = {"settings_hash": "a" * 16, "settings": {"model": "vgg11", "flip": True}, "dim": DIM}
OTHER = {"settings_hash": "b" * 16, "settings": {"model": "vgg11", "flip": False}, "dim": DIM}
FLAVOURS = {"file": (store.SingleFile, "f.parquet"), "folder": (store.DatasetFolder, "features")}


def make(kind: str, tmp_path: Path, wait: bool = False) -> store.Output:
    cls, name = FLAVOURS[kind]
    return cls(tmp_path / name, wait=wait)


def images(folder: Path, names: list[str], content: bytes = b"x") -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    files = {}
    for n in names:
        (folder / n).write_bytes(content + n.encode())
        files[n] = folder / n
    return files


def rows(paths: list[str], value: float, prov: dict = PROV):
    schema = store.feature_schema(DIM, prov)
    n = len(paths)
    return store.rows_table(schema, paths, ["c"] * n, [1] * n, [1] * n, np.full((n, DIM), value, np.float32))


def run(
    output: store.Output,
    files: dict[str, Path],
    value: float,
    prov: dict = PROV,
    overwrite=False,
    interrupt_after: int | None = None,
) -> tuple[list[str], store.Finished | None]:
    """One run: plan, describe what is left (feature = `value`), finish (unless interrupted)."""
    with output:
        todo = output.begin(prov, files, overwrite)
        if output.up_to_date:
            return todo, None
        for i, path in enumerate(todo):
            if interrupt_after is not None and i == interrupt_after:
                return todo, None
            output.add(rows([path], value, prov), [])
        if isinstance(output, store.SingleFile):
            return todo, output.finish(store.feature_schema(DIM, prov))
        return todo, output.finish()


def content(target: Path) -> dict[str, float]:
    df = store.read_features(target)
    assert df["path"].is_unique
    return {p: float(f[0]) for p, f in zip(df["path"], df["feature"])}


@pytest.mark.parametrize("kind", FLAVOURS)
def test_resume_equals_a_fresh_run_over_the_folder_as_it_is_now(kind, tmp_path):
    files = images(tmp_path / "in", ["a", "b", "c", "d"])
    todo, done = run(make(kind, tmp_path), files, 1.0)
    assert sorted(todo) == ["a", "b", "c", "d"] and done.rows == 4
    # Since: b removed, c changed (same path, new content), d moved to e, f added.
    files["b"].unlink()
    del files["b"]
    files["c"].write_bytes(b"new content, longer")
    os.rename(files.pop("d"), tmp_path / "in" / "e")
    files["e"] = tmp_path / "in" / "e"
    files |= images(tmp_path / "in", ["f"])
    out = make(kind, tmp_path)
    todo, done = run(out, files, 2.0)
    assert sorted(todo) == ["c", "e", "f"]
    assert content(out.target) == {"a": 1.0, "c": 2.0, "e": 2.0, "f": 2.0}
    assert (done.changes.added, done.changes.replaced, done.changes.dropped) == (2, 1, 2)
    last = store.read_last_run(out.target)
    assert (last["added"], last["replaced"], last["dropped"]) == (2, 1, 2)
    # Only the mtime changes (same size): described again too.
    st = files["a"].stat()
    os.utime(files["a"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    todo, done = run(make(kind, tmp_path), files, 3.0)
    assert todo == ["a"] and content(out.target)["a"] == 3.0
    # Nothing changed: nothing to do, nothing rewritten.
    todo, done = run(make(kind, tmp_path), files, 4.0)
    assert todo == [] and done is None


@pytest.mark.parametrize("kind", FLAVOURS)
def test_interrupted_overwrite_resumes_with_the_command_it_began_with(kind, tmp_path):
    files = images(tmp_path / "in", ["a", "b", "c", "d"])
    run(make(kind, tmp_path), files, 1.0)
    # --overwrite with other settings, interrupted after two images.
    todo, done = run(make(kind, tmp_path), files, 2.0, OTHER, overwrite=True, interrupt_after=2)
    assert len(todo) == 4 and done is None
    # The same command again: resumes, computes only the two left.
    todo, done = run(make(kind, tmp_path), files, 2.0, OTHER, overwrite=True)
    assert sorted(todo) == ["c", "d"]
    assert content(make(kind, tmp_path).target) == dict.fromkeys("abcd", 2.0)
    assert store.read_provenance(tmp_path / FLAVOURS[kind][1])["settings_hash"] == OTHER["settings_hash"]
    # --overwrite discards what existed before *this* run, once: a new --overwrite run starts over.
    todo, _ = run(make(kind, tmp_path), files, 3.0, OTHER, overwrite=True)
    assert len(todo) == 4


@pytest.mark.parametrize("kind", FLAVOURS)
def test_interrupted_overwrite_also_resumes_without_the_flag(kind, tmp_path):
    files = images(tmp_path / "in", ["a", "b", "c"])
    run(make(kind, tmp_path), files, 1.0)
    run(make(kind, tmp_path), files, 2.0, OTHER, overwrite=True, interrupt_after=1)
    todo, done = run(make(kind, tmp_path), files, 2.0, OTHER)
    assert sorted(todo) == ["b", "c"] and done.rows == 3
    assert content(make(kind, tmp_path).target) == dict.fromkeys("abc", 2.0)


@pytest.mark.parametrize("kind", FLAVOURS)
def test_other_settings_are_refused_for_complete_and_unfinished_output(kind, tmp_path):
    files = images(tmp_path / "in", ["a", "b"])
    run(make(kind, tmp_path), files, 1.0)
    with pytest.raises(SettingsMismatch, match=r"other settings \(flip=True there, False now\).*overwrite=True"):
        run(make(kind, tmp_path), files, 2.0, OTHER)
    run(make(kind, tmp_path), images(tmp_path / "in", ["c", "d"]) | files, 1.0, interrupt_after=1)
    with pytest.raises(SettingsMismatch, match="unfinished run with other settings.*overwrite=True"):
        run(make(kind, tmp_path), files, 2.0, OTHER)


HOLD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from featx.store import OutputLock
    lock = OutputLock(Path(sys.argv[1]))
    lock.acquire()
    print("held", flush=True)
    sys.stdin.read()
    lock.release()
""")


@pytest.fixture
def held(tmp_path):
    """Another process holding the lock of tmp_path/target."""
    target = tmp_path / "target"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield target, proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.mark.parametrize("kind", FLAVOURS)
def test_a_second_writer_is_refused_naming_the_holder(held, kind, tmp_path):
    target, proc = held
    cls, _ = FLAVOURS[kind]
    # A local run (file) and a Ray run (folder) on one -o take the same lock.
    with pytest.raises(Locked, match=rf"{target} is being written by pid {proc.pid} on .*--wait"), cls(target):
        pass


def test_a_waiting_writer_starts_when_the_holder_is_done(held):
    target, proc = held
    waiter = store.SingleFile(target, wait=True)
    # The holder lets go after a second, from a thread; the waiter queues until then.
    release = threading.Timer(1.0, proc.stdin.close)
    t = time.monotonic()
    release.start()
    with waiter:
        assert time.monotonic() - t >= 0.9
    proc.wait(timeout=30)


def test_pieces_of_two_runs_never_share_a_name(tmp_path):
    files = images(tmp_path / "in", ["a"])
    first, second = store.SingleFile(tmp_path / "f.parquet"), store.SingleFile(tmp_path / "f.parquet")
    for output in (first, second):  # without the lock: names alone must not collide
        output.begin(PROV, files)  # the second resumes the first's unfinished run
        output.add(rows(["a"], 1.0), [{"path": "a", "stage": "decode", "error": "E", "message": "m"}], index=0)
    assert len(first.pieces()) == 2 and len(first.error_pieces()) == 2


def test_legacy_files_without_stat_columns_are_trusted_by_path(tmp_path):
    files = images(tmp_path / "in", ["a", "b"])
    out = tmp_path / "f.parquet"
    pq.write_table(rows(["a"], 1.0), out)  # as featx wrote before it recorded stats
    todo, _done = run(store.SingleFile(out), files, 2.0)
    assert todo == ["b"] and content(out) == {"a": 1.0, "b": 2.0}
    assert pq.read_schema(out).names[-2:] == ["file_size", "file_mtime_ns"]
