from pathlib import Path

import pytest

import yaml

from ltrepro.config import BLOCKS, Config, StageConfig, config_class, flatten, load_config, to_dict
from ltrepro.errors import LtreproError

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_loads_and_overrides_apply():
    cfg = load_config(REPO / "params.yaml", ["stage1.lr=0.05", "data.augment.cutout=8", "data.n_max=300"])
    assert isinstance(cfg, Config) and isinstance(cfg.stage1, StageConfig)
    assert cfg.stage1.lr == 0.05 and cfg.data.augment.cutout == 8 and cfg.data.n_max == 300
    assert cfg.data.name == "fmnist_lt"


def test_ints_widen_to_float_and_null_is_kept():
    cfg = load_config(None, ["stage1.lr=1", "data.n_max=null"])
    assert cfg.stage1.lr == 1.0 and isinstance(cfg.stage1.lr, float) and cfg.data.n_max is None


def test_flatten_gives_dotted_keys():
    flat = flatten(to_dict(load_config(None)))
    assert flat["stage1.lr"] == 0.1 and flat["data.augment.flip"] is True and "data" not in flat


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage1.lrx=1", "unknown key stage1.lrx; allowed: epochs"),
        ("nope=1", "unknown key nope"),
        ("data.augment.zoom=2", "unknown key data.augment.zoom"),
        ("stage1.lr=fast", "stage1.lr: got 'fast', expected a finite number"),
        ("stage1.epochs=2.5", "stage1.epochs: got 2.5, expected an integer"),
        ("stage1.nesterov=1", "stage1.nesterov: got 1, expected true or false"),
        ("stage1.schedule=linear", "stage1.schedule: got 'linear', expected one of 'cosine', 'multistep'"),
        ("stage1.sampler=random", "expected one of 'instance', 'class_balanced', 'sqrt', 'progressive'"),
        ("stage1.epochs=0", "stage1.epochs: 0 is out of range; allowed: >= 1"),
        ("stage1.momentum=1.5", "stage1.momentum: 1.5 is out of range; allowed: in [0.0, 1.0]"),
        ("data.imbalance=0.5", "data.imbalance: 0.5 is out of range"),
        ("stage1.milestones=[10, x]", "stage1.milestones[1]: got 'x', expected an integer"),
        ("stage1=3", "stage1: expected a mapping"),
        ("stage1.lr", "expected key.sub=value"),
        ("seed=true", "seed: got True, expected an integer"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(LtreproError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(LtreproError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed\n")
    with pytest.raises(LtreproError, match="not valid YAML"):
        load_config(bad)


def test_precedence_params_then_recipe_then_later_files_then_overrides(tmp_path):
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"method": "ce", "stage2": {"lr": 0.3}, "recipes": {"ffn": {"stage2": {"lr": 0.002, "epochs": 30}}}}))
    paper = tmp_path / "paper.yaml"
    paper.write_text(yaml.safe_dump({"method": "ffn", "stage2": {"epochs": 40}}))
    assert load_config(params).stage2.lr == 0.3  # method ce: no recipe
    recipe = load_config([params, paper])
    assert (recipe.method, recipe.stage2.lr, recipe.stage2.epochs) == ("ffn", 0.002, 40)
    assert load_config([params, paper], ["stage2.epochs=5"]).stage2.epochs == 5


def test_bad_recipe_fails_at_load_even_for_another_method(tmp_path):
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"recipes": {"h2t": {"h2t": {"rho": 2.0}}}}))
    with pytest.raises(LtreproError, match=r"recipes.h2t.h2t.rho: 2.0 is out of range; allowed: in \[0.0, 1.0\]"):
        load_config(params)


def test_params_yaml_and_the_dataclasses_hold_one_set_of_defaults():
    """params.yaml is where defaults live; the dataclasses (what a partial params file falls back
    to) must hold the same keys and values, method blocks included."""
    documented = {k: v for k, v in flatten(yaml.safe_load((REPO / "params.yaml").read_text())).items() if not k.startswith("recipes.")}
    built = {k: v for k, v in flatten(to_dict(config_class()())).items() if not k.startswith("recipes")}
    assert sorted(documented) == sorted(built)
    assert {k: v for k, v in built.items() if documented[k] != v} == {}
    assert {"ffn", "h2t"} <= set(BLOCKS)  # the method blocks are registered by their methods


