"""Stage-1 runs on the tiny project: resume equality, one test read, failed starts, bad checkpoints."""
import json

import numpy as np
import pytest
import torch

from ltrepro import engine
from ltrepro.cli import main
from ltrepro.errors import LtreproError
from ltrepro.optim import PlainUpdate
from ltrepro.readouts import LogitReadout
from ltrepro.stages import StagePlan
from ltrepro import runner, scoring
from ltrepro.runner import train
from ltrepro.scoring import evaluate_run


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def run_dirs(project):
    return sorted(p for p in (project / "runs").iterdir()) if (project / "runs").exists() else []


def test_resume_after_kill_equals_uninterrupted_run(project, monkeypatch):
    (full,) = train(project / "params.yaml", ["out_dir=uninterrupted"])
    calls = {"n": 0}
    real_validation = engine.validation_accuracy

    def killed_after_two_epochs(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_validation(*args)

    monkeypatch.setattr(engine, "validation_accuracy", killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train(project / "params.yaml", [])
    monkeypatch.setattr(engine, "validation_accuracy", real_validation)
    (killed,) = run_dirs(project)
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] == 1
    assert json.loads((killed / "run.json").read_text())["status"] == "RUNNING"
    (resumed,) = train(None, [], resume=killed)

    assert resumed.run_dir == killed
    for name in ("last.pt", "best.pt"):
        a, b = weights(full.run_dir / name), weights(resumed.run_dir / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_equal(resumed.metrics, full.metrics)  # NaN-aware: no "many" class at n_max 20
    import mlflow

    run = mlflow.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test_top1"] == full.metrics["test_top1"]


def test_run_logs_params_tags_metrics_and_artifacts(project):
    (result,) = train(project / "params.yaml", ["stage1.epochs=2"])
    import mlflow

    run = mlflow.get_run(result.run_id)
    assert run.data.params["stage1.lr"] == "0.05" and run.data.params["data.n_max"] == "20"
    assert run.data.params["data.val_per_class"] == "5" and run.data.params["model.in_channels"] == "null"
    for key in ("val_top1", "test_top1", "test_many", "test_medium", "test_few", "test_ece"):
        assert key in run.data.metrics
    assert len(mlflow.MlflowClient().get_metric_history(result.run_id, "val_acc")) == 2
    for tag in ("git_commit", "data_hash", "torch_version", "device"):
        assert run.data.tags[tag]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"config.yaml", "data_info.json", "metrics.json", "plots", "best.pt", "run.json"} <= artifacts
    info = json.loads((result.run_dir / "data_info.json").read_text())
    assert info["train_counts"] == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2] and info["index_hash"]
    # the selected checkpoint is the one with the best validation accuracy, not the last epoch
    history = json.loads((result.run_dir / "metrics.json").read_text())
    assert history["val_top1"] == result.metrics["val_top1"]


def test_evaluate_reproduces_the_final_test_metrics(project):
    (result,) = train(project / "params.yaml", ["stage1.epochs=1"])
    again = evaluate_run(result.run_dir)
    assert again["test_top1"] == result.metrics["test_top1"]
    assert again["test_ece"] == pytest.approx(result.metrics["test_ece"])


def test_selection_never_reads_the_test_split(project, monkeypatch):
    reads = []
    real_make_loader = runner.make_loader

    def spy(data, split, *args, **kwargs):
        reads.append(split)
        return real_make_loader(data, split, *args, **kwargs)

    monkeypatch.setattr(runner, "make_loader", spy)
    monkeypatch.setattr(scoring, "make_loader", spy)
    train(project / "params.yaml", ["stage1.epochs=2"])
    assert reads == ["val", "test"]  # the test loader is made once, after fit returned


