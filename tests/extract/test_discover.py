"""Discovery: sorted, hidden files skipped, symlinked folders followed, loops guarded."""

from __future__ import annotations

import os
import threading

import pytest

from featx.evaluate.datasets import load_dataset
from featx.extract.discover import discover
from tests.fake_datasets import jpeg

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")


def _tree_with_links(tmp_path):
    """A Caltech-like tree: one real class, one class linked in from elsewhere, and two loops."""
    images = tmp_path / "caltech101" / "101_ObjectCategories"
    jpeg(images / "real" / "image_0001.jpg", 1)
    jpeg(images / "real" / "image_0002.jpg", 2)
    elsewhere = tmp_path / "elsewhere" / "linked"
    jpeg(elsewhere / "image_0001.jpg", 3)
    (images / "linked").symlink_to(elsewhere, target_is_directory=True)
    (images / "real" / "up").symlink_to(images, target_is_directory=True)  # a loop to the root
    (elsewhere / "self").symlink_to(elsewhere, target_is_directory=True)  # a loop to itself
    return images


def _discover_with_deadline(images):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("items", discover([images])), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "discovery did not finish: a symlink loop is followed forever"
    return out["items"]


@needs_symlinks
def test_symlinked_class_folders_are_followed_and_loops_skipped(tmp_path):
    images = _tree_with_links(tmp_path)
    items = _discover_with_deadline(images)
    assert [(i.path, i.label) for i in items] == [
        ("linked/image_0001.jpg", "linked"),
        ("real/image_0001.jpg", "real"),
        ("real/image_0002.jpg", "real"),
    ]


@needs_symlinks
def test_discovery_and_the_dataset_loader_list_the_same_images(tmp_path):
    images = _tree_with_links(tmp_path)
    index = load_dataset("caltech101", tmp_path)
    assert index.classes == ("linked", "real")
    assert list(index.paths) == [i.path for i in _discover_with_deadline(images)]
