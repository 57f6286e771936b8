"""Every registered method end to end on the tiny project: stage 1 then stage 2, and the hand-off."""
import json

import pytest
import torch
import yaml

from ltrepro.cli import main
from ltrepro.errors import LtreproError
from ltrepro.methods import METHODS
from ltrepro.runner import train
from ltrepro.scoring import evaluate_run

FAST = ["stage1.epochs=2", "stage1.batch_size=16", "stage2.epochs=2", "stage2.batch_size=16", "ffn.kps_params={ga_epoch: 1}",
        "probe.epochs=2", "ipdpp.k=5"]


def weights(run_dir):
    return torch.load(run_dir / "best.pt", weights_only=True)["model"]


def frozen_stage(method: str) -> tuple[str, dict[str, str]]:
    """The stage that trains a head on frozen input backbones, and where each input's backbone sits
    inside its state dict."""
    if method == "ffn":
        return "stage2", {"stage1_ce": "ce.backbone.", "stage1_kps": "kps.backbone."}
    if method == "bns_ipdpp":
        return "probe", {"pretrain": "backbone.backbone."}
    if method in POSTHOC:
        return "posthoc", {"stage1": "backbone.backbone."}
    return "stage2", {"stage1": "backbone.backbone."}


POSTHOC = ("posthoc_la", "tau_norm")  # their stage trains nothing: the stage-1 head under a correction


# the tiny project has no recipes: FSGL's SAM and feature scaling switched on here
EXTRA = {name: ["stage1.update=sam", "stage1.fcc=0.5"] for name in ("fsgl", "fsgl_crt", "fsgl_h2t")}


@pytest.mark.parametrize("name", METHODS.names())
def test_method_runs_end_to_end_and_hands_off_exact_weights(project, name):
    method = METHODS.get(name)
    results = train(project / "params.yaml", [f"method={name}", *FAST, *EXTRA.get(name, [])])
    assert [r.stage for r in results] == [s.name for s in method.stages]
    by_stage = {r.stage: r for r in results}
    for result in results:
        assert {"val_top1", "test_top1", "test_many", "test_medium", "test_few", "test_ece"} <= set(result.metrics)
    rebuilt = evaluate_run(results[-1].run_dir)  # the final model rebuilt from its config and inputs
    assert rebuilt["test_top1"] == results[-1].metrics["test_top1"]
    if len(method.stages) == 1:
        return
    head_stage, prefixes = frozen_stage(name)
    stage2 = weights(by_stage[head_stage].run_dir)
    section = method.stage(head_stage).section
    shift_bn = yaml.safe_load((by_stage[head_stage].run_dir / "config.yaml").read_text())[section].get("bn") == "shift"
    for stage, prefix in prefixes.items():
        stage1 = weights(by_stage[stage].run_dir)
        backbone = {k.removeprefix("backbone."): v for k, v in stage1.items() if k.startswith("backbone.")}
        for key, value in backbone.items():
            frozen = stage2[prefix + key]
            if shift_bn and ("running_" in key or "num_batches_tracked" in key):
                continue  # shift BN: running statistics follow the stage-2 batches by design
            assert torch.equal(frozen, value), f"{name}: {stage} {key} changed in stage 2"
    head_keys = [k for k in stage2 if k.startswith("head.")]
    assert head_keys
    stage1_head = {k: v for k, v in weights(by_stage[method.stage(head_stage).inputs[-1]].run_dir).items() if k.startswith("head.")}
    if name in POSTHOC:
        assert all(torch.equal(stage2[k.replace("head.", "head.head.", 1)], v) for k, v in stage1_head.items())
    else:
        changed = [k for k in head_keys if k not in stage1_head or not torch.equal(stage2[k], stage1_head[k])]
        assert changed, f"{name}: {head_stage} did not train its head"
    run_json = json.loads((results[-1].run_dir / "run.json").read_text())
    assert set(run_json["inputs"]) == set(method.stages[-1].inputs)
    if name == "bns_ipdpp":  # the fine-tune trains the whole pre-trained network
        encoder, tuned = weights(by_stage["pretrain"].run_dir), weights(results[-1].run_dir)
        assert all(k in tuned for k in encoder if k.startswith("backbone."))
        assert any(not torch.equal(tuned[k], v) for k, v in encoder.items() if k.startswith("backbone.") and v.is_floating_point())


def test_finished_stages_are_reused_not_retrained(project):
    first = train(project / "params.yaml", ["method=crt", *FAST])
    again = train(project / "params.yaml", ["method=crt", *FAST])
    assert [r.reused for r in again] == [True, True] and again[-1].tracking_ui.startswith("mlflow ui --backend-store-uri sqlite:")
    assert [r.run_dir for r in again] == [r.run_dir for r in first]
    ce = train(project / "params.yaml", ["method=ce", *FAST])  # cRT's stage 1 is the CE baseline
    assert ce[0].reused and ce[0].run_dir == first[0].run_dir
    changed = train(project / "params.yaml", ["method=crt", *FAST, "stage2.lr=0.01"])
    assert [r.reused for r in changed] == [True, False]


