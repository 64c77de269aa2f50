"""Dataset registry and listing on fake copies in the real Caltech and VOC layouts."""

import numpy as np
import pytest

from featx.evaluate.datasets import DATASETS, VOC_CLASSES, get_spec, load_dataset
from tests.fake_datasets import make_caltech, make_voc


def test_registry_holds_the_official_facts():
    c101 = DATASETS["caltech101"]
    assert c101.archives[0].md5 == "3138e1922a9193bfa496528edbbc45d0"
    assert c101.archives[0].urls[0].startswith("https://data.caltech.edu/")
    assert c101.n_classes == 102 and c101.background == "BACKGROUND_Google"
    assert DATASETS["caltech256"].archives[0].md5 == "67b4f42ca05d46448c6bb8ecd2220f6d"
    assert [a.md5 for a in DATASETS["voc2007"].archives] == [
        "c52e279531787c972589f7e41ab4ae64",
        "b6e924de25625d8de591ea690078ad9f",
    ]
    assert DATASETS["voc2012"].archives[0].md5 == "6cd6e144f989b92b3379bac3b3de84fd"
    assert all("robots.ox.ac.uk" in u for a in DATASETS["voc2012"].archives for u in a.urls)
    assert (DATASETS["voc2012"].train_set, DATASETS["voc2012"].test_set) == ("train", "val")
    assert len(VOC_CLASSES) == 20


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="caltech101, caltech256, voc2007, voc2012"):
        get_spec("cifar10")


def test_caltech_keeps_background_and_separate_faces_and_skips_strays(tmp_path):
    make_caltech(tmp_path / "caltech101" / "101_ObjectCategories")
    index = load_dataset("caltech101", tmp_path)
    assert index.classes == ("BACKGROUND_Google", "Faces", "Faces_easy", "anchor")
    assert len(index) == 24
    assert not any(p.endswith((".txt", ".DS_Store")) for p in index.paths)
    assert list(index.paths) == sorted(index.paths)
    assert index.paths[0] == "BACKGROUND_Google/image_0001.jpg"
    np.testing.assert_array_equal(np.bincount(index.labels), [6, 6, 6, 6])
    # A fake copy is much smaller than the real one: said, not refused.
    assert "incomplete (4 of 102 class folders, 24 of 9144 images)" in index.problems[0]


def test_no_background_drops_the_background_class(tmp_path):
    make_caltech(tmp_path / "caltech101" / "101_ObjectCategories")
    index = load_dataset("caltech101", tmp_path, background=False)
    assert "BACKGROUND_Google" not in index.classes and len(index) == 18


def test_bare_class_folder_tree_is_accepted(tmp_path):
    # ../shared/data/caltech101-mini is laid out as DIR/101_ObjectCategories/<class>/.
    make_caltech(tmp_path / "101_ObjectCategories")
    assert load_dataset("caltech101", tmp_path).image_dir == tmp_path / "101_ObjectCategories"


def test_missing_caltech_says_where_to_put_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("caltech101", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "caltech101" / "101_ObjectCategories") in message
    assert "caltech-101.zip" in message and "download=True" in message
    assert "3138e1922a9193bfa496528edbbc45d0" in message


def test_voc_labels_sets_and_difficult(tmp_path):
    make_voc(tmp_path, "2007", {"trainval": 10, "test": 8})
    index = load_dataset("voc2007", tmp_path)
    assert index.classes == VOC_CLASSES
    assert index.labels.shape == (18, 20)
    assert set(np.unique(index.labels)) == {-1, 0, 1}
    assert len(index.subsets["trainval"]) == 10 and len(index.subsets["test"]) == 8
    assert not set(index.subsets["trainval"]) & set(index.subsets["test"])
    # Image 000001 is difficult-only for tvmonitor (class 19).
    assert index.labels[0, 19] == 0
    # Only listed images: the unlisted 999999.jpg is not part of the dataset.
    assert "999999.jpg" not in index.paths
    assert index.image_dir.name == "JPEGImages"


def test_voc2012_uses_train_and_val(tmp_path):
    make_voc(tmp_path, "2012", {"train": 6, "val": 5})
    index = load_dataset("voc2012", tmp_path)
    assert set(index.subsets) == {"train", "val"}


def test_voc_without_test_set_names_the_archive(tmp_path):
    make_voc(tmp_path, "2007", {"trainval": 4})
    with pytest.raises(FileNotFoundError, match=r"test set incomplete.*test\.txt.*VOCtest_06-Nov-2007\.tar"):
        load_dataset("voc2007", tmp_path)


def test_voc_missing_images_are_counted(tmp_path):
    base = make_voc(tmp_path, "2007", {"trainval": 4, "test": 3})
    (base / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images listed .* missing .*first: 000002\.jpg"):
        load_dataset("voc2007", tmp_path)


def test_voc_damaged_label_file_is_refused(tmp_path):
    base = make_voc(tmp_path, "2007", {"trainval": 4, "test": 3})
    (base / "ImageSets" / "Main" / "cat_test.txt").write_text("000005 2\n")
    with pytest.raises(ValueError, match=r"cat_test\.txt:1: expected"):
        load_dataset("voc2007", tmp_path)


def test_no_background_is_refused_for_voc(tmp_path):
    make_voc(tmp_path, "2007", {"trainval": 4, "test": 3})
    with pytest.raises(ValueError, match="Caltech only"):
        load_dataset("voc2007", tmp_path, background=False)
