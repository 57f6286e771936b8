"""ltrepro tune: studies on the tiny project, nested MLflow runs, pruning, resume, workers, bad input."""
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest

from ltrepro import tune as tune_module
from ltrepro.cli import main
from ltrepro.config import load_config
from ltrepro.errors import LtreproError
from ltrepro.methods import METHODS
from ltrepro.runner import train
from ltrepro.tune import search_space, tune

FAST = ["method=ffn", "stage1.epochs=2", "stage2.epochs=3", "stage2.batch_size=16", "ffn.kps_params={ga_epoch: 1}"]


class PruneTrials(optuna.pruners.BasePruner):
    """Prunes the given trial numbers at their second epoch: pruning without depending on luck."""

    def __init__(self, numbers: set[int]) -> None:
        self.numbers = numbers

    def prune(self, study, trial) -> bool:
        return trial.number in self.numbers and trial.last_step is not None and trial.last_step >= 1


def study_runs(name: str):
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.optuna_study = '{name}'", output_format="list")
    parents = [r for r in runs if r.data.tags["optuna_role"] == "study"]
    trials = {int(r.data.tags["optuna_trial"]): r for r in runs if r.data.tags["optuna_role"] == "trial"}
    return parents, trials


def test_study_prunes_nests_runs_writes_best_and_resumes(project, monkeypatch):
    monkeypatch.setattr(tune_module, "make_pruner", lambda cfg, epochs: PruneTrials({2, 4}))
    params = project / "params.yaml"
    summary = tune([params], [*FAST, "tune.trials=6", "tune.study=lam"], project)
    assert summary["complete"] == 4 and summary["pruned"] == 2

    study = optuna.load_study(study_name="lam", storage=f"sqlite:///{project / 'optuna.db'}")
    states = {t.number: t.state for t in study.trials}
    assert states[2] == states[4] == optuna.trial.TrialState.PRUNED
    assert all(0.0 <= t.params["ffn.lam"] <= 1.0 for t in study.trials)
    assert len(study.trials[2].intermediate_values) == 2  # reported every epoch until pruned

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (parent,), trials = study_runs("lam")
    assert sorted(trials) == list(range(6))
    for number, run in trials.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == ("KILLED" if number in (2, 4) else "FINISHED")
        assert float(run.data.params["ffn.lam"]) == pytest.approx(study.trials[number].params["ffn.lam"])
    for number in (0, 1, 3, 5):
        assert trials[number].data.metrics["value"] == pytest.approx(study.trials[number].value)
    # The stage runs of a trial nest under it; stage 1 is trained once (trial 0) and reused after.
    stage1 = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'stage1_ce'", output_format="list")
    assert len(stage1) == 1 and stage1[0].data.tags["mlflow.parentRunId"] == trials[0].info.run_id
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"lam.yaml", "plots"} <= artifacts
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots

    best_file = project / "tuned" / "lam.yaml"
    tuned = load_config([params, best_file])
    assert tuned.method == "ffn" and tuned.ffn.lam == pytest.approx(study.best_params["ffn.lam"], abs=1e-6)

    resumed = tune([params], [*FAST, "tune.trials=8", "tune.study=lam"], project, resume=True)
    assert resumed["complete"] + resumed["pruned"] == 8
    study = optuna.load_study(study_name="lam", storage=f"sqlite:///{project / 'optuna.db'}")
    assert [t.number for t in study.trials] == list(range(8))
    parents, trials = study_runs("lam")
    assert len(parents) == 1 and sorted(trials) == list(range(8))  # the same study run goes on


def test_existing_study_needs_resume(project, monkeypatch):
    monkeypatch.setattr(tune_module, "run_method", lambda cfg, root, hook: pytest.fail("no trial may run"))
    storage = optuna.storages.RDBStorage(f"sqlite:///{project / 'optuna.db'}")
    optuna.create_study(study_name="taken", storage=storage)
    with pytest.raises(LtreproError, match="already exists.*--resume"):
        tune([project / "params.yaml"], [*FAST, "tune.study=taken"], project)


