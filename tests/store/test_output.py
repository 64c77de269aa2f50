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
from featx.errors import BadInput, Locked, SettingsMismatch

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
    with pytest.raises(Locked, match=rf"{target} is being written by pid {proc.pid} on .*wait=True"), cls(target):
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


# -- issue 22: outputs featx cannot read, shared errors files, what a run leaves behind --------


def damaged_outputs(folder: Path) -> dict[str, Path]:
    """OUT files a run without --overwrite must refuse in one line and --overwrite must replace."""
    import pyarrow as pa

    folder.mkdir(exist_ok=True)
    made = {}
    made["garbage"] = folder / "garbage.parquet"
    made["garbage"].write_bytes(b"not parquet at all\n" * 10)
    complete = folder / "complete.parquet"
    run(store.SingleFile(complete), images(folder / "in", ["a", "b"]), 1.0)
    made["truncated"] = folder / "truncated.parquet"
    made["truncated"].write_bytes(complete.read_bytes()[:-100])
    made["foreign"] = folder / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), made["foreign"])
    made["foreign_with_featx_key"] = folder / "foreign_with_featx_key.parquet"
    pq.write_table(
        pa.table({"x": [1]}).replace_schema_metadata({"featx": '{"settings_hash": "x"}'}),
        made["foreign_with_featx_key"],
    )
    made["featx_key_not_an_object"] = folder / "featx_key_not_an_object.parquet"
    pq.write_table(rows(["a"], 1.0).replace_schema_metadata({"featx": "[1, 2]"}), made["featx_key_not_an_object"])
    return made


@pytest.mark.parametrize(
    "damage", ["garbage", "truncated", "foreign", "foreign_with_featx_key", "featx_key_not_an_object"]
)
def test_an_output_featx_cannot_read_is_refused_in_one_line_and_overwrite_replaces_it(damage, tmp_path):
    target = damaged_outputs(tmp_path)[damage]
    files = images(tmp_path / "in", ["a", "b"])
    with pytest.raises(BadInput, match=rf"{target} .*pass overwrite=True to replace it, or choose another output"):
        run(store.SingleFile(target), files, 2.0)
    todo, done = run(store.SingleFile(target), files, 2.0, overwrite=True)
    assert sorted(todo) == ["a", "b"] and done.rows == 2
    assert content(target) == {"a": 2.0, "b": 2.0}
    assert (done.changes.added, done.changes.replaced, done.changes.dropped) == (2, 0, 0)


@pytest.mark.parametrize("first, second", [("out.parquet", "out"), ("out", "out.parquet")])
def test_each_output_owns_its_errors_file(first, second, tmp_path):
    """`-o out` and `-o out.parquet` would list failures in one `out.errors.parquet`: the second
    is refused before any work, and the first one's failures stay."""
    files = images(tmp_path / "in", ["a", "b"])
    with store.SingleFile(tmp_path / first) as output:
        output.begin(PROV, files)
        output.add(rows(["a"], 1.0), [{"path": "b", "stage": "decode", "error": "E", "message": "m"}])
        output.finish(store.feature_schema(DIM, PROV))
    errors = store.errors_path(tmp_path / first)
    assert errors == tmp_path / "out.errors.parquet" and errors.exists()
    for cls in (store.SingleFile, store.DatasetFolder):
        with pytest.raises(BadInput, match=rf"would list its failures in {errors}, which {tmp_path / first} beside"):
            cls(tmp_path / second).check_target()
    assert pq.read_table(errors).column("path").to_pylist() == ["b"]


def test_an_errors_file_name_is_no_output_and_an_image_folder_beside_is_no_other_output(tmp_path):
    with pytest.raises(BadInput, match="names ending in .errors.parquet are featx's lists of failures"):
        store.SingleFile(tmp_path / "x.errors.parquet").check_target()
    # `featx extract samples -o samples.parquet`: the image folder is not an output.
    files = images(tmp_path / "samples", ["a"])
    todo, done = run(store.SingleFile(tmp_path / "samples.parquet"), files, 1.0)
    assert todo == ["a"] and done.rows == 1


