"""Backbones by name: ``create_model("resnet32", num_classes=100, in_channels=3)``."""
from __future__ import annotations

from typing import Callable

from ltrepro.models.network import Classifier
from ltrepro.registry import Registry

MODELS: Registry[Callable[[int, int], Classifier]] = Registry("model")


def create_model(name: str, num_classes: int, in_channels: int) -> Classifier:
    """Build the registered model ``name``; an unknown name raises LtreproError listing the known ones."""
    return MODELS.get(name)(num_classes, in_channels)


# Imported after MODELS exists: importing these modules is what registers their factories.
from ltrepro.models import resnet_cifar, torchvision_nets  # noqa: E402,F401

__all__ = ["MODELS", "Classifier", "create_model"]
