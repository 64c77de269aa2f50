"""Discovery at scale: each folder is resolved once, and only links one by one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from featx.extract.discover import discover


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_discovery_resolves_folders_and_links_not_every_file(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "one.jpg")
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(5):
            os.link(tmp_path / "one.jpg", root / label / f"{i}.jpg")
    (root / "a" / "link.jpg").symlink_to(tmp_path / "one.jpg")
    (tmp_path / "real").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "real" / "x.jpg")
    (root / "c").symlink_to(tmp_path / "real")  # a linked folder: its files are found where they are
    resolved = []
    resolve = Path.resolve

    def counting(self, *args, **kwargs):
        resolved.append(self)
        return resolve(self, *args, **kwargs)

    monkeypatch.setattr(Path, "resolve", counting)
    items = {it.path: it.file for it in discover([root])}
    monkeypatch.setattr(Path, "resolve", resolve)
    assert len(items) == 12
    assert items["a/link.jpg"] == (tmp_path / "one.jpg").resolve()
    assert items["c/x.jpg"] == (tmp_path / "real" / "x.jpg").resolve()
    assert items["b/3.jpg"] == (root / "b" / "3.jpg").resolve()
    # root, a, b, c once each, and the one linked file: not each of the 12 files
    assert len([p for p in resolved if p.name != "link.jpg"]) <= 4
    assert len(resolved) <= 5
