"""The evaluate cache: keyed by settings and files, per-user by default, listed and removed
by `featx cache` without loading torch (issue 13.4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from featx import store
from featx.cli import app
from featx.evaluate.cache import (
    cached_features,
    entries,
    fingerprint,
)
from featx.extract.config import ExtractConfig
from featx.extract.discover import discover
from featx.userdirs import cache_dir as default_cache_dir
from tests.fake_datasets import jpeg

# pool5 at Q = 32 on a random vgg11: a second per image set.
TINY = ExtractConfig(
    model="vgg11", weights="random", layer="pool5", scales=(32,), flip=False, precision="fp32", workers=0
)


def _images(folder, seeds=(1, 2, 3)):
    for k, seed in enumerate(seeds):
        jpeg(folder / "cls" / f"image_{k:04d}.jpg", seed)
    return folder


def _features(path) -> dict[str, np.ndarray]:
    t = store.read_table(path, ["path", "feature"])
    return dict(zip(t.column("path").to_pylist(), store.feature_matrix(t.column("feature"))))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two image sets with the same names and settings but other pictures, cached once each."""
    tmp = tmp_path_factory.mktemp("cache")
    a = _images(tmp / "a")
    b = _images(tmp / "b", seeds=(4, 5))
    cache = tmp / "cache"
    A = cached_features([a], TINY, name="caltech101", cache_dir=cache)
    B = cached_features([b], TINY, name="voc2007", cache_dir=cache)
    return tmp, cache, A, B


def test_the_fingerprint_follows_the_files_not_the_folders_place(tmp_path):
    a = _images(tmp_path / "a")
    before = fingerprint(discover([a]))
    moved = tmp_path / "moved"
    shutil.copytree(a, moved, copy_function=shutil.copy2)  # same names, sizes, mtimes
    assert fingerprint(discover([moved])) == before
    jpeg(a / "cls" / "image_0009.jpg", 9)
    added = fingerprint(discover([a]))
    (a / "cls" / "image_0009.jpg").unlink()
    assert added != before and fingerprint(discover([a])) == before
    st = os.stat(a / "cls" / "image_0000.jpg")
    os.utime(a / "cls" / "image_0000.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fingerprint(discover([a])) != before  # touched: may hold another picture
    (a / "cls" / "image_0001.jpg").unlink()
    assert fingerprint(discover([a])) not in (before, added)


def test_copies_and_changed_copies_never_share_an_entry(made):
    tmp, cache, A, B = made
    assert A.file != B.file and B.new_rows == 2
    again = cached_features([tmp / "a"], TINY, name="caltech101", cache_dir=cache)
    assert (again.file, again.reused, again.new_rows) == (A.file, True, 0)
    # A copy that keeps names, sizes and mtimes (cp -a, rsync -a) is the same data: shared.
    copy = tmp / "a-copy"
    shutil.copytree(tmp / "a", copy, copy_function=shutil.copy2)
    assert cached_features([copy], TINY, name="caltech101", cache_dir=cache).file == A.file
    # One image replaced in place (same path): a new entry, whose row is the new picture's.
    jpeg(copy / "cls" / "image_0001.jpg", 7, size=(40, 40))
    changed = cached_features([copy], TINY, name="caltech101", cache_dir=cache)
    assert changed.file != A.file and changed.new_rows == 3
    old, new = _features(A.file), _features(changed.file)
    assert not np.allclose(old["cls/image_0001.jpg"], new["cls/image_0001.jpg"])
    np.testing.assert_array_equal(old["cls/image_0000.jpg"], new["cls/image_0000.jpg"])
    # Other settings (here the precision) never reuse an entry either.
    bf16 = cached_features([tmp / "a"], TINY.replace(precision="bf16"), name="caltech101", cache_dir=cache)
    assert bf16.file != A.file and store.read_provenance(bf16.file)["precision"] == "bf16"


def test_the_default_cache_is_per_user(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "featx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "featx"
    # A relative XDG_CACHE_HOME is ignored, as the XDG spec says.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "featx"


def test_features_are_cached_under_xdg_cache_home_by_default(made, tmp_path, monkeypatch):
    tmp, cache, A, _ = made
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache, tmp_path / "xdg" / "featx")
    got = cached_features([tmp / "a"], TINY, name="caltech101")
    assert got.file == tmp_path / "xdg" / "featx" / A.file.name and got.reused
    assert not (tmp_path / ".featx-cache").exists()


def _cache(*args):
    return CliRunner().invoke(app, ["cache", *map(str, args)])


def test_cache_ls_and_rm(made, tmp_path):
    _, made_cache, A, B = made
    cache = tmp_path / "cache"
    shutil.copytree(made_cache, cache)
    for f in cache.glob("*bf16*"):
        f.unlink()
    names = [e.name for e in entries(cache)]
    assert A.file.stem in names and B.file.stem in names
    listed = _cache("ls", "--cache-dir", cache)
    assert listed.exit_code == 0, listed.output
    out = listed.stdout
    assert all(n in out for n in names)
    assert "caltech101, vgg11 pool5 Q=32 no flip fp32" in out and "3 images" in out
    assert "voc2007, vgg11" in out and "2 images" in out
    assert "KiB" in out and f"{len(names)} entries" in listed.stderr
    info = json.loads(A.file.with_suffix(".json").read_text())
    assert info["name"] == "caltech101" and info["images"] == 3

    assert _cache("rm", "--cache-dir", cache).exit_code == 2  # neither entries nor --all
    missing = _cache("rm", "nope", "--cache-dir", cache)
    assert missing.exit_code == 2 and "featx cache ls" in missing.stderr
    removed = _cache("rm", A.file.stem, "--cache-dir", cache)
    assert removed.exit_code == 0 and "freed" in removed.stderr
    assert A.file.stem not in [e.name for e in entries(cache)] and B.file.stem in [e.name for e in entries(cache)]
    assert not list(cache.glob(f"{A.file.stem}*"))
    assert _cache("rm", "--all", "--cache-dir", cache).exit_code == 0
    assert entries(cache) == [] and os.listdir(cache) == []


def test_cache_ls_loads_no_heavy_library(made):
    _, cache, _, _ = made
    code = (
        "import sys, json; from featx.cli import app\n"
        "try:\n    app(['cache', 'ls', '--cache-dir', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'torchvision', 'sklearn', 'scipy')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True, text=True, timeout=120)
    assert "caltech101-vgg11-" in proc.stdout
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []


def test_cache_rm_refuses_an_entry_being_extracted(made, tmp_path):
    _, made_cache, A, _ = made
    cache = tmp_path / "cache"
    shutil.copytree(made_cache, cache)
    with store.OutputLock(cache / A.file.name):  # as an evaluation extracting into it holds it
        refused = _cache("rm", A.file.stem, "--cache-dir", cache)
    assert refused.exit_code == 2 and "being written by" in refused.stderr
    assert (cache / A.file.name).is_file()
    assert _cache("rm", A.file.stem, "--cache-dir", cache).exit_code == 0
    assert not (cache / A.file.name).exists()