def test_nonfinite_loss_names_epoch_and_step():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    batches = [(torch.ones(2, 4), torch.zeros(2, dtype=torch.long))] * 3

    class Loader:
        def __len__(self):
            return 3

        def epoch(self, epoch=0, generator=None):
            return iter(batches)

    class NanAtSecondStep:
        steps = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __call__(self, model, images, labels, rng):
            self.steps += 1
            loss = model(images).sum()
            return loss * float("nan") if self.steps == 2 else loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = StagePlan(model, NanAtSecondStep(), Loader(), optimizer, PlainUpdate(), LogitReadout())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(LtreproError, match="NaN or infinite at epoch 4, step 2"):
        engine.run_epoch(plan, scheduler, torch.device("cpu"), 0, 3, 5)


def test_bad_config_fails_before_anything_is_written(project, capsys):
    assert main(["train", "--config", str(project / "params.yaml"), "stage1.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage1.lr: -1.0 is out of range" in err
    assert main(["train", "--config", str(project / "params.yaml"), "model.name=vgg"]) == 2
    assert "model.name: unknown model 'vgg'" in capsys.readouterr().err
    assert main(["train", "--config", str(project / "params.yaml"), "data.name=mnist"]) == 2
    assert "data.name: unknown dataset 'mnist'" in capsys.readouterr().err
    assert run_dirs(project) == [] and not (project / "mlflow.db").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"garbage, not a checkpoint", "not a readable checkpoint"),
        (None, "not an ltrepro checkpoint"),  # a foreign torch file
        ("truncated", "not a readable checkpoint"),
    ],
)
def test_bad_checkpoint_on_resume_is_one_line_and_loses_nothing(project, capsys, content, message):
    (result,) = train(project / "params.yaml", ["stage1.epochs=1"])
    last = result.run_dir / "last.pt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(1)}}, last)
    elif content == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        last.write_bytes(content)
    before = {p.name: p.read_bytes() for p in result.run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(result.run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "last.pt" in err and err.count("\n") == 0
    assert {p.name: p.read_bytes() for p in result.run_dir.iterdir() if p.is_file()} == before


def test_checkpoint_of_another_model_is_refused(project, capsys):
    (result,) = train(project / "params.yaml", ["stage1.epochs=1"])
    state = torch.load(result.run_dir / "last.pt", weights_only=True)
    state["model"] = {k: v[..., :1] if v.ndim else v for k, v in state["model"].items()}
    torch.save(state, result.run_dir / "last.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(result.run_dir)]) == 2
    assert "weights do not fit this model" in capsys.readouterr().err


def test_resume_refuses_overrides_and_non_runs(project, capsys):
    assert main(["train", "--resume", str(project), "stage1.lr=0.1"]) == 2
    assert "drop the overrides" in capsys.readouterr().err
    assert main(["train", "--resume", str(project)]) == 2
    assert "not an ltrepro run directory" in capsys.readouterr().err


def test_lr_schedule_warmup_then_cosine_or_steps():
    from ltrepro.config import StageConfig

    cosine = StageConfig(epochs=10, warmup_epochs=2, schedule="cosine")
    factors = [engine.lr_factor(step, 5, cosine) for step in range(50)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[30] == pytest.approx(0.5)
    assert np.all(np.diff(factors[10:]) < 0)
    steps = StageConfig(epochs=10, warmup_epochs=0, schedule="multistep", milestones=[4, 8], gamma=0.1)
    assert [engine.lr_factor(e * 5, 5, steps) for e in (0, 4, 8)] == pytest.approx([1.0, 0.1, 0.01])


def test_run_json_from_elsewhere_is_one_line(project, capsys):
    (result,) = train(project / "params.yaml", ["stage1.epochs=1"])
    info = json.loads((result.run_dir / "run.json").read_text())
    (result.run_dir / "run.json").write_text(json.dumps({k: info[k] for k in ("mlflow_run_id", "project_root")}))
    capsys.readouterr()
    assert main(["evaluate", str(result.run_dir)]) == 2
    assert "lacks method, stage, inputs, stage_key" in capsys.readouterr().err
    (result.run_dir / "run.json").write_text(json.dumps({**info, "stage": "stage9"}))
    assert main(["train", "--resume", str(result.run_dir)]) == 2
    assert "method 'ce' has no stage 'stage9'" in capsys.readouterr().err
