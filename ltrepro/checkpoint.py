"""Checkpoints written atomically and read safely.

A checkpoint is a plain dict of tensors and primitives tagged with ``format``; it is written to a
temporary file in the same directory and renamed over the old one, so a kill at any moment
leaves either the previous or the new checkpoint, never half of one. Reading uses
``torch.load(weights_only=True)``: no pickle from outside is executed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ltrepro.errors import LtreproError
from ltrepro.files import write_atomic

FORMAT = "ltrepro-checkpoint/1"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file beside ``path``, fsync, then rename over ``path``."""
    write_atomic(path, lambda stream: torch.save({"format": FORMAT, **state}, stream))


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """Load and check an ltrepro checkpoint; anything else fails with one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LtreproError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise LtreproError(
            f"{path}: not a readable checkpoint: truncated, corrupt, or holding objects that safe loading "
            f"refuses ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LtreproError(f"{path}: not an ltrepro checkpoint (expected format {FORMAT!r})")
    missing = [key for key in required if key not in state]
    if missing:
        raise LtreproError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict, with a mismatch reported as a one-line error naming the checkpoint."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise LtreproError(f"{path}: weights do not fit this model ({detail})") from None
