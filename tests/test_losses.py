"""Losses against hand-computed values on 3-class, 2-sample examples, plus schedule switches and errors.

lse(v) = log sum_j exp(v_j); a sample's CE is lse(v) - v_y. Every expected number below was worked
out from the formulas in the comments (6 significant digits suffice for the 1e-5 tolerance).
"""
from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from ltrepro.errors import LtreproError
from ltrepro.losses import LOSSES, PARAMETER_RULES, build_loss, loss_parameters
from ltrepro.losses import functional as LF

# Logits for the unconstrained losses (ce, focal, balanced_softmax, logit_adjusted).
LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
LABELS = torch.tensor([0, 2])
# Cosine logits for LDAM and KPS.
COSINE = torch.tensor([[0.2, 0.1, -0.1], [0.1, 0.2, 0.3]])


def close(value: torch.Tensor, expected: float) -> bool:
    return value.dtype == torch.float32 and value.shape == () and math.isclose(value.item(), expected, rel_tol=1e-5)


def test_ce_by_hand() -> None:
    # sample 1: lse(2, 1, 0) = log(e^2 + e + 1) = log(11.107338) = 2.407606; CE = 2.407606 - 2 = 0.407606
    # sample 2: lse(0, 0, 0) = log 3 = 1.098612; CE = 1.098612
    # mean = (0.407606 + 1.098612) / 2 = 0.753109
    assert close(build_loss("ce", [100, 10, 1])(LOGITS, LABELS), 0.753109)


def test_focal_by_hand() -> None:
    # gamma = 1: FL = (1 - p_y) * CE with p_y = exp(-CE)
    # sample 1: p = exp(-0.407606) = 0.665241; (1 - 0.665241) * 0.407606 = 0.136450
    # sample 2: p = 1/3; (2/3) * 1.098612 = 0.732408
    # mean = (0.136450 + 0.732408) / 2 = 0.434429
    assert close(build_loss("focal", [100, 10, 1])(LOGITS, LABELS), 0.434429)


# LDAM, counts [256, 16, 1]: n^(-1/4) = [1/4, 1/2, 1], so margins = 0.5 * [0.25, 0.5, 1] = [0.125, 0.25, 0.5].
# sample 1 (y=0): 30 * [0.2 - 0.125, 0.1, -0.1] = [2.25, 3, -3]; CE = lse - 2.25 = 1.138553
# sample 2 (y=2): 30 * [0.1, 0.2, 0.3 - 0.5] = [3, 6, -6];     CE = lse + 6    = 12.048593
LDAM_COUNTS = [256, 16, 1]
LDAM_PLAIN = (1.138553 + 12.048593) / 2  # 6.593573
# DRW, beta = 0.9999: w = (1 - beta) / (1 - beta^n)
#   n=256: 1e-4 / (1 - 0.974723) = 0.00395627; n=16: 1e-4 / (1 - 0.998401) = 0.0625469; n=1: 1
#   sum = 1.066503; normalised to sum 3: w = [0.0111287, 0.175940, 2.812931]
# weighted mean = (0.0111287 * 1.138553 + 2.812931 * 12.048593) / (0.0111287 + 2.812931) = 12.005600
LDAM_DRW = 12.005600


def test_ldam_margins_and_loss_by_hand() -> None:
    margins = LF.ldam_margins(LF.as_counts(LDAM_COUNTS), 0.5)
    assert torch.allclose(margins, torch.tensor([0.125, 0.25, 0.5], dtype=torch.float64))
    assert close(build_loss("ldam", LDAM_COUNTS)(COSINE, LABELS), LDAM_PLAIN)


def test_drw_weights_switch_at_drw_epoch() -> None:
    weights = LF.effective_number_weights(LF.as_counts(LDAM_COUNTS), 0.9999)
    assert torch.allclose(weights, torch.tensor([0.0111287, 0.175940, 2.812931], dtype=torch.float64), rtol=1e-5)
    beta_zero = LF.effective_number_weights(LF.as_counts(LDAM_COUNTS), 0.0)
    assert torch.allclose(beta_zero, torch.ones(3, dtype=torch.float64))
    loss = build_loss("ldam", LDAM_COUNTS, drw_epoch=160)
    assert close(loss(COSINE, LABELS), LDAM_PLAIN)  # before any set_epoch: epoch 0
    loss.set_epoch(159)
    assert close(loss(COSINE, LABELS), LDAM_PLAIN)
    loss.set_epoch(160)
    assert close(loss(COSINE, LABELS), LDAM_DRW)
    assert close(build_loss("ldam", LDAM_COUNTS, drw_epoch=0)(COSINE, LABELS), LDAM_DRW)