@pytest.mark.parametrize("kind", FLAVOURS)
def test_a_run_leaves_no_lock_files_and_removes_what_killed_runs_left(kind, tmp_path):
    files = images(tmp_path / "in", ["a"])
    output = make(kind, tmp_path)
    name = output.target.name
    run(output, files, 1.0)
    beside = {p.name for p in tmp_path.iterdir()}
    assert not {f".{name}.lock", f".{name}.lock.json"} & beside
    # A killed run's temporaries, and a stranger's file of the same shape that is not ours.
    errors_name = store.errors_path(output.target).name
    ours = [f".{name}.123-0a1b2c3d.tmp", f".{errors_name}.77-deadbeef.tmp", f"..{name}.lock.json.5-01234567.tmp"]
    theirs = [f".other{name}.123-0a1b2c3d.tmp", f".{name}.backup"]
    for f in ours + theirs:
        (tmp_path / f).write_bytes(b"left behind")
    todo, done = run(make(kind, tmp_path), files, 1.0)  # nothing to do: still cleans up
    assert todo == [] and done is None
    beside = {p.name for p in tmp_path.iterdir()}
    assert not set(ours) & beside and set(theirs) <= beside
    assert not {f".{name}.lock", f".{name}.lock.json"} & beside


def test_a_lock_file_removed_by_its_holder_is_never_held_twice(held, tmp_path):
    """The holder removes its lock file as it lets go: a waiter queued on that file must not
    believe it holds the lock while a newcomer locks the new file at the same path."""
    target, proc = held
    got = threading.Event()
    waiter = store.OutputLock(target, wait=True)
    t = threading.Thread(target=lambda: (waiter.acquire(), got.set()), daemon=True)
    t.start()
    time.sleep(0.5)  # queued behind the holder, on the file it locked
    assert not got.is_set()
    proc.stdin.close()
    proc.wait(timeout=30)
    assert got.wait(30)
    with pytest.raises(Locked):  # the waiter holds it now: a newcomer is refused
        store.OutputLock(target).acquire()
    waiter.release()
    t.join(30)
    with store.OutputLock(target):
        pass
    assert not list(tmp_path.glob(".target.lock*"))


@pytest.mark.parametrize("kind", FLAVOURS)
def test_a_rerun_that_only_retries_failures_leaves_the_output_as_it_is(kind, tmp_path):
    """Found by the fuzz (issue 22.19): failures are tried again on every run, and failing again
    they rewrote OUT and its record of the last change although no row changed."""
    files = images(tmp_path / "in", ["a", "b"])
    failure = [{"path": "b", "stage": "decode", "error": "E", "message": "m"}]
    for _ in range(2):
        with make(kind, tmp_path) as output:
            todo = output.begin(PROV, files)
            assert "b" in todo
            output.add(rows(["a"], 1.0) if "a" in todo else None, failure)
            done = output.finish(store.feature_schema(DIM, PROV)) if kind == "file" else output.finish()
        if _ == 0:
            first = store.read_last_run(output.target)
            stamp = [(p, p.stat().st_mtime_ns) for p in sorted(output.target.parent.rglob("*.parquet"))]
    assert done.rows == 1 and done.failures == 1
    assert (done.changes.added, done.changes.replaced, done.changes.dropped) == (0, 0, 0)
    assert store.read_last_run(output.target) == first
    rows_files = [(p, m) for p, m in stamp if not p.name.endswith("errors.parquet")]
    assert all(p.stat().st_mtime_ns == m for p, m in rows_files)


@pytest.mark.parametrize("kind", FLAVOURS)
def test_features_are_stored_plain_without_a_dictionary_beside_them(kind, tmp_path):
    """A descriptor's floats take their own size on disk (pyarrow's default dictionary attempt
    left a full dictionary page beside them: 1.56x for 4096-D rows); paths and labels keep theirs."""
    dim, n = 4096, 64
    prov = PROV | {"dim": dim}
    schema = store.feature_schema(dim, prov)
    names = [f"{i}.jpg" for i in range(n)]
    X = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    table = store.rows_table(schema, names, ["c"] * n, [1] * n, [1] * n, X)
    output = make(kind, tmp_path)
    with output:
        output.begin(prov, images(tmp_path / "img", names), False)
        output.add(table, [])
        output.finish(schema) if kind == "file" else output.finish()
    files = [tmp_path / FLAVOURS[kind][1]] if kind == "file" else store.feature_files(tmp_path / "features")
    for f in files:
        group = pq.ParquetFile(f).metadata.row_group(0)
        columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
        feature = columns["feature.list.element"]
        assert "RLE_DICTIONARY" not in feature.encodings and "PLAIN_DICTIONARY" not in feature.encodings
        assert feature.total_compressed_size <= 1.02 * X.nbytes
        assert "RLE_DICTIONARY" in columns["path"].encodings