def test_crashed_trial_does_not_end_the_study(project, monkeypatch):
    real = tune_module.run_method
    calls = []

    def flaky(cfg, root, hook):
        calls.append(cfg.ffn.lam)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(cfg, root, hook)

    monkeypatch.setattr(tune_module, "run_method", flaky)
    summary = tune([project / "params.yaml"], [*FAST, "tune.trials=3", "tune.pruner=none"], project)
    assert summary["fail"] == 1 and summary["complete"] == 3 and len(calls) == 4
    _, trials = study_runs("ffn-fmnist_lt")
    assert trials[1].info.status == "FAILED"


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.space.ffn.lam=[0.9, 0.2]", "tune.space.ffn.lam: the range [0.9, 0.2] is empty"),
        ("tune.space.ffn.lam=abc", "tune.space.ffn.lam: expected [low, high], two numbers; got 'abc'"),
        ("tune.space.ffn.lam=[0, true]", "expected [low, high], two numbers"),
        ("tune.space.ffn.lam=[0.5, 1.5]", "leaves ffn's range [0.0, 1.0]"),
        ("tune.space.h2t.rho=[0.1, 0.2]", "tune.space.h2t.rho: ffn does not tune it; its tunables: ffn.lam"),
        ("tune.storage=sqlite:////nonexistent/dir/optuna.db", "tune.storage 'sqlite:////nonexistent/dir/optuna.db': cannot open"),
        ("tune.storage=postgresql://nobody@127.0.0.1:9/none", "tune.storage 'postgresql://nobody@127.0.0.1:9/none': cannot open"),
        ("tune.pruner=sometimes", "tune.pruner: got 'sometimes', expected one of 'median', 'hyperband', 'none'"),
    ],
)
def test_bad_search_space_or_storage_is_one_line(project, capsys, override, message):
    assert main(["tune", "--config", str(project / "params.yaml"), *FAST, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltrepro: error:") and message in err and "\n" not in err
    assert not (project / "runs").exists()  # nothing trained


def test_method_without_tunables_is_refused(project, capsys):
    assert main(["tune", "--config", str(project / "params.yaml"), "method=crt"]) == 2
    assert "method 'crt' declares no tunable parameters" in capsys.readouterr().err


def test_every_declared_tunable_is_a_valid_config_key(project):
    for name in METHODS.names():
        method = METHODS.get(name)
        if method.tunables:
            sam = ["stage1.update=sam"] if any(t.key.startswith("stage1.sam.") for t in method.tunables) else []
            cfg = load_config(project / "params.yaml", [f"method={name}", *sam])  # the tiny project has no recipes
            assert [t.key for t in search_space(cfg, method)] == [t.key for t in method.tunables]


def tune_command(project, *extra):
    code = "import sys; from ltrepro.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "tune", "--config", str(project / "params.yaml"), *FAST, *extra]
    return subprocess.Popen(args, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_ctrl_c_keeps_finished_trials(project):
    train(project / "params.yaml", FAST)
    worker = tune_command(project, "tune.trials=50", "tune.study=interrupted", "tune.pruner=none")
    storage = f"sqlite:///{project / 'optuna.db'}"
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(1)
        try:
            study = optuna.load_study(study_name="interrupted", storage=storage)
        except KeyError:
            continue
        if len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) >= 1:
            break
    worker.send_signal(signal.SIGINT)
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130, output
    assert "study 'interrupted' interrupted; its finished trials are kept" in output
    study = optuna.load_study(study_name="interrupted", storage=storage)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) >= 1
    assert "Traceback" not in output  # Optuna's traceback of the interrupted trial is not shown
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (parent,), trials = study_runs("interrupted")
    assert parent.info.status == "KILLED"
    same = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}  # one state in Optuna and MLflow
    assert {n: same[t.state.name] for n, t in enumerate(study.trials)} == {n: r.info.status for n, r in trials.items()}


