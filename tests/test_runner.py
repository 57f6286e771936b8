"""Stage-1 runs on the tiny project: resume equality (Ctrl-C and kill -9), finding stopped runs,
one test read, failed starts, bad and malicious checkpoints, NaN weights."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

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


def stopped_run(project):
    """A one-epoch run marked KILLED, as Ctrl-C after its last epoch leaves it."""
    (result,) = train(project / "params.yaml", ["stage1.epochs=1"])
    info = json.loads((result.run_dir / "run.json").read_text())
    (result.run_dir / "run.json").write_text(json.dumps({**info, "status": "KILLED"}))
    return result


def interrupt_at_validation(monkeypatch, number: int) -> None:
    """Ctrl-C during the ``number``-th validation pass of this process (1-based), once."""
    real_validation, calls = engine.validation_accuracy, {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == number:
            raise KeyboardInterrupt
        return real_validation(*args)

    monkeypatch.setattr(engine, "validation_accuracy", interrupted)


def test_resume_after_kill_equals_uninterrupted_run(project, monkeypatch):
    (full,) = train(project / "params.yaml", ["out_dir=uninterrupted"])
    interrupt_at_validation(monkeypatch, 3)  # after two finished epochs
    with pytest.raises(KeyboardInterrupt):
        train(project / "params.yaml", [])
    (killed,) = run_dirs(project)
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] == 1
    assert json.loads((killed / "run.json").read_text())["status"] == "KILLED"
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
    for tag in ("git_commit", "data_hash", "torch_version", "device", "cpu"):
        assert run.data.tags[tag]
    import torch

    assert run.data.tags["torch_threads"] == str(torch.get_num_threads())  # fp32 CPU results depend on it
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
    store = (project / "mlflow.db").read_bytes()
    assert main(["train", "--config", str(project / "params.yaml"), "stage1.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage1.lr: -1.0 is out of range" in err
    assert main(["train", "--config", str(project / "params.yaml"), "model.name=vgg"]) == 2
    assert "model.name: unknown model 'vgg'" in capsys.readouterr().err
    assert main(["train", "--config", str(project / "params.yaml"), "data.name=mnist"]) == 2
    assert "data.name: unknown dataset 'mnist'" in capsys.readouterr().err
    assert run_dirs(project) == [] and (project / "mlflow.db").read_bytes() == store


@pytest.mark.parametrize(
    "content, message",
    [
        (b"garbage, not a checkpoint", "not a readable checkpoint"),
        (None, "not an ltrepro checkpoint"),  # a foreign torch file
        ("truncated", "not a readable checkpoint"),
    ],
)
def test_bad_checkpoint_on_resume_is_one_line_and_loses_nothing(project, capsys, content, message):
    result = stopped_run(project)
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
    result = stopped_run(project)
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
    (result.run_dir / "run.json").write_text(json.dumps({**info, "stage": "stage9", "status": "KILLED"}))
    assert main(["train", "--resume", str(result.run_dir)]) == 2
    assert "method 'ce' has no stage 'stage9'" in capsys.readouterr().err


def killed_mid_run(project, *args):
    """Start ``ltrepro ARGS`` as its own process and ``kill -9`` it once an epoch has been saved."""
    command = [sys.executable, "-m", "ltrepro", *args, "--config", str(project / "params.yaml")]
    worker = subprocess.Popen(command, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    saved = lambda: [*project.glob("runs/*/last.pt"), *project.glob("models/*/last.pt")]  # noqa: E731
    while not saved():
        assert worker.poll() is None and time.time() < deadline, worker.stderr and worker.stderr.read()
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    (last,) = saved()
    return last.parent


def mlflow_statuses():
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # this test's store, not the last one used
    return sorted(run.info.status for run in mlflow.search_runs(experiment_names=["ltrepro"], output_format="list"))


LONG_EPOCHS = 6  # after the first saved epoch, five more: ~1 s for the kill (polled every 20 ms) to land mid-run
LONG = [f"stage1.epochs={LONG_EPOCHS}"]


def test_kill_9_then_the_same_command_resumes_the_run(project, capsys):
    (full,) = train(project / "params.yaml", ["out_dir=uninterrupted", *LONG])
    killed = killed_mid_run(project, "train", *LONG)
    assert json.loads((killed / "run.json").read_text())["status"] == "RUNNING"  # as the kill left it
    capsys.readouterr()
    (resumed,) = train(project / "params.yaml", LONG)  # no --resume: the runner finds it by stage key
    assert resumed.run_dir == killed and not resumed.reused
    assert f"resuming {killed} after epoch" in capsys.readouterr().out
    for name in ("last.pt", "best.pt"):
        a, b = weights(full.run_dir / name), weights(killed / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(d / "last.pt", weights_only=True)["optimizer"]["state"] for d in (full.run_dir, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[i]["momentum_buffer"], b[i]["momentum_buffer"]) for i in a)
    assert mlflow_statuses() == ["FINISHED", "FINISHED"]  # the killed run was resumed, not left RUNNING
    assert [p for p in run_dirs(project)] == [killed]
    assert not list(project.glob("**/.*.tmp"))  # no temporary file left by the kill


def test_restart_marks_the_stopped_run_killed_and_trains_afresh(project, capsys):
    killed = killed_mid_run(project, "train", *LONG)
    capsys.readouterr()
    assert main(["train", "--config", str(project / "params.yaml"), *LONG, "--restart"]) == 0
    assert f"stopped run {killed.name} is not resumed (--restart); marked KILLED" in capsys.readouterr().err
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "KILLED" and info["superseded"]
    assert len(run_dirs(project)) == 2 and mlflow_statuses() == ["FINISHED", "KILLED"]
    (again,) = train(project / "params.yaml", LONG)  # the superseded run is neither resumed nor reported again
    assert again.reused and "not resumed" not in capsys.readouterr().err


def test_a_killed_dvc_stage_leaves_no_running_mlflow_run(project):
    """DVC removes a stage's outs before it runs it again, so the rerun trains afresh; the killed
    run's MLflow run is found by stage key and owner and ended KILLED."""
    out = project / "models" / "stage1-1"
    killed = killed_mid_run(project, "stage", "stage1:1", "--run-dir", str(out), *LONG)
    assert killed == out and mlflow_statuses() == ["RUNNING"]
    shutil.rmtree(out)
    assert main(["stage", "stage1:1", "--run-dir", str(out), "--config", str(project / "params.yaml"), *LONG]) == 0
    assert mlflow_statuses() == ["FINISHED", "KILLED"]


