"""ImageNet-scale backbones from torchvision, built from scratch (``weights=None``).

torchvision's own init is the one the reference codes use: conv kaiming_normal (fan_out, relu), BN 1/0,
no zero-init of the last residual BN (FFN/H2T/MiSLAS for ResNet-50, FSGL for ResNeXt-50;
docs/methods/README.md#backbones).

torchvision is imported when one of these is built: its import pulls in torch._dynamo (about 4 s
on 2 cores), a cost every CLI process would otherwise pay for the CIFAR-sized default.
"""
from __future__ import annotations

from collections import OrderedDict

from typing import TYPE_CHECKING

from torch import nn

from ltrepro.models import MODELS
from ltrepro.models.network import Classifier

if TYPE_CHECKING:
    from torchvision.models import ResNet

TRUNK_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def torchvision_classifier(net: "ResNet", num_classes: int, in_channels: int) -> Classifier:
    """Wrap a torchvision ResNet up to layer4 (the map H2T grafts on) with a fresh linear head.

    A non-RGB input gets a new stem conv of the same geometry, initialised as torchvision would.
    The trunk keeps torchvision's module names, so ``backbone.layer1.0.conv1.weight`` etc. match.
    """
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    trunk = nn.Sequential(OrderedDict((part, getattr(net, part)) for part in TRUNK_PARTS))
    return Classifier(trunk, net.fc.in_features, num_classes)


@MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int) -> Classifier:
    """ResNet-50, 2048-d feature (ImageNet-LT in FFN/H2T)."""
    from torchvision.models import resnet50 as tv_resnet50

    return torchvision_classifier(tv_resnet50(weights=None), num_classes, in_channels)


@MODELS.register("resnext50_32x4d")
def resnext50_32x4d(num_classes: int, in_channels: int) -> Classifier:
    """ResNeXt-50 32x4d, 2048-d feature (ImageNet-LT in FSGL)."""
    from torchvision.models import resnext50_32x4d as tv_resnext50_32x4d

    return torchvision_classifier(tv_resnext50_32x4d(weights=None), num_classes, in_channels)