# KPS, counts [2500, 50, 1], max_m = 0.6:
#   sensitivity s_j = ln(50 n_j / 1) / ln 50 = ln(50^3, 50^2, 50) / ln 50 = [3, 2, 1]
#   mirror by frequency rank = [2, 1, 0]; margins = 0.6 * [s_2, s_1, s_0] / 3 = [0.2, 0.4, 0.6]
#   a = s * cos: sample 1 [0.6, 0.2, -0.1], target 0 -> 0.6 - 0.2 = 0.4: [0.4, 0.2, -0.1]
#                sample 2 [0.3, 0.4, 0.3],  target 2 -> 0.3 - 0.6 = -0.3: [0.3, 0.4, -0.3]
#   scale 15: [6, 3, -1.5] -> CE = lse - 6 = 0.0491141; [4.5, 6, -4.5] -> CE = lse + 4.5 = 10.701436
#   GA scales clamp(15 * s_mirror(c), 15, 50) = [15 * 1, 15 * 2, 15 * 3] = [15, 30, 45]
#   sample 2 at 45: [13.5, 18, -13.5] -> CE = lse + 13.5 = 31.511048
KPS_COUNTS = [2500, 50, 1]
KPS_PLAIN = (0.0491141 + 10.701436) / 2  # 5.375275
KPS_GA = (0.0491141 + 31.511048) / 2  # 15.780081


def test_kps_tables_and_loss_by_hand() -> None:
    counts = LF.as_counts(KPS_COUNTS)
    assert torch.allclose(LF.kps_sensitivity(counts), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(LF.kps_margins(counts, 0.6), torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64))
    assert torch.allclose(LF.kps_ga_scales(counts, 15.0, 50.0), torch.tensor([15.0, 30.0, 45.0], dtype=torch.float64))
    assert close(build_loss("kps", KPS_COUNTS, max_m=0.6)(COSINE, LABELS), KPS_PLAIN)


def test_kps_switches_to_per_sample_scale_at_ga_epoch() -> None:
    loss = build_loss("kps", KPS_COUNTS, max_m=0.6, ga_epoch=120)
    loss.set_epoch(119)
    assert close(loss(COSINE, LABELS), KPS_PLAIN)
    loss.set_epoch(120)
    assert close(loss(COSINE, LABELS), KPS_GA)
    never = build_loss("kps", KPS_COUNTS, max_m=0.6, ga_epoch=None)
    never.set_epoch(10_000)
    assert close(never(COSINE, LABELS), KPS_PLAIN)


def test_kps_ga_clamp_binds_for_large_imbalance() -> None:
    # counts [100000, 1]: s_head = ln(5e6) / ln 50 = 3.942960, so 15 * 3.942960 = 59.144 -> clamped to 50.
    # margins 0.5 * [s_1, s_0] / s_0 = [0.126808, 0.5]. Tail sample cos [0.1, 0.3], y = 1:
    # a = [0.1 * 3.942960, 0.3 - 0.5] = [0.394296, -0.2]; x 50 = [19.714798, -10] -> CE = lse + 10 = 29.714798
    # (unclamped, x 59.144 it would be 35.149274)
    counts = LF.as_counts([100000, 1])
    assert torch.allclose(LF.kps_ga_scales(counts, 15.0, 50.0), torch.tensor([15.0, 50.0], dtype=torch.float64))
    loss = build_loss("kps", [100000, 1], ga_epoch=0)
    assert close(loss(torch.tensor([[0.1, 0.3]]), torch.tensor([1])), 29.714798)


def test_kps_uses_frequency_ranks_not_class_index() -> None:
    sorted_counts = LF.as_counts([900, 400, 120, 30, 7, 2])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # class k of the shuffled problem is sorted class perm[k]
    shuffled = sorted_counts[perm]
    for table in (
        LF.kps_sensitivity,
        lambda c: LF.kps_margins(c, 0.5),
        lambda c: LF.kps_ga_scales(c, 15.0, 50.0),
    ):
        assert torch.allclose(table(shuffled), table(sorted_counts)[perm])
    # The same samples give the same loss with the classes relabelled, before and after GA.
    cosine = torch.tanh(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 5, 0])
    new_label = torch.argsort(perm)  # sorted class c is shuffled class new_label[c]
    for epoch in (0, 120):
        plain, relabelled = build_loss("kps", sorted_counts.tolist()), build_loss("kps", shuffled.tolist())
        plain.set_epoch(epoch)
        relabelled.set_epoch(epoch)
        assert torch.allclose(plain(cosine, labels), relabelled(cosine[:, perm], new_label[labels]))


