"""CIFAR-size ResNets: 3x3 stride-1 stem, no max-pool, so a 32x32 input keeps its resolution in stage 1.

Module names (conv1, bn1, layer1.0.conv1, ..., shortcut) follow the reference repos (LDAM-DRW
``resnet_cifar.py`` used by FFN/H2T/MiSLAS, and FSGL ``model/ResNet_cifar.py``) under ``backbone.``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltrepro.models import MODELS
from ltrepro.models.network import Classifier

Shortcut = Literal["A", "B"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut (He et al., CVPR'16, Sec. 3.3): subsample spatially, zero-pad channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = extra_channels // 2  # planes/4 on each side when the width doubles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    Where the shape changes the shortcut is option A (parameter-free, ResNet-32) or option B
    (1x1 conv + BN projection, the FSGL ResNet-34; docs/methods/README.md#backbones).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: Shortcut) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(stride, planes - in_planes)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def cifar_resnet_trunk(
    blocks: list[int], widths: list[int], in_channels: int, shortcut: Shortcut
) -> nn.Sequential:
    """Stem (3x3 conv to widths[0], BN, ReLU), then one stage per width; stride 2 from stage 2 on."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
        bn1=nn.BatchNorm2d(widths[0]),
        relu=nn.ReLU(inplace=True),
    )
    in_planes = widths[0]
    for stage, (count, planes) in enumerate(zip(blocks, widths)):
        strides = [1 if stage == 0 else 2] + [1] * (count - 1)
        stage_blocks = []
        for stride in strides:
            stage_blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
            in_planes = planes
        layers[f"layer{stage + 1}"] = nn.Sequential(*stage_blocks)
    return nn.Sequential(layers)


@MODELS.register("resnet32")
def resnet32(num_classes: int, in_channels: int) -> Classifier:
    """LDAM-DRW ResNet-32 (docs/methods/README.md#backbones): 3 x 5 blocks, 16/32/64, option A, 64-d, ~0.46 M.

    kaiming_normal_ (fan_in) on every conv and linear weight, as the reference ``_weights_init``;
    BN and the linear bias keep PyTorch defaults.
    """
    model = Classifier(cifar_resnet_trunk([5, 5, 5], [16, 32, 64], in_channels, "A"), 64, num_classes)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
    return model


@MODELS.register("resnet34_cifar")
def resnet34_cifar(num_classes: int, in_channels: int) -> Classifier:
    """FSGL's and BNS's (CIFAR-100) CIFAR ResNet-34 (docs/methods/README.md#backbones): [3,4,6,3]
    blocks, 64..512, projection shortcuts.

    PyTorch default init, as the references; the backbone has 21,276,992 parameters.
    """
    trunk = cifar_resnet_trunk([3, 4, 6, 3], [64, 128, 256, 512], in_channels, "B")
    return Classifier(trunk, 512, num_classes)


@MODELS.register("resnet18_cifar")
def resnet18_cifar(num_classes: int, in_channels: int) -> Classifier:
    """BNS's CIFAR-10 ResNet-18 (the kuangliu CIFAR layout; docs/methods/README.md#backbones): [2,2,2,2]
    blocks, 64..512, projection shortcuts, PyTorch default init; the backbone has 11,168,832 parameters."""
    trunk = cifar_resnet_trunk([2, 2, 2, 2], [64, 128, 256, 512], in_channels, "B")
    return Classifier(trunk, 512, num_classes)
