"""ltrepro.report: paired differences against a baseline with t intervals, the test-selection
optimism and the spread across a grid key against the spread across seeds (hand values)."""
import math

import numpy as np
import pytest

from ltrepro.cli import main
from ltrepro.errors import LtreproError
from ltrepro.methods import ReferenceBehaviour
from ltrepro.report import (
    COLUMNS, baseline_row, behaviours_table, optimism_figures, paired_table, spread_groups, spread_table, t_interval,
)  # fmt: skip
from ltrepro.runner import train

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


def test_spread_across_split_seeds_against_spread_across_init_seeds():
    # top-1 of split seed p (rows) and init seed s (columns): 70 + 2p + s, seed 2 missing at p = 1
    grid = {"data.split_seed": ["0", "1", "2"], "data.imbalance": ["100"]}
    results = {
        f"ce, data.split_seed={p}, data.imbalance=100": {s: metrics(70.0 + 2 * p + s, 50.0) for s in range(3)}
        for p in range(3)
    }
    results["ce, data.split_seed=1, data.imbalance=100"][2] = None
    groups = spread_groups(results, ["ce"], grid, "data.split_seed")
    assert list(groups) == ["ce, data.imbalance=100"] and list(groups["ce, data.imbalance=100"]) == ["0", "1", "2"]
    cells = [cell.strip() for cell in spread_table(groups, "data.split_seed").splitlines()[2].strip("|").split("|")]
    # seeds 0, 1 finished at every split seed: rows (70, 71), (72, 73), (74, 75)
    # across split seeds, seed fixed: var of (70, 72, 74) = 4 at each seed -> 2.00
    # across seeds, split fixed: var of (70, 71) = 0.5 at each split -> sqrt(0.5) = 0.71
    assert cells == ["ce, data.imbalance=100", "0, 1, 2", "0,1", "70.50 / 72.50 / 74.50", "2.00", "0.71", "5.00"]
    with pytest.raises(LtreproError, match=r"--spread data.split: not a --grid key \(the grid has data.split_seed, data.imbalance\)"):
        spread_groups(results, ["ce"], grid, "data.split")


def test_behaviours_table_is_the_released_codes_behaviour_minus_the_default():
    flag = ReferenceBehaviour("FC2", "FCC factors by class index", ("stage1.fcc_by_index=true",), ("data.class_order_seed=1",))
    audit = ReferenceBehaviour("FC1", "best test epoch kept", ("audit.test_every_epoch=true",), optimism=True)
    default = {0: metrics(70.0, 60.0), 1: metrics(71.0, 60.0)}
    flagged = {0: metrics(69.0, 55.0), 1: metrics(69.0, 56.0)}
    lines = behaviours_table([("ce_fcc", flag, default, flagged), ("ce_fcc", audit, {0: {"test_top1": 70.0}}, {0: {"test_top1": 70.5}})]).splitlines()
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    half = 12.706204736174707 * 0.5  # Student t 97.5 %, 1 degree of freedom, times the se of two differences (sd 0.71)
    assert cells[:6] == ["ce_fcc", "FC2", "FCC factors by class index", "stage1.fcc_by_index=true", "data.class_order_seed=1", "0,1"]
    assert cells[6] == f"-1.50 [{-1.5 - half:+.2f}, {-1.5 + half:+.2f}] ~"  # top-1: -1, -2
    assert cells[9] == f"-4.50 [{-4.5 - half:+.2f}, {-4.5 + half:+.2f}] ~"  # few: -5, -4
    audited = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert audited[3:] == ["selection on the test set", "-", "0", "+0.50 (one seed)", "-", "-", "-", "-"]  # the audit logs top-1 alone


FAST = ["stage1.epochs=2", "stage1.batch_size=16", "stage1.fcc=0.5", "stage1.lr=0.01"]


def test_report_defects_pairs_each_flag_with_the_default_run_on_its_setting(project, capsys):
    default = train(project / "params.yaml", ["method=ce_fcc", *FAST, "data.class_order_seed=1"])[-1].metrics
    by_index = train(project / "params.yaml", ["method=ce_fcc", *FAST, "data.class_order_seed=1", "stage1.fcc_by_index=true"])[-1].metrics
    assert by_index["test_ece"] != default["test_ece"]  # on a shuffled class order the flag changes the run
    capsys.readouterr()
    assert main(["report", "--config", str(project / "params.yaml"), *FAST, "--methods", "ce_fcc", "--seeds", "0", "--defects"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "| FC2 |" in line)
    # --missing: the cells without a run (the methods table's ce_fcc on sorted classes, FC1's audited
    # run) as the train commands that fill them
    assert main(["report", "--config", str(project / "params.yaml"), *FAST, "--methods", "ce_fcc", "--seeds", "0", "--defects", "--missing"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"ltrepro train {' '.join(FAST)} method=ce_fcc seed=0", f"ltrepro train {' '.join(FAST)} audit.test_every_epoch=true method=ce_fcc seed=0"
    ]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[5:7] == ["0", f"{by_index['test_top1'] - default['test_top1']:+.2f} (one seed)"]
    assert cells[10] == f"{by_index['test_ece'] - default['test_ece']:+.2f} (one seed)"
