"""What every run starts from: the resolved config, the device and the method it names."""
from __future__ import annotations

import dataclasses

import torch

from ltrepro.config import Config
from ltrepro.data import resolve_data_config
from ltrepro.errors import LtreproError


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise LtreproError("device: 'cuda' was asked for but torch sees no CUDA device; use device=auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve(cfg: Config) -> Config:
    """Fill every ``null`` that has a dataset default, so the logged config is the one that ran;
    recipes are already applied and are dropped, so a saved config reloads to itself."""
    return dataclasses.replace(cfg, data=resolve_data_config(cfg.data), recipes={})


def get_method(name: str):
    from ltrepro.methods import METHODS

    try:
        return METHODS.get(name)
    except LtreproError as exc:
        raise LtreproError(f"method: {exc}") from None
