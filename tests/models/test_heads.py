"""ltrepro.models.heads: cosine classifier (NormedLinear), LWS, make_head and the post-hoc corrections."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltrepro.errors import LtreproError
from ltrepro.features import cosine_logits
from ltrepro.models import create_model
from ltrepro.models.heads import CosineClassifier, LearnableWeightScaling, LogitAdjustedHead, TauNormalisedHead, make_head


def test_cosine_classifier_init_has_unit_rows_and_no_bias() -> None:
    torch.manual_seed(0)
    head = CosineClassifier(64, 10)
    assert head.weight.shape == (10, 64)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(10))
    assert [name for name, _ in head.named_parameters()] == ["weight"]


def test_cosine_classifier_output_is_cosine_logits() -> None:
    torch.manual_seed(0)
    head = CosineClassifier(32, 7)
    features = torch.randn(12, 32)
    logits = head(features)
    assert logits.shape == (12, 7)
    assert logits.abs().max().item() <= 1.0 + 1e-6
    torch.testing.assert_close(logits, cosine_logits(features, head.weight))


def test_cosine_classifier_hand_computed() -> None:
    head = CosineClassifier(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    logits = head(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(logits, torch.tensor([[0.6, 1.4 / 2**0.5]]))


def test_from_reference_weight_transposes_the_d_by_c_layout() -> None:
    reference = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    head = CosineClassifier.from_reference_weight(reference)
    assert (head.in_features, head.num_classes) == (16, 5)
    assert torch.equal(head.weight, reference.t())
    features = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    # The reference forward: F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0)).
    torch.testing.assert_close(head(features), F.normalize(features, dim=1).mm(F.normalize(reference, dim=0)))


def test_lws_with_unit_scales_equals_the_head() -> None:
    torch.manual_seed(0)
    head = nn.Linear(8, 4)
    lws = LearnableWeightScaling(head, 4)
    assert torch.equal(lws.scales.detach(), torch.ones(4))
    features = torch.randn(6, 8)
    assert torch.equal(lws(features), head(features))


def test_lws_scales_logits_per_class() -> None:
    head = CosineClassifier(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    lws = LearnableWeightScaling(head, 2)
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(lws(torch.tensor([[3.0, 4.0]])), torch.tensor([[1.2, 0.4]]))


def test_lws_exposes_separate_groups_and_gradient_reaches_scales() -> None:
    torch.manual_seed(0)
    lws = LearnableWeightScaling(CosineClassifier(8, 3), 3)
    assert [name for name, _ in lws.named_parameters()] == ["scales", "head.weight"]
    optimizer = torch.optim.SGD([{"params": lws.head.parameters()}, {"params": [lws.scales], "lr": 0.5}], lr=0.1)
    F.cross_entropy(lws(torch.randn(5, 8)), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert lws.scales.grad is not None and lws.scales.grad.abs().sum().item() > 0
    optimizer.step()
    assert not torch.equal(lws.scales.detach(), torch.ones(3))


def test_make_head_linear_uses_kaiming_normal() -> None:
    torch.manual_seed(0)
    head = make_head("linear", 64, 1000)
    assert isinstance(head, nn.Linear) and head.weight.shape == (1000, 64) and head.bias is not None
    # kaiming_normal_ (fan_in 64): std sqrt(2/64) = 0.177; nn.Linear's default uniform would give 0.072.
    assert head.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.03)


def test_make_head_cosine_and_unknown_kind() -> None:
    head = make_head("cosine", 64, 10)
    assert isinstance(head, CosineClassifier) and head.weight.shape == (10, 64)
    with pytest.raises(LtreproError, match="unknown head kind 'arc'"):
        make_head("arc", 64, 10)  # type: ignore[arg-type]


def test_heads_replace_the_classifier_head() -> None:
    torch.manual_seed(0)
    model = create_model("resnet32", 10, 3)
    model.head = LearnableWeightScaling(make_head("cosine", model.feature_dim, 10), 10)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, cosine_logits(model.features(images), model.head.head.weight))


def test_posthoc_heads_freeze_the_head_keep_tau_in_the_state_and_are_the_head_at_tau_0() -> None:
    torch.manual_seed(0)
    linear, features = nn.Linear(4, 3), torch.randn(5, 4)
    counts = torch.tensor([8.0, 4.0, 1.0])
    for correct in (lambda head: LogitAdjustedHead(head, counts, 0.0), lambda head: TauNormalisedHead(head, 0.0)):
        head = correct(linear)
        torch.testing.assert_close(head(features), linear(features))
        assert not any(p.requires_grad for p in head.parameters())
        head.tau.fill_(0.7)
        restored = correct(nn.Linear(4, 3))
        restored.load_state_dict(head.state_dict())
        assert restored.tau.item() == pytest.approx(0.7)
        torch.testing.assert_close(restored(features), head(features))
    adjusted = LogitAdjustedHead(linear, counts, 1.0)(features)
    torch.testing.assert_close(adjusted - linear(features), -torch.log(counts / 13).expand(5, 3))
    normalised = TauNormalisedHead(linear, 1.0)(features)
    torch.testing.assert_close(normalised, features @ F.normalize(linear.weight, dim=1).t() + linear.bias)


def test_tau_normalisation_refuses_a_cosine_head() -> None:
    with pytest.raises(LtreproError, match="needs a linear head"):
        TauNormalisedHead(CosineClassifier(4, 3), 1.0)