def test_a_registered_block_is_a_validated_top_level_key():
    from dataclasses import dataclass

    from ltrepro.config import bounded, register_block, unregister_block

    @dataclass
    class ToyBlock:
        width: int = bounded(3, 1)

    register_block("toy_block", ToyBlock)
    try:
        assert load_config(None, ["toy_block.width=5"]).toy_block.width == 5
        with pytest.raises(LtreproError, match=r"toy_block.width: 0 is out of range"):
            load_config(None, ["toy_block.width=0"])
        with pytest.raises(ValueError, match="registered twice"):
            register_block("stage1", ToyBlock)
    finally:
        unregister_block("toy_block")
    with pytest.raises(LtreproError, match="unknown key toy_block"):
        load_config(None, ["toy_block.width=5"])


def float_fields(cls=None, prefix=""):
    """(key, low, high) of every float field of the config, nested blocks included."""
    import dataclasses
    import typing

    from ltrepro.config import config_class

    cls = cls or config_class()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from float_fields(hints[f.name], f"{prefix}{f.name}.")
        elif hints[f.name] in (float, float | None):
            yield f"{prefix}{f.name}", f.metadata.get("min"), f.metadata.get("max")


def in_range(low, high):
    """A value with three significant digits inside [low, high]."""
    low = 0.0 if low is None else low
    return round(low + 0.125, 3) if high is None or high >= low + 0.125 else (low + high) / 2


SCIENTIFIC = {  # value -> text; YAML 1.1 reads only the last as a float
    "1e-3 form": lambda v: f"{round(v * 1000)}e-3",
    "5E-4 form": lambda v: f"{round(v * 1000)}E-3",
    "unsigned exponent": lambda v: f"{v}e0",
    "dot and signed exponent": lambda v: f"{v * 10:.4f}e-1",
}


@pytest.mark.parametrize("form", SCIENTIFIC)
def test_every_float_field_takes_scientific_notation_from_overrides_and_yaml(tmp_path, form):
    fields = list(float_fields())
    assert {"stage1.lr", "stage2.lr", "stage1.sam.rho", "data.imbalance", "registry.margin"} <= {k for k, _, _ in fields}
    for key, low, high in fields:
        text = SCIENTIFIC[form](in_range(low, high))
        parts = key.split(".")
        yaml_text = "".join(f"{'  ' * depth}{part}:\n" for depth, part in enumerate(parts[:-1]))
        (tmp_path / "p.yaml").write_text(yaml_text + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {text}\n")
        for cfg in (load_config(None, [f"{key}={text}"]), load_config(tmp_path / "p.yaml")):
            node = cfg
            for part in parts:
                node = getattr(node, part)
            assert node == pytest.approx(float(text)), (key, text)


def test_numbers_in_free_form_blocks_and_cli_forms_take_scientific_notation():
    from ltrepro.cli import split_overrides

    rest, overrides = split_overrides(["train", "--stage1.lr", "1e-3", "--stage1.weight_decay=5E-4"])
    cfg = load_config(None, [*overrides, "stage1.loss_params={beta: 1e-4}", "tune.space={ffn: {lam: [1e-2, 9E-1]}}"])
    assert (cfg.stage1.lr, cfg.stage1.weight_decay) == (0.001, 0.0005) and rest == ["train"]
    assert cfg.stage1.loss_params == {"beta": 0.0001} and cfg.tune.space == {"ffn": {"lam": [0.01, 0.9]}}
    with pytest.raises(LtreproError, match="stage1.lr: got 'inf', expected a finite number"):
        load_config(None, ["stage1.lr=inf"])
    with pytest.raises(LtreproError, match="expected a finite number"):
        load_config(None, ["stage1.lr=1e400"])


def test_an_option_value_that_reads_key_value_stays_with_its_option():
    from ltrepro.cli import build_parser, split_overrides

    argv = ["report", "--grid", "data.imbalance=10,100", "stage1.lr=0.1", "--grid=seed=1,2", "--stage", "probe"]
    rest, overrides = split_overrides(argv)
    assert overrides == ["stage1.lr=0.1"]
    args = build_parser().parse_args(rest)
    assert args.grid == ["data.imbalance=10,100", "seed=1,2"] and args.stage == "probe"
    rest, overrides = split_overrides(["stage", "--restart", "stage1", "seed=3"])  # a flag takes no value
    assert rest == ["stage", "--restart", "stage1"] and overrides == ["seed=3"]


def test_a_yaml_syntax_error_is_one_line(tmp_path, capsys):
    from ltrepro.cli import main

    (tmp_path / "params.yaml").write_text("seed: 1\nstage1:\n  lr: [0.1\n  epochs: 3\n")
    assert main(["train", "--config", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "params.yaml: not valid YAML (" in err and "at line" in err
