"""Metrics against numbers worked out by hand on tiny examples, and plots that write real PNGs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ltrepro.errors import LtreproError
from ltrepro.evaluate import (
    balanced_accuracy,
    confusion_matrix,
    expected_calibration_error,
    per_class_accuracy,
    plot_confusion,
    plot_per_class,
    plot_reliability,
    save_plots,
    shot_groups,
    summarize,
)

# 3 classes, 6 test images. Softmax of log(p) is p, so these rows are the predicted probabilities.
#   image  label  probs               pred  conf  correct  15-bin ECE bin (k/15, (k+1)/15]
#   0      0      .70  .20  .10       0     .70   yes      10
#   1      0      .60  .30  .10       0     .60   yes       8 (0.6 = 9/15 is a right edge)
#   2      0      .30  .50  .20       1     .50   no        7
#   3      1      .10  .80  .10       1     .80   yes      11 (0.8 = 12/15 is a right edge)
#   4      1      .20  .35  .45       2     .45   no        6
#   5      2      .05  .05  .90       2     .90   yes      13
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.60, 0.30, 0.10],
        [0.30, 0.50, 0.20],
        [0.10, 0.80, 0.10],
        [0.20, 0.35, 0.45],
        [0.05, 0.05, 0.90],
    ]
)
LOGITS = np.log(PROBS)
LABELS = np.array([0, 0, 0, 1, 1, 2])
PRED = np.array([0, 0, 1, 1, 2, 2])
# many = classes 0 and 1 (> 100), medium = none, few = class 2 (< 20)
TRAIN_COUNTS = np.array([150, 120, 10])


def test_shot_group_thresholds() -> None:
    groups = shot_groups(np.array([500, 101, 100, 20, 19, 5]))
    assert groups["many"].tolist() == [True, True, False, False, False, False]
    assert groups["medium"].tolist() == [False, False, True, True, False, False]
    assert groups["few"].tolist() == [False, False, False, False, True, True]


def test_per_class_balanced_and_confusion() -> None:
    # class 0: 2 of 3 right, class 1: 1 of 2, class 2: 1 of 1
    np.testing.assert_allclose(per_class_accuracy(PRED, LABELS, 3), [200 / 3, 50.0, 100.0])
    assert balanced_accuracy(PRED, LABELS, 3) == pytest.approx((200 / 3 + 50 + 100) / 3)  # 72.22
    assert confusion_matrix(PRED, LABELS, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_classes_absent_from_the_test_labels_are_nan_and_skipped() -> None:
    accs = per_class_accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]), 4)
    np.testing.assert_allclose(accs, [50.0, 100.0, np.nan, np.nan])
    assert balanced_accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]), 4) == pytest.approx(75.0)


def test_ece_bins_are_right_closed() -> None:
    # 0.6 = 9/15 belongs to bin (8/15, 9/15] with 0.58; 0.65 sits alone in (9/15, 10/15].
    # bin 8: acc 1/2, conf 0.59 -> 2/3 * 0.09 = 0.06; bin 9: acc 1, conf 0.65 -> 1/3 * 0.35 = 0.11667
    # total 0.17667. (Left-closed bins would give 1/3 * 0.42 + 2/3 * 0.125 = 0.22333.)
    ece = expected_calibration_error(np.array([0.6, 0.58, 0.65]), np.array([False, True, True]))
    assert ece == pytest.approx(17.6667, abs=1e-4)


def test_ece_simple_cases() -> None:
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True])) == 0.0
    # separate bins: (|1 - 0.55| + |0 - 0.95|) / 2 = 0.70
    assert expected_calibration_error(np.array([0.55, 0.95]), np.array([True, False])) == pytest.approx(70.0)


def test_summarize_matches_hand_computed_values() -> None:
    s = summarize(LOGITS, LABELS, TRAIN_COUNTS)
    assert s["top1"] == pytest.approx(400 / 6)  # 4 of 6 images right: 66.67
    assert s["balanced"] == pytest.approx(650 / 9)  # (66.67 + 50 + 100) / 3 = 72.22
    assert s["many"] == pytest.approx(60.0)  # images of classes 0 and 1: 3 of 5 right
    assert math.isnan(s["medium"])  # no class has 20..100 training images
    assert s["few"] == pytest.approx(100.0)
    # every image sits in its own bin: (0.3 + 0.4 + 0.5 + 0.2 + 0.45 + 0.1) / 6 = 0.325
    assert s["ece"] == pytest.approx(32.5)
    # -(ln .7 + ln .6 + ln .3 + ln .8 + ln .35 + ln .9) / 6
    # = (0.356675 + 0.510826 + 1.203973 + 0.223144 + 1.049822 + 0.105361) / 6 = 3.449801 / 6
    assert s["nll"] == pytest.approx(0.574967, abs=1e-6)
    np.testing.assert_allclose(s["per_class"], [200 / 3, 50.0, 100.0])
    assert np.asarray(s["confusion"]).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_summarize_group_averages_images_not_classes() -> None:
    # many = class 0 only: 2 of 3; medium = class 1: 1 of 2; few = class 2: 1 of 1
    s = summarize(LOGITS, LABELS, np.array([500, 50, 5]))
    assert (s["many"], s["medium"], s["few"]) == pytest.approx((200 / 3, 50.0, 100.0))


def test_summarize_group_without_test_images_is_nan() -> None:
    s = summarize(LOGITS[:5], LABELS[:5], np.array([150, 50, 10]))  # class 2 (few) never in the labels
    assert math.isnan(s["few"])
    assert s["medium"] == pytest.approx(50.0)


@pytest.mark.filterwarnings("error")
def test_summarize_is_stable_for_large_logits() -> None:
    shifted = summarize(LOGITS + 1000.0, LABELS, TRAIN_COUNTS)
    plain = summarize(LOGITS, LABELS, TRAIN_COUNTS)
    for key in ("top1", "balanced", "many", "few", "ece", "nll"):
        assert shifted[key] == pytest.approx(plain[key], abs=1e-9)
    s = summarize(np.array([[800.0, 0.0], [0.0, 800.0]]), np.array([0, 1]), np.array([200, 200]))
    assert s["nll"] == 0.0 and s["ece"] == 0.0 and s["top1"] == 100.0


def test_summarize_rejects_mismatched_shapes() -> None:
    with pytest.raises(LtreproError, match="logits"):
        summarize(LOGITS, LABELS, np.array([150, 120, 10, 5]))


def assert_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_files(tmp_path) -> None:
    names = ["a", "b", "c"]
    paths = save_plots(LOGITS, LABELS, TRAIN_COUNTS, names, tmp_path / "plots")
    assert [p.name for p in paths] == ["per_class.png", "confusion.png", "reliability.png"]
    for path in paths:
        assert_png(path)
    confidence, correct = PROBS.max(axis=1), PRED == LABELS
    assert_png(plot_per_class(np.array([50.0, np.nan, 100.0]), TRAIN_COUNTS, tmp_path / "pc.png"))
    assert_png(plot_confusion(np.zeros((3, 3), dtype=int), names, tmp_path / "cm.png"))
    assert_png(plot_reliability(confidence, correct, tmp_path / "rel.png"))