def test_stage2_records_its_inputs_in_mlflow(project):
    import mlflow

    results = train(project / "params.yaml", ["method=ffn", *FAST])
    tags = mlflow.get_run(results[-1].run_id).data.tags
    assert tags["input.stage1_ce.run_id"] == results[0].run_id
    assert tags["input.stage1_kps.run_id"] == results[1].run_id
    assert tags["method"] == "ffn" and tags["stage"] == "stage2"


def test_methods_command_lists_stages_and_tunables(capsys):
    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(METHODS.names())
    assert [s["name"] for s in listed["ffn"]["stages"]] == ["stage1_ce", "stage1_kps", "stage2"]
    assert listed["ffn"]["tunables"][0]["key"] == "ffn.lam" and listed["h2t"]["tunables"][0]["key"] == "h2t.rho"


def test_unknown_method_and_bad_recipe_fail_at_once(project, capsys):
    assert main(["train", "--config", str(project / "params.yaml"), "method=ldam_drw"]) == 2
    assert "method: unknown method 'ldam_drw'" in capsys.readouterr().err
    assert main(["train", "--config", str(project / "params.yaml"), "method=crt", "stage2.loss=lsq"]) == 2
    assert "stage2.loss: unknown loss 'lsq'" in capsys.readouterr().err
    assert main(["train", "--config", str(project / "params.yaml"), "stage1.loss_params={s: 3}"]) == 2
    assert "stage1.loss: loss 'ce': unknown parameter 's'" in capsys.readouterr().err
    assert not (project / "runs").exists()  # nothing trained before the errors


@pytest.mark.parametrize("name, key", [("ce", "stage1.fcc"), ("ffn", "stage1.fcc"), ("h2t", "stage2.fcc")])
def test_fcc_composes_with_ce_ffn_stage1_and_h2t(project, name, key):
    plain = train(project / "params.yaml", [f"method={name}", *FAST])
    scaled = train(project / "params.yaml", [f"method={name}", *FAST, f"{key}=0.5"])
    assert not scaled[-1].reused
    a, b = weights(plain[-1].run_dir), weights(scaled[-1].run_dir)
    assert any(not torch.equal(a[k], b[k]) for k in a), f"FCC ({key}) changed nothing in {name}"
    config = yaml.safe_load((scaled[0].run_dir / "config.yaml").read_text())
    assert config[key.split(".")[0]]["fcc"] == 0.5 or key.startswith("stage2")


def test_report_reads_the_runs_the_runner_made(project, capsys):
    from ltrepro.report import collect, markdown_table

    results = train(project / "params.yaml", ["method=crt", *FAST])
    table = collect([project / "params.yaml"], project, ["crt", "ce", "h2t"], [0, 1], FAST)
    assert table["crt"][0]["test_top1"] == results[-1].metrics["test_top1"]
    assert table["ce"][0]["test_top1"] == results[0].metrics["test_top1"]  # cRT's stage 1 is CE's
    assert table["crt"][1] is None and table["h2t"][0] is None
    walls = table["crt"][0]["wall_s"]
    assert list(walls) == ["stage1", "stage2"] and all(seconds > 0 for seconds in walls.values())
    assert walls["stage1"] == table["ce"][0]["wall_s"]["stage1"]  # the reused stage counts its own run
    text = markdown_table(table)
    assert f"| stage1 {walls['stage1'] / 60:.1f} + stage2 {walls['stage2'] / 60:.1f} |" in text
    assert f"| crt | 0 (missing 1) | {results[-1].metrics['test_top1']:.2f} |" in text
    assert "| h2t |  (missing 0,1) | - |" in text
    assert main(["report", "--config", str(project / "params.yaml"), *FAST, "--methods", "crt", "--baseline", "ce", "--seeds", "0"]) == 0
    paired = capsys.readouterr().out.split("| method - ce |")[1]
    assert f"| crt | 0 | {results[-1].metrics['test_top1'] - results[0].metrics['test_top1']:+.2f} (one seed) |" in paired
    grid = collect([project / "params.yaml"], project, ["crt"], [0], FAST, {"data.imbalance": ["10", "5"]})
    assert grid["crt, data.imbalance=10"][0]["test_top1"] == results[-1].metrics["test_top1"]  # the fixture's IF
    assert grid["crt, data.imbalance=5"][0] is None
    first = collect([project / "params.yaml"], project, ["crt"], [0], FAST, stage="stage1")
    assert first["crt"][0]["test_top1"] == results[0].metrics["test_top1"] and list(first["crt"][0]["wall_s"]) == ["stage1"]
    with pytest.raises(LtreproError, match="--stage 'probe': method crt has stages stage1, stage2"):
        collect([project / "params.yaml"], project, ["crt"], [0], FAST, stage="probe")


def test_the_audit_reruns_the_final_stage_alone_on_the_usual_inputs(project):
    import mlflow

    from ltrepro.scoring import AUDIT_METRIC

    plain = train(project / "params.yaml", ["method=crt", *FAST])
    audited = train(project / "params.yaml", ["method=crt", *FAST, "audit.test_every_epoch=true"])
    assert [r.reused for r in audited] == [True, False] and audited[0].run_dir == plain[0].run_dir
    assert len(mlflow.MlflowClient().get_metric_history(audited[-1].run_id, AUDIT_METRIC)) == 2  # stage2.epochs
    assert mlflow.MlflowClient().get_metric_history(audited[0].run_id, AUDIT_METRIC) == []
