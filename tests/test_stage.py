"""`ltrepro stage`: one stage by name or slot, fixed run directories, inputs, and overrides anywhere."""
import json

import pytest

from ltrepro.cli import main, split_overrides
from ltrepro.runs import read_run

FAST = ["stage1.epochs=2", "stage2.epochs=2", "stage2.batch_size=16", "ffn.kps_params={ga_epoch: 1}"]


def test_overrides_are_taken_anywhere_and_in_mlflow_form():
    rest, overrides = split_overrides(
        ["stage", "stage2", "--ffn.lam", "0.7", "--method=h2t", "seed=3", "--input", "stage1=runs/x", "--foo", "1", "x=1"]
    )
    assert overrides == ["ffn.lam=0.7", "method=h2t", "seed=3"]
    assert rest == ["stage", "stage2", "--input", "stage1=runs/x", "--foo", "1", "x=1"]  # inputs and unknowns stay


def test_slots_run_by_position_and_empty_slots_are_marked(project, tmp_path):
    config = ["--config", str(project / "params.yaml"), "method=h2t", *FAST]
    assert main(["stage", "stage1:1", "--run-dir", str(tmp_path / "s1"), "--metrics", str(tmp_path / "s1.json"), *config]) == 0
    assert read_run(tmp_path / "s1")["stage"] == "stage1"
    assert json.loads((tmp_path / "s1.json").read_text())["val_top1"] >= 0
    assert main(["stage", "stage1:2", "--run-dir", str(tmp_path / "s2"), "--metrics", str(tmp_path / "s2.json"), *config]) == 0
    assert json.loads((tmp_path / "s2/run.json").read_text())["status"] == "UNUSED"
    assert json.loads((tmp_path / "s2.json").read_text()) == {}
    args = ["stage", "stage2", "--from", str(tmp_path / "s1"), "--from", str(tmp_path / "s2"), "--run-dir", str(tmp_path / "f")]
    assert main([*args, *config]) == 0
    info = read_run(tmp_path / "f")
    assert info["inputs"] == {"stage1": str(tmp_path / "s1")} and info["status"] == "FINISHED"


# dvc.yaml's slots, run as its stages call them: (method, extra overrides, each slot's (stage, final)
# or None for an UNUSED marker, the slot `ltrepro evaluate` must pick)
SLOT_CASES = [
    ("ce", [], [("stage1", True), None, None, None], "s1"),
    ("bns_ipdpp", ["stage1.batch_size=16", "probe.epochs=1", "ipdpp.k=5"],
     [("pretrain", False), None, ("probe", False), ("finetune", True)], "f3"),
]  # fmt: skip


@pytest.mark.parametrize("method, extra, expected, final", SLOT_CASES, ids=[case[0] for case in SLOT_CASES])
def test_a_method_fills_the_slots_of_its_depths_and_evaluate_picks_its_final_stage(project, tmp_path, method, extra, expected, final):
    """A one-stage method trains in slot 1 and marks the other three UNUSED; a three-stage one
    puts pre-training in slot 1, the probe in the depth-2 slot and the fine-tune in the depth-3 one.
    `ltrepro evaluate` over all four slots (as the DVC stage calls it) evaluates the final stage."""
    config = ["--config", str(project / "params.yaml"), f"method={method}", *FAST, *extra]
    slots = {"stage1:1": "s1", "stage1:2": "s2", "stage2:1": "f2", "stage3:1": "f3"}
    for done, (slot, name) in enumerate(slots.items()):
        earlier = [arg for folder in list(slots.values())[:done] for arg in ("--from", str(tmp_path / folder))]
        assert main(["stage", slot, *earlier, "--run-dir", str(tmp_path / name), *config]) == 0
    infos = [json.loads((tmp_path / name / "run.json").read_text()) for name in slots.values()]
    held = [None if info["status"] == "UNUSED" else (info["status"], info["method"], info["stage"], info["final"]) for info in infos]
    assert held == [None if e is None else ("FINISHED", method, *e) for e in expected]
    out = tmp_path / "test.json"
    assert main(["evaluate", *(str(tmp_path / name) for name in slots.values()), "--root", str(project),
                 "--out", str(out), "--plots-dir", str(tmp_path / "plots")]) == 0  # fmt: skip
    evaluated = json.loads(out.read_text())
    assert evaluated["run_dir"].endswith(f"/{final}") and 0 <= evaluated["test_top1"] <= 100


def test_stage2_finds_its_inputs_or_says_how_to_make_them(project, capsys):
    config = ["--config", str(project / "params.yaml"), "method=crt", *FAST]
    assert main(["stage", "stage2", *config]) == 2
    assert "crt/stage2 needs input stage1: pass --input stage1=RUN_DIR (or runs:/RUN_ID)" in capsys.readouterr().err
    assert main(["stage", "stage1", *config]) == 0
    assert main(["stage", "stage2", *config]) == 0  # the finished stage 1 of this config is found


@pytest.mark.parametrize(
    "args, message",
    [
        (["stage", "stage3"], "method 'crt' has no stage 'stage3'"),
        (["stage", "stage2:0"], "a slot is written stageL:N with L, N >= 1"),
        (["stage", "stage2", "--input", "stage9=runs/x"], "crt/stage2 has no input 'stage9'"),
        (["stage", "stage2", "--input", "stage1"], "expected NAME=RUN_DIR or NAME=runs:/RUN_ID"),
        (["stage", "stage2", "--input", "stage1=nowhere"], "not an ltrepro run directory"),
        (["evaluate", "runs/x", "seed=1"], "takes no config overrides"),
    ],
)
def test_bad_stage_arguments_are_one_line(project, capsys, args, message):
    assert main([*args, "--config", str(project / "params.yaml"), "method=crt"] if args[0] == "stage" else args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_fixed_run_dir_is_never_overwritten(project, tmp_path, capsys):
    config = ["--config", str(project / "params.yaml"), "method=ce", *FAST]
    assert main(["stage", "stage1", "--run-dir", str(tmp_path / "s1"), *config]) == 0
    before = (tmp_path / "s1/best.pt").read_bytes()
    assert main(["stage", "stage1", "--run-dir", str(tmp_path / "s1"), *config]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "s1/best.pt").read_bytes() == before
