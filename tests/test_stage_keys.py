"""Stage keys change when, and only when, a value the stage reads changes; unread settings warn."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from ltrepro.config import config_class, flatten, load_config, to_dict, unflatten, with_overrides
from ltrepro.context import resolve
from ltrepro.methods import METHODS
from ltrepro.runner import check_method, plan_method
from ltrepro.stage_keys import GLOBAL_KEYS, NOT_IN_KEY, covers, stage_reads

REPO = Path(__file__).resolve().parents[1]


def field_type(path: str):
    """The annotation of a config leaf (``stage1.schedule``), or None inside a free-form dict."""
    node = config_class()
    tp = None
    for part in path.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        tp = typing.get_type_hints(node)[part]
        node = tp
    return tp


def another_value(path: str, value):
    """A different value the config accepts for ``path``."""
    tp = field_type(path)
    if typing.get_origin(tp) is typing.Literal:
        return next(option for option in typing.get_args(tp) if option != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.01 if value < 0.5 else value / 2  # never the value itself
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[-1]] if value else [1]
    if value is None:  # an optional field (or a free-form dict entry): a value of its type
        return "x" if str in typing.get_args(tp) else 16
    raise AssertionError(f"no mutation for {path}={value!r}")


def leaves(cfg) -> dict:
    flat = flatten(to_dict(cfg))
    for section in ("stage1", "stage2"):  # empty dicts have no leaves; give them one
        flat[f"{section}.loss_params.probe_value"] = None
    fixed = ("posthoc.epochs",)  # one allowed value (a post-hoc stage trains for 0 epochs): nothing to change
    return {k: v for k, v in flat.items() if not covers(("method", "recipes", *fixed), k)}


@pytest.mark.parametrize("method", METHODS.names())
def test_key_changes_exactly_when_a_read_value_changes(method):
    cfg = load_config(REPO / "params.yaml", [f"method={method}"])
    base = {stage.name: key for stage, _, key in plan_method(cfg)}
    stages = {stage.name: stage for stage in METHODS.get(method).stages}
    for path, value in leaves(cfg).items():
        new = another_value(path, value)
        changed_cfg = with_overrides(cfg, unflatten({path: new}))
        keys = {stage.name: key for stage, _, key in plan_method(changed_cfg)}
        changed = set()
        for name, stage in stages.items():  # stages come in order: inputs first
            overridden = {f"{block}.{name}" for block, fields in stage.overrides(cfg).items() for name in fields}  # whole fields
            reads = covers(stage_reads(stage), path) and path not in NOT_IN_KEY and not covers(list(overridden), path)
            reads |= path == "audit.test_every_epoch" and METHODS.get(method).is_final(stage)  # an audited run is its own
            if reads or any(i in changed for i in stage.loaded_inputs(changed_cfg)):
                changed.add(name)
        assert {name for name in stages if keys[name] != base[name]} == changed, f"{method}: {path}={value!r} -> {new!r}"


def test_an_input_the_builder_does_not_load_stays_out_of_the_key():
    """bns_ipdpp's fine-tune follows the probe in the plan but loads it only to seed its head."""
    def keys(*overrides):
        return {stage.name: key for stage, _, key in plan_method(load_config(REPO / "params.yaml", ["method=bns_ipdpp", *overrides]))}

    for head in ("false", "true"):
        base, other = keys(f"ipdpp.init_head_from_probe={head}"), keys(f"ipdpp.init_head_from_probe={head}", "probe.lr=0.01")
        assert base["pretrain"] == other["pretrain"] and base["probe"] != other["probe"]
        assert (base["finetune"] != other["finetune"]) == (head == "true")


def test_two_builders_never_share_a_key():
    cfg = load_config(REPO / "params.yaml")
    keys = {}
    for name in METHODS.names():
        for stage, _, key in plan_method(with_overrides(cfg, {"method": name})):
            keys.setdefault(key, set()).add(f"{stage.build.__module__}:{stage.build.__qualname__}")
    assert all(len(builders) == 1 for builders in keys.values())
    # CE's stage 1 is one run for ce, crt, ffn's CE branch
    shared = {plan_method(with_overrides(cfg, {"method": m}))[0][2] for m in ("ce", "crt", "ffn")}
    assert len(shared) == 1


def test_setting_a_value_the_method_never_reads_warns_once_naming_it(capsys):
    cfg = load_config(REPO / "params.yaml", ["method=ffn", "stage2.bn=shift", "stage2.init=random", "h2t.rho=0.3"])
    check_method(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ltrepro: warning: ffn never reads stage2.init, stage2.bn, h2t.rho; they change nothing"]
    check_method(load_config(REPO / "params.yaml", ["method=ffn", "ffn.lam=0.7", "seed=3", "tune.trials=2"]))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("method", METHODS.names())
def test_params_yaml_recipes_set_nothing_their_method_ignores(method, capsys):
    check_method(load_config(REPO / "params.yaml", [f"method={method}"]))
    assert "warning" not in capsys.readouterr().err


def test_global_keys_are_config_keys():
    fields = {f.name for f in dataclasses.fields(config_class())}
    assert set(GLOBAL_KEYS) <= fields


def stage1_key(*overrides: str) -> str:
    """The key of ce's stage 1 as a run computes it (dataset defaults resolved)."""
    return plan_method(resolve(load_config(REPO / "params.yaml", ["method=ce", *overrides])))[0][2]


def test_keys_on_record_stay_valid():
    """Fields added since (LATE_FIELDS) stay out of a key at their default, so the finished runs on
    record are still found. If a default in params.yaml changes on purpose, `ltrepro rekey` and update."""
    assert stage1_key() == "b729a03f81babcb8"  # ce stage 1 on fmnist_lt, seed 0, before class_order_seed
    assert stage1_key("data.class_order_seed=0") != stage1_key() != stage1_key("stage1.fcc_by_index=true")


def test_the_lt_draw_seed_is_written_one_way():
    """A split seed equal to the run seed, or any split seed of first_n, draws the same subset as null."""
    assert stage1_key("data.split_seed=0") == stage1_key()
    assert stage1_key("seed=2", "data.split_seed=2") == stage1_key("seed=2") != stage1_key()
    assert stage1_key("data.split_seed=1") not in (stage1_key(), stage1_key("seed=1"))
    first_n = stage1_key("data.split=first_n")
    assert stage1_key("data.split=first_n", "data.split_seed=5") == first_n != stage1_key()
