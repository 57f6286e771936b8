"""posthoc_la and tau_norm: a stage that trains nothing on the CE run, tau chosen on validation."""
import mlflow
import pytest
import torch

from ltrepro.methods.posthoc import PosthocConfig, tau_grid
from ltrepro.runner import train
from ltrepro.scoring import evaluate_run

FAST = ["stage1.epochs=2", "stage1.batch_size=16"]


def test_tau_grid_runs_from_0_to_tau_max_or_is_the_fixed_tau():
    assert tau_grid(PosthocConfig(tau_max=0.2, tau_step=0.05)) == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert tau_grid(PosthocConfig(tau_max=1.0, tau_step=0.3)) == [0.0, 0.3, 0.6, 0.9]
    assert tau_grid(PosthocConfig(tau=0.7)) == [0.7]


@pytest.mark.parametrize("name", ["posthoc_la", "tau_norm"])
def test_posthoc_stage_reuses_ce_keeps_the_validation_best_tau_and_a_fixed_tau_0_is_ce(project, name):
    ce = train(project / "params.yaml", ["method=ce", *FAST])[0]
    stage1, posthoc = train(project / "params.yaml", [f"method={name}", *FAST])
    assert stage1.reused and stage1.run_dir == ce.run_dir  # the CE run, not a new one
    # tau = 0 is in the grid and is the CE model itself, so validation can only match or improve
    assert posthoc.metrics["val_top1"] >= ce.metrics["val_top1"]
    assert posthoc.metrics["selected_epoch"] == 0
    assert sorted(p.name for p in posthoc.run_dir.glob("*.pt")) == ["best.pt"]  # no training state to resume
    chosen = mlflow.get_run(posthoc.run_id).data.metrics["posthoc_tau"]
    saved = torch.load(posthoc.run_dir / "best.pt", weights_only=True)["model"]["head.tau"]
    assert saved.item() == pytest.approx(chosen) and chosen in tau_grid(PosthocConfig())
    assert evaluate_run(posthoc.run_dir)["test_top1"] == posthoc.metrics["test_top1"]  # rebuilt with the saved tau
    # a fixed tau (what `ltrepro tune` sets): 0 is the CE model's every score, 2 changes them
    at_zero = train(project / "params.yaml", [f"method={name}", *FAST, "posthoc.tau=0"])[-1]
    assert {k: at_zero.metrics[k] for k in ("val_top1", "test_top1", "test_ece")} == {
        k: ce.metrics[k] for k in ("val_top1", "test_top1", "test_ece")
    }
    strong = train(project / "params.yaml", [f"method={name}", *FAST, "posthoc.tau=2"])[-1]
    assert not strong.reused and strong.metrics["test_ece"] != ce.metrics["test_ece"]


def test_tune_reaches_the_post_hoc_tau_with_either_pruner(project):
    import optuna

    from ltrepro.tune import tune

    for pruner in ("hyperband", "median"):
        summary = tune([project / "params.yaml"], ["method=posthoc_la", *FAST, "tune.trials=2", f"tune.study={pruner}",
                                                   f"tune.pruner={pruner}"], project)  # fmt: skip
        assert summary["complete"] == 2
        study = optuna.load_study(study_name=pruner, storage=f"sqlite:///{project / 'optuna.db'}")
        assert all(0.0 <= t.params["posthoc.tau"] <= 2.0 for t in study.trials)
