"""Seeded protocol splits: sizes, no overlap, reproducibility, held-out part for choosing C."""

import numpy as np
import pytest

from featx.evaluate.splits import caltech_splits, fixed_splits, holdout_split

# 4 classes of 40, 35, 31 and 60 images.
LABELS = np.repeat(np.arange(4), [40, 35, 31, 60])


def test_caltech_split_sizes_follow_the_paper():
    splits = caltech_splits(LABELS, n_train=30, n_test=50, splits=3, seed=0)
    assert [s.seed for s in splits] == [0, 1, 2]
    for s in splits:
        np.testing.assert_array_equal(np.bincount(LABELS[s.train]), [30, 30, 30, 30])
        # Up to 50 test images per class: the rest of the small classes, 50 of the big one.
        np.testing.assert_array_equal(np.bincount(LABELS[s.test]), [10, 5, 1, 30])


def test_caltech256_takes_all_the_rest_for_test():
    (s,) = caltech_splits(LABELS, n_train=30, n_test=None, splits=1, seed=0)
    assert len(s.train) + len(s.test) == len(LABELS)


def test_no_train_test_overlap():
    for s in caltech_splits(LABELS, n_train=30, n_test=50, splits=3, seed=5):
        assert not set(s.train) & set(s.test)


def test_same_seed_same_splits_other_seed_other_splits():
    a = caltech_splits(LABELS, n_train=30, n_test=50, splits=2, seed=7)
    b = caltech_splits(LABELS, n_train=30, n_test=50, splits=2, seed=7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.train, y.train)
        np.testing.assert_array_equal(x.test, y.test)
    assert not np.array_equal(a[0].train, a[1].train)
    # One split with seed 8 is the second split of a run with seed 7.
    (c,) = caltech_splits(LABELS, n_train=30, n_test=50, splits=1, seed=8)
    np.testing.assert_array_equal(c.train, a[1].train)


def test_class_too_small_names_it_and_the_fix():
    with pytest.raises(ValueError, match=r"fewer than n_train \+ 1 = 41 images: a \(40\), b \(35\), c \(31\).*n_train"):
        caltech_splits(LABELS, n_train=40, n_test=50, splits=1, seed=0, classes=("a", "b", "c", "d"))


def test_fixed_splits_only_change_the_seed():
    splits = fixed_splits(np.arange(5), np.arange(5, 9), splits=2, seed=3)
    assert [s.seed for s in splits] == [3, 4]
    np.testing.assert_array_equal(splits[1].test, np.arange(5, 9))


def test_holdout_is_stratified_twenty_percent():
    y = np.repeat(np.arange(3), 30)
    fit, val = holdout_split(y, 0.2, seed=0)
    np.testing.assert_array_equal(np.bincount(y[val]), [6, 6, 6])
    assert not set(fit) & set(val) and len(fit) + len(val) == len(y)
    _fit2, val2 = holdout_split(y, 0.2, seed=0)
    np.testing.assert_array_equal(val, val2)


def test_holdout_keeps_every_class_in_the_fit_part():
    y = np.array([0, 0, 1, 1, 1, 2])
    fit, _val = holdout_split(y, 0.2, seed=0)
    assert set(y[fit]) == {0, 1, 2}


def test_holdout_multilabel_is_random_over_rows():
    Y = np.ones((10, 3))
    fit, val = holdout_split(Y, 0.2, seed=1, stratify=False)
    assert len(val) == 2 and len(fit) == 8


@pytest.mark.parametrize("fraction", [0, 1, 1.5])
def test_holdout_fraction_must_be_a_fraction(fraction):
    with pytest.raises(ValueError, match="between 0 and 1"):
        holdout_split(np.zeros(10), fraction, seed=0)
