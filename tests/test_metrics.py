"""The one mIoU of the package, pinned on hand-computed cases: which pixels count, what is NaN, the means."""

from __future__ import annotations

import math

import numpy as np
import pytest

from labelstudio_maskclip.evaluation.metrics import IGNORE, confusion_matrix, iou, mean_iou, scores


def test_confusion_matrix_counts_rows_of_ground_truth_and_columns_of_prediction():
    gt = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(gt, pred, 3)
    assert conf.dtype == np.int64 and conf.shape == (3, 4)
    assert conf.tolist() == [
        [1, 1, 0, 0],  # gt 0: one right, one called 1
        [0, 2, 0, 0],  # gt 1: both right
        [1, 0, 1, 0],  # gt 2: one called 0, one right
    ]


def test_ground_truth_outside_the_classes_is_not_counted_at_either_edge():
    # -1, K (just past the last class), IGNORE: none of them is a labelled pixel; 0 and K - 1 are
    gt = np.array([-1, 0, 2, 3, IGNORE])
    pred = np.array([0, 0, 2, 0, 0])
    conf = confusion_matrix(gt, pred, 3)
    assert conf.sum() == 2
    assert conf[0, 0] == 1 and conf[2, 2] == 1


def test_a_custom_ignore_value_is_left_out_and_the_default_one_then_counts_if_in_range():
    gt = np.array([0, 1, 1])
    assert confusion_matrix(gt, np.array([0, 1, 1]), 2, ignore_index=1).sum() == 1
    assert confusion_matrix(gt, np.array([0, 1, 1]), 2, ignore_index=IGNORE).sum() == 3


def test_a_prediction_outside_the_classes_is_a_miss_in_the_last_column_at_either_edge():
    gt = np.array([0, 0, 1, 1, 1])
    pred = np.array([-1, 0, 2, 1, IGNORE])  # -1, K and 255 are "no prediction"; 0 and K - 1 are classes
    conf = confusion_matrix(gt, pred, 2)
    assert conf.tolist() == [[1, 0, 1], [0, 1, 2]]


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)


def test_iou_per_class_by_hand_and_nan_only_where_the_class_is_nowhere():
    # gt:   0 0 0 1      pred: 0 0 1 1     class 2 in neither, class 3 predicted only
    gt = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 3])
    values = iou(confusion_matrix(gt, pred, 4))
    assert values[0] == pytest.approx(2 / 3)  # TP 2, union 3
    assert values[1] == pytest.approx(1 / 3)  # TP 1, gt 2 + pred 2 - 1
    assert math.isnan(values[2])
    assert values[3] == 0.0  # painted where it is absent: defined, zero
    assert mean_iou(confusion_matrix(gt, pred, 4)) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)


def test_a_class_only_missed_has_iou_zero_and_a_perfect_one_has_one():
    gt = np.array([0, 0, 1])
    pred = np.array([0, 0, -1])  # class 1 never predicted: its pixel is a miss
    values = iou(confusion_matrix(gt, pred, 2))
    assert values.tolist() == [1.0, 0.0]


def test_mean_iou_is_none_without_a_labelled_pixel():
    conf = confusion_matrix(np.full(4, IGNORE), np.zeros(4, int), 3)
    assert conf.sum() == 0
    assert mean_iou(conf) is None
    assert mean_iou(confusion_matrix(np.array([1]), np.array([1]), 3)) == 1.0


def test_scores_by_hand():
    gt = np.array([0, 0, 0, 1, 1, IGNORE])
    pred = np.array([0, 0, 1, 1, 1, 0])
    s = scores(confusion_matrix(gt, pred, 3))
    assert s["IoU"][0] == pytest.approx(2 / 3) and s["IoU"][1] == pytest.approx(2 / 3)
    assert math.isnan(s["IoU"][2])
    assert s["Acc"][0] == pytest.approx(2 / 3) and s["Acc"][1] == 1.0 and math.isnan(s["Acc"][2])
    assert s["mIoU"] == pytest.approx(2 / 3)
    assert s["mAcc"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["aAcc"] == pytest.approx(4 / 5)


def test_scores_of_nothing_labelled_are_nan_not_an_error():
    s = scores(confusion_matrix(np.full(3, IGNORE), np.zeros(3, int), 2))
    assert math.isnan(s["mIoU"]) and math.isnan(s["mAcc"]) and math.isnan(s["aAcc"])
    assert np.isnan(s["IoU"]).all() and np.isnan(s["Acc"]).all()


def test_accuracy_of_a_class_predicted_but_absent_is_undefined_not_zero():
    s = scores(confusion_matrix(np.array([0, 0]), np.array([0, 1]), 2))
    assert s["Acc"][0] == 0.5 and math.isnan(s["Acc"][1])
    assert s["IoU"][1] == 0.0
    assert s["mAcc"] == 0.5


def test_inputs_of_other_integer_types_and_shapes_count_the_same():
    gt = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    pred = np.array([[0, 1], [0, 1]], dtype=np.int32)
    assert confusion_matrix(gt, pred, 2).tolist() == confusion_matrix(gt.ravel().astype(int), pred.ravel(), 2).tolist()
    assert confusion_matrix(gt, pred, 2).tolist() == [[1, 0, 0], [1, 2, 0]]


def test_ignore_is_255_and_is_left_out_even_when_there_are_more_classes():
    assert IGNORE == 255  # the 8-bit "no label" of label PNGs
    gt = np.array([IGNORE, 3])
    conf = confusion_matrix(gt, np.array([IGNORE, 3]), 300)
    assert conf.sum() == 1 and conf[3, 3] == 1


def test_a_class_of_one_pixel_has_an_accuracy():
    s = scores(confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), 2))
    assert s["Acc"].tolist() == [1.0, 1.0] and s["mAcc"] == 1.0