def test_a_killed_fixed_run_dir_is_resumed_in_place(project):
    out = project / "models" / "stage1-1"
    killed_mid_run(project, "stage", "stage1:1", "--run-dir", str(out), *LONG)
    assert main(["stage", "stage1:1", "--run-dir", str(out), "--config", str(project / "params.yaml"), *LONG]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "FINISHED" and mlflow_statuses() == ["FINISHED"]


def test_resume_summary_and_ctrl_c_message(project, monkeypatch, capsys):
    interrupt_at_validation(monkeypatch, 2)
    assert main(["train", "--config", str(project / "params.yaml")]) == 130
    (killed,) = run_dirs(project)
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (f"ltrepro: interrupted; ce/stage1 stopped; {killed}/last.pt keeps its last finished epoch: run the "
                   f"same command again to resume it (--restart for a fresh run)")  # fmt: skip
    assert main(["train", "--resume", str(killed)]) == 0
    out = capsys.readouterr().out
    assert "stage1: finished" in out and "reused" not in out


def test_a_still_running_run_is_not_resumed_on_request(project, capsys):
    from ltrepro.runs import process_owner

    result = stopped_run(project)
    info = json.loads((result.run_dir / "run.json").read_text())
    (result.run_dir / "run.json").write_text(json.dumps({**info, "status": "RUNNING", "owner": process_owner()}))
    assert main(["train", "--resume", str(result.run_dir)]) == 2
    assert "still being trained by process" in capsys.readouterr().err


def test_a_torn_run_json_never_blocks_the_folder(project, capsys):
    (project / "runs" / "torn").mkdir(parents=True)
    (project / "runs" / "torn" / "run.json").write_text('{"mlflow_run_id": "ab')
    assert main(["train", "--config", str(project / "params.yaml"), "stage1.epochs=1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "torn/run.json" in line] == [err[0]] and "treating that run as dead" in err[0]


def test_malicious_pickle_is_refused_through_evaluate_and_resume(project, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    result = stopped_run(project)
    for name in ("best.pt", "last.pt"):
        torch.save({"format": "ltrepro-checkpoint/1", "model": Exploit()}, result.run_dir / name)
    info = json.loads((result.run_dir / "run.json").read_text())
    (result.run_dir / "run.json").write_text(json.dumps({**info, "status": "FINISHED"}))
    capsys.readouterr()
    assert main(["evaluate", str(result.run_dir)]) == 2
    assert "safe loading refuses" in capsys.readouterr().err
    (result.run_dir / "run.json").write_text(json.dumps({**info, "status": "KILLED"}))
    assert main(["train", "--resume", str(result.run_dir)]) == 2
    assert "safe loading refuses" in capsys.readouterr().err
    assert not marker.exists()


def test_weights_that_turn_nan_are_never_checkpointed(project, monkeypatch):
    """A finite loss whose last step leaves NaN weights (a huge lr): the epoch is refused before
    anything of it is saved, and the run ends FAILED in run.json and MLflow."""
    real_step = engine.run_epoch

    def nan_after_second_epoch(plan, *args):
        result = real_step(plan, *args)
        if args[3] == 1:
            with torch.no_grad():
                next(plan.model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(engine, "run_epoch", nan_after_second_epoch)
    with pytest.raises(LtreproError, match="epoch 2 left NaN or infinite values in 1 weight tensors"):
        train(project / "params.yaml", [])
    (failed,) = run_dirs(project)
    assert torch.load(failed / "last.pt", weights_only=True)["epoch"] == 0  # epoch 1's, not epoch 2's
    assert all(torch.isfinite(t).all() for t in weights(failed / "best.pt").values() if t.is_floating_point())
    info = json.loads((failed / "run.json").read_text())
    assert info["status"] == "FAILED" and "NaN" in info["error"] and mlflow_statuses() == ["FAILED"]


def test_a_resume_under_mlflow_run_logs_into_the_run_it_opened(project, monkeypatch):
    """`mlflow run -e stage1` opens an MLflow run and hands its id to ltrepro: a resumed stage logs
    there (the killed run's history copied in) and the killed run ends KILLED."""
    import mlflow

    from ltrepro.tracking import open_store

    killed = killed_mid_run(project, "train", *LONG)
    old_id = json.loads((killed / "run.json").read_text())["mlflow_run_id"]
    open_store(project, "ltrepro")
    client = mlflow.MlflowClient()
    opened = client.create_run(client.get_experiment_by_name("ltrepro").experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", opened)
    assert main(["stage", "stage1", "--config", str(project / "params.yaml"), *LONG]) == 0
    assert json.loads((killed / "run.json").read_text())["mlflow_run_id"] == opened
    assert [m.step for m in client.get_metric_history(opened, "val_acc")] == list(range(LONG_EPOCHS))
    run = client.get_run(opened)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_run_id"] == old_id
    assert client.get_run(old_id).info.status == "KILLED" and run.data.params["stage1.epochs"] == str(LONG_EPOCHS)


def test_the_audit_reads_test_every_epoch_apart_and_changes_no_training_selection_or_tuning_input(project, capsys):
    import mlflow

    from ltrepro.config import load_config
    from ltrepro.context import resolve
    from ltrepro.scoring import AUDIT_METRIC

    plain = train(project / "params.yaml", ["stage1.epochs=3"])[0]
    seen = []  # what the epoch hook, the one tuning reports from, is handed
    cfg = resolve(load_config(project / "params.yaml", ["stage1.epochs=3", "audit.test_every_epoch=true"]))
    audited = runner.run_method(cfg, project, on_epoch=lambda stage, metrics, epoch: seen.extend(metrics))[0]
    assert not audited.reused and audited.run_dir != plain.run_dir  # an audited run is a run of its own
    trained = [torch.load(r.run_dir / "best.pt", weights_only=True)["model"] for r in (plain, audited)]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])  # reading test changed no weight
    assert json.dumps(audited.metrics, sort_keys=True) == json.dumps(plain.metrics, sort_keys=True)  # nor selection or the test read
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(audited.run_id, AUDIT_METRIC)
    assert [m.step for m in curve] == [0, 1, 2]
    assert curve[int(audited.metrics["selected_epoch"])].value == pytest.approx(audited.metrics["test_top1"])
    assert seen and not any(name.startswith("audit") for name in seen)
    assert client.get_metric_history(plain.run_id, AUDIT_METRIC) == []
    # report --optimism reads the audited run: selected, best on test, best - selected, last, last - selected
    from ltrepro.report import optimism_figures

    capsys.readouterr()
    assert main(["report", "--config", str(project / "params.yaml"), "stage1.epochs=3", "--methods", "ce", "--seeds", "0", "--optimism"]) == 0
    figures = optimism_figures(audited.metrics["test_top1"], [m.value for m in curve])
    assert "| ce | 0 | " + " | ".join(f"{v:.2f}" for v in figures) + " |" in capsys.readouterr().out
