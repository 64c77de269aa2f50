"""featx.evaluate.metrics against cases computed by hand (VOC devkit VOCevalcls.m conventions)."""

import numpy as np
import pytest

from featx.evaluate.metrics import (
    mean_ap,
    mean_class_recall,
    precision_recall,
    voc07_ap,
    voc_ap,
)


def test_mean_class_recall_averages_per_class_not_per_image():
    y_true = ["a", "a", "b", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a", "c"]
    # a: 1/2, b: 2/3, c: 1/1; plain accuracy would be 4/6.
    assert mean_class_recall(y_true, y_pred) == pytest.approx((0.5 + 2 / 3 + 1) / 3)


def test_mean_class_recall_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal length"):
        mean_class_recall([0, 1], [0])


# Ranking 1, -1, 1, -1: recall .5 .5 1 1, precision 1 .5 2/3 .5.
LABELS = [1, -1, 1, -1]
SCORES = [0.9, 0.8, 0.7, 0.6]


def test_precision_recall_by_hand():
    precision, recall = precision_recall(LABELS, SCORES)
    np.testing.assert_allclose(precision, [1, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1, 1])


def test_voc07_ap_eleven_points_by_hand():
    # t = 0 .. 0.5 reach precision 1 (6 points), t = 0.6 .. 1 reach 2/3 (5 points).
    assert voc07_ap(LABELS, SCORES) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_voc_ap_area_by_hand():
    # Recall steps 0 -> .5 at precision 1, .5 -> 1 at interpolated precision 2/3.
    assert voc_ap(LABELS, SCORES) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


@pytest.mark.parametrize("ap", [voc07_ap, voc_ap])
def test_difficult_images_are_ignored(ap):
    with_difficult = [1, 0, -1, 0, 1]
    scores = [0.9, 0.85, 0.8, 0.75, 0.7]
    assert ap(with_difficult, scores) == pytest.approx(ap([1, -1, 1], [0.9, 0.8, 0.7]))


@pytest.mark.parametrize("ap", [voc07_ap, voc_ap])
def test_perfect_and_worst_rankings(ap):
    assert ap([1, 1, -1, -1], [4, 3, 2, 1]) == pytest.approx(1.0)
    # The only positive ranked third: precision 1/3 at every recall level.
    assert ap([-1, -1, 1], [3, 2, 1]) == pytest.approx(1 / 3)


def test_ties_keep_input_order_like_the_devkit():
    # Equal scores: MATLAB's stable sort ranks the first-listed image first.
    assert voc_ap([1, -1], [0.5, 0.5]) == pytest.approx(1.0)
    assert voc_ap([-1, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_no_positive_gives_nan_and_mean_ap_skips_it():
    assert np.isnan(voc07_ap([-1, -1, 0], [1, 2, 3]))
    labels = np.array([[1, -1], [-1, -1], [1, 0]])
    scores = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3]])
    value, per_class = mean_ap(labels, scores, ap=voc_ap)
    assert value == pytest.approx(1.0)
    assert np.isnan(per_class[1])


def test_bad_labels_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"1 \(positive\), -1 \(negative\) or 0"):
        voc_ap([2, 1], [0.1, 0.2])
