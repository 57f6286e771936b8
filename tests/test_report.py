"""ltrepro.report: paired differences against a baseline with t intervals, and the test-selection
optimism (hand values)."""
import math

import numpy as np
import pytest

from ltrepro.report import COLUMNS, baseline_row, optimism_figures, paired_table, t_interval

T_975_2DF = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom


def metrics(top1: float, few: float) -> dict:
    return {column: 50.0 for column in COLUMNS} | {"test_top1": top1, "test_few": few}


def test_t_interval_of_three_paired_differences():
    mean, low, high = t_interval(np.array([1.0, 2.0, 3.0]))  # mean 2, sd 1
    half = T_975_2DF / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    mean, low, high = t_interval(np.array([4.0]))
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)


def test_paired_table_pairs_by_seed_marks_intervals_with_zero_and_skips_missing_seeds():
    results = {
        "bs": {0: metrics(70.0, 60.0), 1: metrics(71.0, 60.0), 2: metrics(72.0, 60.0), 3: metrics(99.0, 99.0)},
        "ffn": {0: metrics(71.0, 61.0), 1: metrics(73.0, 61.1), 2: metrics(75.0, 60.9), 3: None},
    }
    lines = paired_table(results, "bs").splitlines()
    assert lines[0].startswith("| method - bs | paired seeds |") and len(lines) == 3  # header, rule, ffn
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:2] == ["ffn", "0,1,2"]  # seed 3 did not finish for ffn: it pairs nothing
    half_top1 = T_975_2DF / math.sqrt(3)  # differences 1, 2, 3
    assert cells[2] == f"+2.00 [{2 - half_top1:+.2f}, {2 + half_top1:+.2f}] ~"
    half_few = T_975_2DF * 0.1 / math.sqrt(3)  # differences 1.0, 1.1, 0.9
    assert cells[5] == f"+1.00 [{1 - half_few:+.2f}, {1 + half_few:+.2f}]"
    assert cells[3] == "+0.00 [+0.00, +0.00] ~"  # identical: no evidence of a difference


def test_the_baseline_row_is_taken_at_the_same_grid_point():
    assert baseline_row("ffn, data.imbalance=10", "bs") == "bs, data.imbalance=10"
    assert baseline_row("ffn", "bs") == "bs"


def test_optimism_is_the_best_test_epoch_and_the_last_one_against_the_validation_selected_read():
    # selected on validation: 71.0; the test curve peaks at 72.5 (epoch 2) and ends at 70.0
    assert optimism_figures(71.0, [60.0, 71.0, 72.5, 70.0]) == (71.0, 72.5, 1.5, 70.0, -1.0)
