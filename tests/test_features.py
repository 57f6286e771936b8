"""ltrepro.features: FCC factors and scaling, H2T grafting, cosine and FFN fused logits, post-hoc
corrections (hand values)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltrepro.errors import LtreproError
from ltrepro.features import (
    class_ranks,
    cosine_logits,
    fcc_factors,
    fcc_scale,
    ffn_fused_logits,
    graft_channels,
    posthoc_adjusted_logits,
    tau_normalised_weight,
)

# ------------------------------------------------------------------------------------------ FCC factors


def test_fcc_factors_c10_gamma1_are_exact() -> None:
    tau = fcc_factors(10, 1.0)
    assert tau.dtype == torch.float32
    # Unrounded, k=7 is 1.2999999999999998; round(., 2) makes it 1.3.
    assert torch.equal(tau, torch.tensor([2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1]))


def test_fcc_factors_spec_fact_1_c10_gamma_half() -> None:
    expected = torch.tensor([1.50, 1.45, 1.40, 1.35, 1.30, 1.25, 1.20, 1.15, 1.10, 1.05])
    assert torch.equal(fcc_factors(10, 0.5), expected)


def test_fcc_factors_spec_fact_2_c100_gamma1() -> None:
    tau = fcc_factors(100, 1.0)
    assert (tau[0].item(), tau[50].item(), tau[99].item()) == (2.0, 1.5, pytest.approx(1.01))
    assert torch.equal(tau, torch.tensor([round(2.0 - 0.01 * k, 2) for k in range(100)]))


def test_fcc_factors_spec_fact_3_half_even_on_float64() -> None:
    tau = fcc_factors(100, 0.5)
    # 1 + 0.5 - 0.005 is 1.49500000000000010658... in float64, so round(., 2) = 1.5.
    assert torch.equal(tau[[0, 1, 2, 99]], torch.tensor([1.50, 1.50, 1.49, 1.0]))
    exact = fcc_factors(100, 0.5, decimals=None)
    assert exact[1].item() == pytest.approx(1.495)
    assert exact[99].item() == pytest.approx(1.005)


def test_fcc_factors_spec_fact_4_c1000_has_11_levels() -> None:
    tau = fcc_factors(1000, 0.1)
    assert torch.equal(tau[[0, 999]], torch.tensor([1.10, 1.00]))
    assert len(torch.unique(tau)) == 11
    assert len(torch.unique(fcc_factors(1000, 0.1, decimals=None))) == 1000


def test_fcc_factors_follow_class_rank() -> None:
    ranks = class_ranks([100, 500, 300])
    assert ranks.tolist() == [2, 0, 1]
    # C=3, gamma=1: by rank 2.0, round(1.6667, 2) = 1.67, round(1.3333, 2) = 1.33.
    assert torch.equal(fcc_factors(3, 1.0), torch.tensor([2.0, 1.67, 1.33]))
    assert torch.equal(fcc_factors(3, 1.0, class_rank=ranks), torch.tensor([1.33, 2.0, 1.67]))


def test_fcc_factors_permuted_by_rank_equal_indexed_table() -> None:
    rank = torch.tensor([3, 0, 9, 1, 8, 2, 7, 4, 6, 5])
    assert torch.equal(fcc_factors(10, 0.5, class_rank=rank), fcc_factors(10, 0.5)[rank])


def test_fcc_factors_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="permutation"):
        fcc_factors(3, 1.0, class_rank=[0, 0, 1])
    with pytest.raises(LtreproError, match="gamma"):
        fcc_factors(3, -0.5)


def test_class_ranks_break_ties_by_class_index() -> None:
    assert class_ranks(torch.tensor([5, 9, 9, 1])).tolist() == [2, 0, 1, 3]
    cifar10_if100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert class_ranks(cifar10_if100).tolist() == list(range(10))


# ------------------------------------------------------------------------------------------ FCC scaling


def test_fcc_scale_hard_labels_on_pooled_features() -> None:
    features = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    scaled = fcc_scale(features, torch.tensor([0, 9]), fcc_factors(10, 0.5))
    torch.testing.assert_close(scaled, torch.tensor([[1.5, -3.0], [4.2, 0.525]]))
    assert torch.equal(features, torch.tensor([[1.0, -2.0], [4.0, 0.5]]))


def test_fcc_scale_spec_fact_5_on_a_map() -> None:
    scaled = fcc_scale(torch.ones(2, 64, 8, 8), torch.tensor([0, 9]), fcc_factors(10, 0.5))
    assert scaled.shape == (2, 64, 8, 8)
    pooled = scaled.mean(dim=(2, 3))
    torch.testing.assert_close(pooled, torch.tensor([[1.5] * 64, [1.05] * 64]))


def test_fcc_scale_spec_fact_6_before_or_after_pooling() -> None:
    maps = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 0, 7, 3])
    factors = fcc_factors(10, 1.0)
    torch.testing.assert_close(
        fcc_scale(maps, labels, factors).mean(dim=(2, 3)), fcc_scale(maps.mean(dim=(2, 3)), labels, factors)
    )


def test_fcc_scale_spec_fact_7_soft_labels() -> None:
    soft = torch.zeros(1, 10)
    soft[0, 0], soft[0, 9] = 0.3, 0.7
    torch.testing.assert_close(fcc_scale(torch.ones(1, 4), soft, fcc_factors(10, 0.5)), torch.full((1, 4), 1.185))
    half = torch.zeros(1, 100)
    half[0, 0], half[0, 99] = 0.5, 0.5
    scaled = fcc_scale(torch.ones(1, 2, 3, 3), half, fcc_factors(100, 1.0))
    torch.testing.assert_close(scaled, torch.full((1, 2, 3, 3), 1.505))


def test_fcc_scale_one_hot_soft_labels_equal_hard_labels() -> None:
    features = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 9, 4, 2])
    factors = fcc_factors(10, 0.5)
    torch.testing.assert_close(
        fcc_scale(features, F.one_hot(labels, 10).float(), factors), fcc_scale(features, labels, factors)
    )


def test_fcc_scale_rejects_float_hard_labels() -> None:
    with pytest.raises(ValueError, match="integer"):
        fcc_scale(torch.ones(2, 3), torch.tensor([0.0, 1.0]), fcc_factors(10, 0.5))


# ------------------------------------------------------------------------------------------ H2T grafting


def test_graft_replaces_floor_rho_k_channels_shared_by_the_batch() -> None:
    fused, fusing = torch.zeros(3, 8, 4, 4), torch.ones(3, 8, 4, 4)
    grafted, mask = graft_channels(fused, fusing, 0.25, torch.Generator().manual_seed(0))
    assert mask.shape == (8,) and mask.dtype == torch.bool
    assert mask.sum().item() == 2
    assert torch.equal(grafted[:, mask], torch.ones(3, 2, 4, 4))
    assert torch.equal(grafted[:, ~mask], torch.zeros(3, 6, 4, 4))


def test_graft_channel_count_for_the_h2t_settings() -> None:
    features = torch.zeros(2, 64)
    for rho, count in ((0.25, 16), (0.3, 19)):
        _, mask = graft_channels(features, features, rho, torch.Generator().manual_seed(0))
        assert mask.sum().item() == count


def test_graft_equals_masked_sum() -> None:
    generator = torch.Generator().manual_seed(2)
    fused, fusing = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    grafted, mask = graft_channels(fused, fusing, 0.5, generator)
    m = mask.float()
    torch.testing.assert_close(grafted, fused * (1 - m) + fusing * m)


def test_graft_rho_0_is_identity_and_rho_1_is_fusing() -> None:
    generator = torch.Generator().manual_seed(3)
    fused, fusing = torch.randn(2, 8, 3, 3, generator=generator), torch.randn(2, 8, 3, 3, generator=generator)
    same, none = graft_channels(fused, fusing, 0.0, generator)
    assert torch.equal(same, fused) and not none.any()
    replaced, every = graft_channels(fused, fusing, 1.0, generator)
    assert torch.equal(replaced, fusing) and every.all()


def test_graft_on_pooled_features_equals_pooling_grafted_maps() -> None:
    generator = torch.Generator().manual_seed(4)
    fused, fusing = torch.randn(5, 16, 8, 8, generator=generator), torch.randn(5, 16, 8, 8, generator=generator)
    grafted_maps, map_mask = graft_channels(fused, fusing, 0.25, torch.Generator().manual_seed(7))
    grafted_pooled, pooled_mask = graft_channels(
        fused.mean(dim=(2, 3)), fusing.mean(dim=(2, 3)), 0.25, torch.Generator().manual_seed(7)
    )
    assert torch.equal(map_mask, pooled_mask)
    torch.testing.assert_close(grafted_maps.mean(dim=(2, 3)), grafted_pooled)


def test_graft_is_deterministic_per_seed_and_leaves_inputs_unchanged() -> None:
    generator = torch.Generator().manual_seed(5)
    fused, fusing = torch.randn(2, 32, generator=generator), torch.randn(2, 32, generator=generator)
    fused_before, fusing_before = fused.clone(), fusing.clone()
    first, first_mask = graft_channels(fused, fusing, 0.25, torch.Generator().manual_seed(11))
    second, second_mask = graft_channels(fused, fusing, 0.25, torch.Generator().manual_seed(11))
    assert torch.equal(first, second) and torch.equal(first_mask, second_mask)
    assert torch.equal(fused, fused_before) and torch.equal(fusing, fusing_before)
    assert first.data_ptr() not in (fused.data_ptr(), fusing.data_ptr())


def test_graft_draws_a_new_subset_per_call() -> None:
    generator = torch.Generator().manual_seed(6)
    features = torch.zeros(1, 64)
    masks = [graft_channels(features, features, 0.25, generator)[1] for _ in range(2)]
    assert not torch.equal(masks[0], masks[1])


def test_graft_rejects_bad_arguments() -> None:
    with pytest.raises(LtreproError, match="rho"):
        graft_channels(torch.zeros(1, 4), torch.zeros(1, 4), 1.5, torch.Generator())
    with pytest.raises(ValueError, match="shape"):
        graft_channels(torch.zeros(1, 4), torch.zeros(1, 5), 0.5, torch.Generator())


# ------------------------------------------------------------------------------------------ cosine logits


def test_cosine_logits_hand_computed() -> None:
    features = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Rows 0.6,0.8 and 0,-1 against unit classes (1,0), (0,1), (1,1)/sqrt(2).
    expected = torch.tensor([[0.6, 0.8, 1.4 / math.sqrt(2)], [0.0, -1.0, -1.0 / math.sqrt(2)]])
    torch.testing.assert_close(cosine_logits(features, weight), expected)


def test_cosine_logits_bounded_and_scale_invariant() -> None:
    generator = torch.Generator().manual_seed(8)
    features, weight = torch.randn(16, 32, generator=generator), torch.randn(10, 32, generator=generator)
    logits = cosine_logits(features, weight)
    assert logits.shape == (16, 10)
    assert logits.abs().max().item() <= 1.0 + 1e-6
    torch.testing.assert_close(cosine_logits(7.5 * features, weight), logits)
    torch.testing.assert_close(cosine_logits(features, 0.1 * weight), logits)


# ------------------------------------------------------------------------------------------ FFN fusion


def ffn_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f_kps (6, 16), f_ce (6, 16) and a shared classifier weight (5, 16)."""
    generator = torch.Generator().manual_seed(9)
    f_kps, f_ce = torch.randn(6, 16, generator=generator), torch.randn(6, 16, generator=generator)
    return f_kps, f_ce, torch.randn(5, 16, generator=generator)