def test_kps_mirror_index_reproduces_the_released_pairing() -> None:
    # counts [1, 50, 2500] (the sorted problem reversed): s = [1, 2, 3]. By rank the mirror is [2, 1, 0]
    # as well, so margins 0.6 * s[[2, 1, 0]] / 3 = [0.6, 0.4, 0.2] both ways; on [50, 1, 2500] (s = [2, 1, 3])
    # rank pairs 0 <-> 0 (middle), 1 <-> 2, so margins 0.6 * [2, 3, 1] / 3 = [0.4, 0.6, 0.2]; index pairs 0 <-> 2:
    # 0.6 * s[[2, 1, 0]] / 3 = 0.6 * [3, 1, 2] / 3 = [0.6, 0.2, 0.4], and GA scales 15 * [3, 1, 2] = [45, 15, 30].
    counts = LF.as_counts([50, 1, 2500])
    index = LF.index_mirror(3)
    assert index.tolist() == [2, 1, 0] and LF.frequency_mirror(counts).tolist() == [0, 2, 1]
    assert torch.allclose(LF.kps_margins(counts, 0.6), torch.tensor([0.4, 0.6, 0.2], dtype=torch.float64))
    assert torch.allclose(LF.kps_margins(counts, 0.6, index), torch.tensor([0.6, 0.2, 0.4], dtype=torch.float64))
    assert torch.allclose(LF.kps_ga_scales(counts, 15.0, 50.0, index), torch.tensor([45.0, 15.0, 30.0], dtype=torch.float64))
    for sorted_counts in (KPS_COUNTS, KPS_COUNTS[::-1]):  # on a sorted profile index and rank agree
        assert close(build_loss("kps", sorted_counts, mirror="index")(COSINE, LABELS), build_loss("kps", sorted_counts)(COSINE, LABELS))
    shuffled = [50, 1, 2500]
    assert not close(build_loss("kps", shuffled, mirror="index")(COSINE, LABELS), build_loss("kps", shuffled)(COSINE, LABELS))
    with pytest.raises(LtreproError, match="parameter 'mirror'; allowed: 'rank'"):
        build_loss("kps", shuffled, mirror="count")


def test_frequency_mirror_breaks_ties_by_class_index() -> None:
    assert LF.frequency_mirror(LF.as_counts([10, 10, 1])).tolist() == [2, 1, 0]
    assert LF.frequency_mirror(LF.as_counts([1, 10, 10])).tolist() == [1, 0, 2]


def test_las_by_hand() -> None:
    # counts [7, 4, 1], eps_1 = 0.4, eps_K = 0.1 (defaults): middle class sin(pi * 3 / 12) = 0.707107,
    # eps = [0.4, 0.1 + 0.3 * 0.707107, 0.1] = [0.4, 0.312132, 0.1]
    # sample 1 logits [3, 1, 0], y = 1: lse = log(23.803820) = 3.169846, -log p = [0.169846, 2.169846, 3.169846]
    #   (1 - 0.312132) * 2.169846 + 0.312132 * mean(-log p) 1.836513 = 2.065802
    # sample 2 logits [1, 0, 0], y = 2: lse = log(e + 2) = 1.551445, -log p = [0.551445, 1.551445, 1.551445]
    #   0.9 * 1.551445 + 0.1 * 1.218111 = 1.518111
    # mean = (2.065802 + 1.518111) / 2 = 1.791957
    counts = LF.as_counts([7, 4, 1])
    assert torch.allclose(LF.las_smoothing(counts, 0.4, 0.1), torch.tensor([0.4, 0.312132, 0.1], dtype=torch.float64))
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(build_loss("las", [7, 4, 1])(logits, torch.tensor([1, 2])), 1.791957)


def test_las_with_equal_counts_smooths_every_class_by_head() -> None:
    # eps = 0.4 for all; logits [3, 1, 0], y = 0: 0.6 * 0.169846 + 0.4 * 1.836513 = 0.836513
    assert LF.las_smoothing(LF.as_counts([5, 5, 5]), 0.4, 0.1).tolist() == [0.4, 0.4, 0.4]
    loss = build_loss("las", [5, 5, 5])
    assert close(loss(torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0])), 0.836513)


