"""Every paper-recipe file under configs/ loads layered on params.yaml (no training): the method is
registered, the dataset is CIFAR-LT and the imbalance factor is the one in the file name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ltrepro.config import load_config
from ltrepro.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "configs").glob("**/*.yaml"))


def test_there_are_paper_recipes():
    assert FILES, "no configs/**/*.yaml found"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO / "configs")) for p in FILES])
def test_recipe_loads_on_params_yaml(path: Path):
    cfg = load_config([REPO / "params.yaml", path])
    match = re.fullmatch(r"(?P<method>\w+)_if(?P<imbalance>\d+)", path.stem)
    assert match, f"{path.name}: expected <method>_if<IF>.yaml"
    assert cfg.method in METHODS, f"{cfg.method!r} is not a registered method: {METHODS.names()}"
    assert cfg.method == match["method"]
    assert cfg.data.name in ("cifar10_lt", "cifar100_lt")
    assert path.parent.name == cfg.data.name
    assert cfg.data.imbalance == float(match["imbalance"])