def test_ffn_lam_endpoints_are_the_single_branches() -> None:
    f_kps, f_ce, weight = ffn_inputs()
    assert torch.equal(ffn_fused_logits(f_kps, f_ce, weight, 1.0), cosine_logits(f_kps, weight))
    assert torch.equal(ffn_fused_logits(f_kps, f_ce, weight, 0.0), cosine_logits(f_ce, weight))
    mean = (cosine_logits(f_kps, weight) + cosine_logits(f_ce, weight)) / 2
    torch.testing.assert_close(ffn_fused_logits(f_kps, f_ce, weight, 0.5), mean)


def test_ffn_hand_computed() -> None:
    # f^_kps = (0.6, 0.8), f^_ce = (0, -1); classes (1, 0) and (0, 1); lam 0.9.
    logits = ffn_fused_logits(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, -2.0]]), torch.eye(2), 0.9)
    torch.testing.assert_close(logits, torch.tensor([[0.54, 0.62]]))


def test_ffn_equals_dot_product_of_weighted_normalised_features() -> None:
    f_kps, f_ce, weight = ffn_inputs()
    fused = 0.9 * F.normalize(f_kps, dim=1) + 0.1 * F.normalize(f_ce, dim=1)
    torch.testing.assert_close(ffn_fused_logits(f_kps, f_ce, weight, 0.9), fused @ F.normalize(weight, dim=1).t())