def test_balanced_softmax_by_hand() -> None:
    # counts [100, 10, 1]: log n = [ln 100, ln 10, 0]
    # sample 1: [2 + ln 100, 1 + ln 10, 0], y = 0: CE = log(1 + e^-1 / 10 + e^-2 / 100) = 0.0374319
    # sample 2: [ln 100, ln 10, 0], y = 2: CE = log(100 + 10 + 1) = 4.709530
    # mean = 2.373481
    assert close(build_loss("balanced_softmax", [100, 10, 1])(LOGITS, LABELS), 2.373481)


def test_logit_adjusted_by_hand() -> None:
    # tau = 0.5, pi = n / 111: the constant -0.5 ln 111 cancels in the softmax, leaving offsets 0.5 ln n
    # sample 1: CE = log(1 + e^-1 * 10^-0.5 + e^-2 * 100^-0.5) = log(1.129868) = 0.122100
    # sample 2: CE = log(sqrt 100 + sqrt 10 + sqrt 1) = log(14.162278) = 2.650582
    # mean = 1.386341; tau = 1 is balanced softmax exactly (2.373481)
    assert close(build_loss("logit_adjusted", [100, 10, 1], tau=0.5)(LOGITS, LABELS), 1.386341)
    assert close(build_loss("logit_adjusted", [100, 10, 1])(LOGITS, LABELS), 2.373481)


COUNTS_5 = [50, 20, 10, 5, 1]


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_a_differentiable_nonnegative_scalar(name: str) -> None:
    loss = build_loss(name, COUNTS_5)
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (8,), generator=generator)
    for epoch in (0, 10_000):  # before and after any DRW / GA switch
        loss.set_epoch(epoch)
        cosine = torch.tanh(torch.randn(8, 5, generator=generator)).requires_grad_()
        value = loss(cosine, labels)
        assert value.shape == () and value.dtype == torch.float32
        assert torch.isfinite(value) and value.item() >= 0
        value.backward()
        assert torch.isfinite(cosine.grad).all() and cosine.grad.abs().sum() > 0
        low_precision = loss(cosine.detach().bfloat16(), labels)
        assert low_precision.dtype == torch.float32 and torch.isfinite(low_precision)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_parameter_has_a_rule_that_accepts_its_default(name: str) -> None:
    defaults = {p: inspect.signature(LOSSES.get(name)).parameters[p].default for p in loss_parameters(name)}
    assert all(key in PARAMETER_RULES for key in defaults)
    build_loss(name, COUNTS_5, **defaults)


def test_gradient_flows_to_the_target_logit() -> None:
    cosine = COSINE.clone().requires_grad_()
    build_loss("ldam", LDAM_COUNTS)(cosine, LABELS).backward()
    # d CE / d z_y = s * (p_y - 1) / N < 0: raising the target logit lowers the loss.
    assert cosine.grad[0, 0] < 0 and cosine.grad[1, 2] < 0


def test_unknown_loss_raises() -> None:
    with pytest.raises(LtreproError, match="unknown loss 'hinge'; registered: balanced_softmax, ce"):
        build_loss("hinge", [10, 1])


def test_unknown_parameter_names_the_allowed_ones() -> None:
    with pytest.raises(LtreproError) as error:
        build_loss("ldam", [10, 1], scale=30)
    assert str(error.value) == "loss 'ldam': unknown parameter 'scale'; allowed: s, max_m, drw_epoch, beta"
    with pytest.raises(LtreproError, match="loss 'ce': unknown parameter 'gamma'; allowed: none"):
        build_loss("ce", [10, 1], gamma=2)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("ldam", {"beta": 1.0}, "loss 'ldam': bad value 1.0 for parameter 'beta'; allowed: a number in [0, 1)"),
        ("ldam", {"drw_epoch": 1.5}, "parameter 'drw_epoch'; allowed: null (off) or an epoch >= 0"),
        ("focal", {"gamma": True}, "parameter 'gamma'; allowed: a number >= 0"),
        ("las", {"smooth_head": 1.2}, "parameter 'smooth_head'; allowed: a number in [0, 1]"),
        ("kps", {"ga_max": 10.0}, "loss 'kps': bad value 10.0 for parameter 'ga_max'; allowed: a number >= s (15.0)"),
    ],
)
def test_bad_parameter_value_raises(name: str, params: dict, message: str) -> None:
    with pytest.raises(LtreproError, match=re.escape(message)):
        build_loss(name, [10, 1], **params)


@pytest.mark.parametrize("counts", [[10, 0, 1], [10, 2.5], []])
def test_bad_class_counts_raise(counts: list) -> None:
    with pytest.raises(LtreproError, match="class_counts must be integers >= 1"):
        build_loss("ce", counts)