def test_a_resumed_study_continues_the_search_and_fails_the_dead_trial(project):
    from tests.test_runs import dead_owner

    params, fast = project / "params.yaml", [*FAST, "tune.pruner=none", "tune.study=resumed"]
    tune([params], [*fast, "tune.trials=2"], project)
    storage = f"sqlite:///{project / 'optuna.db'}"
    stale = optuna.load_study(study_name="resumed", storage=storage).ask()  # left RUNNING by a killed worker
    stale.set_user_attr("owner", dead_owner())
    summary = tune([params], [*fast, "tune.trials=4"], project, resume=True)
    study = optuna.load_study(study_name="resumed", storage=storage)
    assert study.trials[stale.number].state == optuna.trial.TrialState.FAIL and summary["fail"] == 1
    values = [t.params["ffn.lam"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(values) == 4 and len(set(values)) == 4  # no trial replays an earlier one


def test_the_sampler_is_reproducible_per_trial_number():
    def draws(sampler_seed, trials):
        study = optuna.create_study(sampler=tune_module.TrialSeededSampler(sampler_seed))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)
        return [t.params["x"] for t in study.trials]

    assert draws(0, 3) == draws(0, 3) and draws(0, 3) != draws(1, 3)
    assert len(set(draws(0, 6))) == 6


def test_a_tunable_that_cannot_act_is_refused_before_any_trial(project, capsys):
    late = ["method=ce_fcc", "stage1.epochs=4", "stage1.fcc_start_epoch=15"]
    assert main(["tune", "--config", str(project / "params.yaml"), *late]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ltrepro: error: tune: stage1: FCC never switches on (stage1.fcc_start_epoch 15, stage1.epochs is 4), "
                   "so stage1.fcc cannot act and every trial would score the same")  # fmt: skip
    assert not (project / "runs").exists()


def test_a_study_whose_trials_all_score_the_same_says_so(project, monkeypatch):
    from ltrepro.runs import RunResult

    flat = [RunResult("0" * 32, project, "stage2", {"val_top1": 50.0}, "")]
    monkeypatch.setattr(tune_module, "run_method", lambda cfg, root, hook: flat)
    summary = tune([project / "params.yaml"], [*FAST, "tune.trials=3"], project)
    assert summary["warning"].startswith("all 3 completed trials scored 50.00")


# (method, overrides, {tuned key: (low, high, integer)}): the ranges the methods declare, the paper's.
STUDIES = [
    ("fsgl", ["stage1.epochs=2", "stage1.update=sam", "stage1.fcc=0.5"],
     {"stage1.fcc": (0.05, 2.0, False), "stage1.sam.rho": (0.01, 0.5, False), "fsgl.contrast_weight": (0.5, 10.0, False)}),
    ("bns_ipdpp", ["stage1.epochs=1", "stage1.batch_size=16", "probe.epochs=1", "stage2.epochs=2", "stage2.batch_size=16"],
     {"ipdpp.k": (20, 400, True), "ipdpp.every": (1, 5, True)}),
]  # fmt: skip


@pytest.mark.parametrize("method, overrides, space", STUDIES, ids=[s[0] for s in STUDIES])
def test_six_trial_study_suggests_in_range_typed_values_and_reuses_unchanged_stages(project, method, overrides, space):
    from pathlib import Path

    import yaml

    fast = [f"method={method}", "data.n_max=10", *overrides, "tune.trials=6", "tune.pruner=none"]
    summary = tune([project / "params.yaml"], fast, project)
    assert summary["complete"] == 6 and "fail" not in summary, summary
    study = optuna.load_study(study_name=f"{method}-fmnist_lt", storage=f"sqlite:///{project / 'optuna.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == len(study.trials) == 6
    declared = {t.key: t for t in METHODS.get(method).tunables}
    assert set(declared) == set(space)
    for trial in trials:
        assert set(trial.params) == set(space)
        config = yaml.safe_load((Path(trial.user_attrs["final_run_dir"]) / "method_config.yaml").read_text())
        for key, (low, high, integer) in space.items():
            value, distribution = trial.params[key], trial.distributions[key]
            assert low <= value <= high and (declared[key].low, declared[key].high) == (low, high), (key, value)
            if integer:
                assert type(value) is int, (key, value)
                assert isinstance(distribution, optuna.distributions.IntDistribution), (key, distribution)
            else:
                assert isinstance(value, float) and isinstance(distribution, optuna.distributions.FloatDistribution)
            assert (distribution.low, distribution.high, distribution.log) == (low, high, declared[key].log)
            block, _, name = key.partition(".")
            ran = config[block]
            for part in name.split("."):
                ran = ran[part]
            assert ran == value and type(ran) is type(value), (key, ran, value)  # what the trial's run was trained with

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])

    def stage_runs(stage: str) -> int:
        found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                   filter_string=f"tags.method = '{method}' and tags.stage = '{stage}'")  # fmt: skip
        dirs = [d for d in (project / "runs").iterdir() if f"{method}-{stage}-" in d.name]
        assert len(found) == len(dirs), stage
        return len(found)

    combinations = len({tuple(sorted(t.params.items())) for t in trials})
    stages = [s.name for s in METHODS.get(method).stages]
    assert stage_runs(stages[-1]) == combinations  # the stage the tuned values change: one run per distinct trial
    for stage in stages[:-1]:  # bns_ipdpp's pre-training and probe: trained by trial 0, reused after
        assert stage_runs(stage) == 1
