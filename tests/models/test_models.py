"""Every registered model: shapes, feature/pooling consistency, gradients, memory format, size."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

from ltrepro.errors import LtreproError
from ltrepro.models import MODELS, Classifier, create_model

NUM_CLASSES = 10
CIFAR_NETS = {"resnet32", "resnet18_cifar", "resnet34_cifar"}
FEATURE_DIM = {"resnet32": 64, "resnet18_cifar": 512, "resnet34_cifar": 512, "resnet50": 2048, "resnext50_32x4d": 2048}

# (name, in_channels, side): every model on 3x32x32, and on 1-channel inputs (Fashion-MNIST is 1x28x28;
# the ImageNet nets only check their replaced stem, at 32x32).
CASES = [(name, 3, 32) for name in MODELS.names()] + [
    (name, 1, 28 if name in CIFAR_NETS else 32) for name in MODELS.names()
]
CASE_IDS = [f"{name}-{c}x{side}x{side}" for name, c, side in CASES]


@lru_cache(maxsize=None)
def built(name: str, in_channels: int) -> Classifier:
    """One model per (name, channels) for the whole module: building the big nets costs more than a step."""
    torch.manual_seed(0)
    return create_model(name, NUM_CLASSES, in_channels)


def batch(in_channels: int, side: int) -> torch.Tensor:
    return torch.randn(2, in_channels, side, side, generator=torch.Generator().manual_seed(1))


def test_every_expected_model_is_registered() -> None:
    assert set(MODELS.names()) >= set(FEATURE_DIM)


@pytest.mark.parametrize(("name", "in_channels", "side"), CASES, ids=CASE_IDS)
def test_shapes_and_pooling(name: str, in_channels: int, side: int) -> None:
    model = built(name, in_channels).eval()
    x = batch(in_channels, side)
    with torch.no_grad():
        fmap = model.feature_map(x)
        feats = model.features(x)
        logits = model(x)
    assert isinstance(model.head, nn.Linear)
    assert model.feature_dim == FEATURE_DIM[name]
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, model.feature_dim)
    assert feats.shape == (2, model.feature_dim)
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), feats)
    torch.testing.assert_close(model.head(feats), logits)


@pytest.mark.parametrize(("name", "in_channels", "side"), CASES, ids=CASE_IDS)
def test_backward_reaches_every_parameter(name: str, in_channels: int, side: int) -> None:
    model = built(name, in_channels).train()
    model.zero_grad(set_to_none=True)
    model(batch(in_channels, side)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", MODELS.names())
def test_channels_last_matches_contiguous(name: str) -> None:
    model = built(name, 3).eval()
    x = batch(3, 32)
    with torch.no_grad():
        expected = model(x)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_resnet32_size_matches_spec() -> None:
    """docs/methods/README.md#backbones: about 0.46 M parameters, 463,504 in the backbone + 650 in a 10-class head."""
    model = create_model("resnet32", 10, 3)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 0.46e6) <= 0.01 * 0.46e6
    assert sum(p.numel() for p in model.backbone.parameters()) == 463_504


def test_resnet32_option_a_shortcut_has_no_parameters() -> None:
    model = create_model("resnet32", 10, 3)
    assert not [n for n, _ in model.named_parameters() if "shortcut" in n]


def test_resnet34_cifar_size_matches_spec() -> None:
    """docs/methods/README.md#backbones: FSGL's CIFAR ResNet-34 backbone has 21,276,992 parameters."""
    model = built("resnet34_cifar", 3)
    assert sum(p.numel() for p in model.backbone.parameters()) == 21_276_992


@pytest.mark.parametrize(("name", "expected"), [("resnet50", 25_557_032), ("resnext50_32x4d", 25_028_904)])
def test_torchvision_nets_match_torchvision_sizes(name: str, expected: int) -> None:
    assert sum(p.numel() for p in create_model(name, 1000, 3).parameters()) == expected


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(LtreproError, match="resnet32"):
        create_model("resnet33", 10, 3)


@pytest.mark.parametrize(("name", "expected"), [("resnet18_cifar", 11_168_832), ("resnet34_cifar", 21_276_992)])
def test_bns_backbones_match_the_reference_sizes(name: str, expected: int) -> None:
    """BNS's CIFAR-10 ResNet-18 and CIFAR-100 ResNet-34 (docs/methods/README.md#backbones), 3-channel input, no head."""
    model = built(name, 3)
    assert sum(p.numel() for p in model.backbone.parameters()) == expected
    assert model.feature_dim == 512