def test_ffn_rejects_lam_outside_unit_interval() -> None:
    with pytest.raises(LtreproError, match="lam"):
        ffn_fused_logits(torch.ones(1, 2), torch.ones(1, 2), torch.eye(2), -0.1)


# ------------------------------------------------------------------------------------------ post-hoc


def test_posthoc_logit_adjustment_subtracts_tau_log_prior():
    counts = torch.tensor([3.0, 1.0])  # pi = (0.75, 0.25)
    logits = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    adjusted = posthoc_adjusted_logits(logits, counts, 1.0)
    expected = torch.tensor([[1 - math.log(0.75), 1 - math.log(0.25)], [2 - math.log(0.75), -math.log(0.25)]])
    torch.testing.assert_close(adjusted, expected)
    assert adjusted[0].argmax() == 1  # a tie goes to the rarer class
    torch.testing.assert_close(posthoc_adjusted_logits(logits, counts, 0.0), logits)
    torch.testing.assert_close(posthoc_adjusted_logits(logits, counts, 0.5)[0, 1], torch.tensor(1 - 0.5 * math.log(0.25)))


def test_tau_normalised_weight_divides_rows_by_norm_to_the_tau():
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # row norms 5 and 2
    torch.testing.assert_close(tau_normalised_weight(weight, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    root5, root2 = math.sqrt(5), math.sqrt(2)
    torch.testing.assert_close(tau_normalised_weight(weight, 0.5), torch.tensor([[3 / root5, 4 / root5], [0.0, 2 / root2]]))
    torch.testing.assert_close(tau_normalised_weight(weight, 0.0), weight)
