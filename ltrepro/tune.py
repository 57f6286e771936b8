"""Optuna studies over a method's declared tunables (``ltrepro tune``, the ``tune:`` block).

Search space: the ``Tunable``s a method declares next to its code (FFN's ``ffn.lam``, H2T's
``h2t.rho``, CE+FCC's ``stage1.fcc``), optionally narrowed by ``tune.space``. The objective is the
final stage's validation balanced top-1 at its selected epoch; the test set is never read for it.
Every epoch of the final stage reports its validation value, so a median (or Hyperband) pruner can
stop bad trials. Stages a trial's values do not change (FFN's two stage-1 backbones when only
``lam`` moves) are reused by stage key, so a trial costs one stage 2.

MLflow: one parent run per study (tag ``optuna_study``), each trial a nested run with its params,
intermediate values, final value and state, and the trial's stage runs nested under it. A pruned
trial ends KILLED, a crashed or interrupted one FAILED (FAIL in Optuna); the study goes on after a
crash. Storage is any RDB URL: sqlite by default, a PostgreSQL URL unchanged for workers on several
machines (``--resume`` joins a study).

Resuming and joining: trial n draws its values from seed (``tune.sampler_seed``, n), and trial
numbers are unique in a study, so a resumed or added worker continues the search instead of
replaying its first trials. A trial left RUNNING by a dead worker is failed when a worker opens
the study (at once on the same machine, by its owner process; after Optuna's heartbeat grace
period on another one), so it is counted and shown as FAILED.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
import yaml

from ltrepro.config import Config, flatten, load_config, unflatten, with_overrides
from ltrepro.errors import LtreproError, RunStopped, first_line
from ltrepro.methods import Method, Tunable
from ltrepro.tracking import Tracker, end_runs, open_store, sqlite_lock
from ltrepro.context import get_method, resolve
from ltrepro.runner import inert_settings, plan_method, run_method
from ltrepro.runs import owner_alive, process_owner

FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 3  # a crashed trial does not end the study; three in a row mean a real bug
HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 180  # a trial silent for the grace period is failed (any machine)


class StopAfterFailures:
    """Stops this worker after ``limit`` failed trials in a row, naming the last error."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.in_a_row = self.in_a_row + 1 if trial.state == optuna.trial.TrialState.FAIL else 0
        if self.in_a_row >= self.limit:
            print(f"study {study.study_name}: {self.limit} trials failed in a row; stopping (see the errors above)")
            study.stop()


class TrialPruned(RunStopped, optuna.TrialPruned):
    """Optuna's pruning signal, which also ends the stage's MLflow run as KILLED."""


class TrialInterrupted(Exception):
    """Ctrl-C during a trial: Optuna records it FAIL (as its MLflow run), and the study stops after it."""


class QuietInterruptedTrial(logging.Filter):
    """Drops Optuna's traceback of an interrupted trial; ``tune`` says what happened in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], TrialInterrupted))


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose random draws for trial n come from seed (``seed``, n). One seed per worker start
    would replay the same draws on every resume and in every added worker; trial numbers are unique
    across workers (the storage hands them out), so this continues the search instead."""

    def __init__(self, seed: int) -> None:
        self.seed, self.number, self.tpe = seed, None, None

    def for_trial(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.TPESampler:
        if trial.number != self.number:
            derived = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            self.number, self.tpe = trial.number, optuna.samplers.TPESampler(seed=derived)
        return self.tpe

    def infer_relative_search_space(self, study, trial):
        return self.for_trial(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.for_trial(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.for_trial(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.for_trial(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.for_trial(trial).after_trial(study, trial, state, values)


def search_space(cfg: Config, method: Method) -> list[Tunable]:
    """The method's tunables, narrowed by ``tune.space``; each range checked against the config."""
    declared = {tunable.key: tunable for tunable in method.tunables}
    if not declared:
        raise LtreproError(f"method {method.name!r} declares no tunable parameters; `ltrepro methods` lists them")
    for key, bounds in flatten(cfg.tune.space).items():  # {ffn: {lam: [a, b]}} or {"ffn.lam": [a, b]}
        if key not in declared:
            raise LtreproError(f"tune.space.{key}: {method.name} does not tune it; its tunables: {', '.join(declared)}")
        numbers = isinstance(bounds, list) and len(bounds) == 2
        if not numbers or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
            raise LtreproError(f"tune.space.{key}: expected [low, high], two numbers; got {bounds!r}")
        tunable = declared[key]
        number = int if tunable.integer else float
        low, high = number(bounds[0]), number(bounds[1])
        if not low < high:
            raise LtreproError(f"tune.space.{key}: the range [{low}, {high}] is empty; low must be below high")
        if low < tunable.low or high > tunable.high:
            raise LtreproError(f"tune.space.{key}: [{low}, {high}] leaves {method.name}'s range [{tunable.low}, {tunable.high}]")
        declared[key] = dataclasses.replace(tunable, low=low, high=high)
    for tunable in declared.values():
        for bound in (tunable.low, tunable.high):
            with_overrides(cfg, unflatten({tunable.key: bound}))  # a bound the config rejects fails now
    at_high = with_overrides(cfg, unflatten({t.key: t.high for t in declared.values()}))  # every tunable switched on
    for message, keys in inert_settings(at_high):
        tuned = sorted(set(keys) & set(declared))
        if tuned:
            raise LtreproError(f"tune: {message}, so {tuned[0]} cannot act and every trial would score the same")
    return list(declared.values())


def suggest(trial: optuna.Trial, tunable: Tunable) -> float | int:
    if tunable.integer:
        return trial.suggest_int(tunable.key, int(tunable.low), int(tunable.high), log=tunable.log)
    return trial.suggest_float(tunable.key, tunable.low, tunable.high, log=tunable.log)


def storage_url(cfg: Config, root: Path) -> str:
    return cfg.tune.storage or f"sqlite:///{(root / 'optuna.db').resolve()}"


def fail_trial_runs(root: Path, trials: list[optuna.trial.FrozenTrial]) -> None:
    """End the MLflow runs of trials that Optuna now holds as FAIL, FAILED too."""
    end_runs(root, [t.user_attrs["mlflow_run_id"] for t in trials if "mlflow_run_id" in t.user_attrs], "FAILED")


def end_stale_trial_run(root: Path):
    """Optuna's callback for a trial it failed for a missing heartbeat (its worker died, possibly on
    another machine): the trial's MLflow run ends FAILED too, instead of staying RUNNING."""
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        print(f"study {study.study_name}: trial {trial.number} sent no heartbeat for {GRACE_SECONDS} s; marked FAIL")
        fail_trial_runs(root, [trial])

    return callback


def open_storage(url: str, root: Path | None = None, attempts: int = 3) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``, reached now so that a bad URL fails before any trial. Workers
    starting together on a new database race to create its tables, so a failure is retried. With
    the project ``root``, a trial failed by the heartbeat check also ends its MLflow run."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers wait for the lock
    stale = end_stale_trial_run(root) if root is not None else None
    for attempt in range(attempts):
        try:
            with sqlite_lock(url):  # the first worker creates the tables while the others wait
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                    heartbeat_stale_trial_callback=stale,
                )  # fmt: skip
        except Exception as exc:  # SQLAlchemy and drivers raise many types (bad URL, no server, no driver)
            if attempt + 1 < attempts and not isinstance(exc, (ImportError, ValueError)):
                time.sleep(1.0 + attempt)
                continue
            raise LtreproError(f"tune.storage {url!r}: cannot open the study storage ({first_line(exc)})") from None
    raise AssertionError("unreachable")


def make_pruner(cfg: Config, final_epochs: int) -> optuna.pruners.BasePruner:
    """The study's pruner; none for a post-hoc final stage (0 epochs: one report, nothing to stop)."""
    tune = cfg.tune
    if final_epochs == 0:
        return optuna.pruners.NopPruner()
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.warmup_epochs), max_resource=final_epochs)
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, root: Path, name: str, url: str, final_epochs: int, resume: bool) -> optuna.Study:
    sampler = TrialSeededSampler(cfg.seed if cfg.tune.sampler_seed is None else cfg.tune.sampler_seed)
    storage = open_storage(url, root)
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", sampler=sampler,
            pruner=make_pruner(cfg, final_epochs), load_if_exists=resume,
        )  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:
        raise LtreproError(f"study {name!r} already exists in {url}; continue it with --resume, or set tune.study") from None
    method = study.user_attrs.get("method")
    if method not in (None, cfg.method):
        raise LtreproError(f"study {name!r} tunes method {method!r}, not {cfg.method!r}; set tune.study to a new name")
    study.set_user_attr("method", cfg.method)
    study.set_user_attr("dataset", cfg.data.name)
    return study


def fail_dead_trials(study: optuna.Study, root: Path) -> list[int]:
    """Fail the RUNNING trials whose worker process on this machine is gone, in Optuna and MLflow."""
    dead = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if owner_alive(t.user_attrs.get("owner")) is False]  # fmt: skip
    for trial in dead:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        print(f"study {study.study_name}: trial {trial.number} was left RUNNING by a dead worker; marked FAIL")
    fail_trial_runs(root, dead)
    return [trial.number for trial in dead]


def study_run_id(cfg: Config, root: Path, name: str) -> str | None:
    """The study's parent MLflow run, so a resumed study logs into the same one."""
    import mlflow

    open_store(root)
    runs = mlflow.search_runs(
        experiment_names=[cfg.experiment], filter_string=f"tags.optuna_study = '{name}' and tags.optuna_role = 'study'",
        output_format="list", max_results=1,
    )  # fmt: skip
    return runs[0].info.run_id if runs else None


@contextmanager
def quiet_interrupted_trials() -> Iterator[None]:
    quiet = QuietInterruptedTrial()
    logger = logging.getLogger("optuna.study._optimize")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class Interrupt:
    """Ctrl-C as a request, acted on at the next epoch or trial boundary. Python's default handler
    raises KeyboardInterrupt wherever the main thread is, and inside a finaliser (a database
    cursor, a temporary file) that exception is printed and dropped, so the study ran on."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return

        def request(signum, frame) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

        previous = signal.signal(signal.SIGINT, request)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def make_objective(cfg: Config, root: Path, space: list[Tunable], study_name: str, interrupt: Interrupt):
    final_stage = plan_method(cfg)[-1][0].name

    def objective(trial: optuna.Trial) -> float:
        import mlflow

        values = {t.key: suggest(trial, t) for t in space}
        trial_cfg = with_overrides(cfg, unflatten(values))
        run = Tracker(root, cfg.experiment, f"{study_name}-trial-{trial.number}")
        trial.set_user_attr("owner", process_owner())
        trial.set_user_attr("mlflow_run_id", run.run_id)
        run.set_tags({"optuna_study": study_name, "optuna_trial": str(trial.number), "optuna_role": "trial"})
        run.log_params(values)
        client = mlflow.MlflowClient()

        def report(stage: str, metrics: dict, epoch: int) -> None:
            interrupt.check()
            if stage != final_stage:
                return
            trial.report(metrics["val_acc"], epoch)
            client.log_metric(run.run_id, "intermediate_val_balanced_top1", metrics["val_acc"], step=epoch)
            if trial.should_prune():
                raise TrialPruned(f"trial {trial.number} pruned after epoch {epoch + 1}")

        try:
            results = run_method(trial_cfg, root, report)
        except TrialPruned:
            client.set_tag(run.run_id, "optuna_state", "PRUNED")
            run.end("KILLED")
            raise
        except KeyboardInterrupt:
            client.set_tag(run.run_id, "optuna_state", "FAIL")
            run.end("FAILED")
            interrupt.requested = True  # the study stops after Optuna has recorded this trial
            raise TrialInterrupted(f"trial {trial.number} interrupted") from None
        except BaseException:
            client.set_tag(run.run_id, "optuna_state", "FAIL")
            run.end("FAILED")
            raise
        final = results[-1]
        value = final.metrics["val_top1"]
        trial.set_user_attr("final_run_id", final.run_id)
        trial.set_user_attr("final_run_dir", str(final.run_dir))
        run.log_metrics({"value": value})
        run.set_tags({"optuna_state": "COMPLETE", "final_run_id": final.run_id})
        run.end()
        return value

    return objective


def tune(config_paths: list[Path] | None, overrides: list[str], root: Path, resume: bool = False) -> dict:
    """Run (or continue) the study until it holds ``tune.trials`` complete or pruned trials."""
    cfg = resolve(load_config(config_paths, overrides))
    method = get_method(cfg.method)
    space = search_space(cfg, method)
    name = cfg.tune.study or f"{cfg.method}-{cfg.data.name}"
    url = storage_url(cfg, root)
    plan = plan_method(cfg)
    study = open_study(cfg, root, name, url, getattr(plan[-1][1], plan[-1][0].section).epochs, resume)
    parent = Tracker(root, cfg.experiment, f"study-{name}", study_run_id(cfg, root, name) if resume else None)
    parent.set_tags({"optuna_study": name, "optuna_role": "study", "optuna_storage": url, "method": cfg.method})
    parent.log_params({"study": name, "method": cfg.method, "trials": cfg.tune.trials, "pruner": cfg.tune.pruner,
                       **{f"space.{t.key}": f"[{t.low}, {t.high}]{' log' if t.log else ''}" for t in space}})  # fmt: skip
    fail_dead_trials(study, root)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
    start, interrupt = time.perf_counter(), Interrupt()
    try:
        if finished < cfg.tune.trials:  # runs until the study holds tune.trials finished trials
            with interrupt.installed(), quiet_interrupted_trials():
                study.optimize(
                    make_objective(cfg, root, space, name, interrupt), catch=(Exception,),
                    callbacks=[optuna.study.MaxTrialsCallback(cfg.tune.trials, states=FINISHED_STATES),
                               StopAfterFailures(MAX_FAILURES_IN_A_ROW), lambda study, trial: interrupt.check()],
                )  # fmt: skip
    except KeyboardInterrupt:
        parent.end("KILLED")
        raise KeyboardInterrupt(f"study {name!r} interrupted; its finished trials are kept in {url}; continue with --resume")
    summary = summarize_study(study, cfg, root, name, parent, time.perf_counter() - start)
    parent.end()
    return summary


def summarize_study(study: optuna.Study, cfg: Config, root: Path, name: str, parent: Tracker, seconds: float) -> dict:
    """Counts, the best trial, the best-params file and Optuna's plots, logged to the study run."""
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in optuna.trial.TrialState}
    summary = {"study": name, "wall_seconds": round(seconds, 1), **{k: v for k, v in counts.items() if v}}
    parent.log_metrics({f"trials_{k}": v for k, v in counts.items()} | {"wall_seconds": seconds})
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        print(f"study {name}: no trial completed yet ({counts})")
        return summary
    if len(completed) > 1 and len({trial.value for trial in completed}) == 1:
        summary["warning"] = (f"all {len(completed)} completed trials scored {completed[0].value:.2f}: the tuned values "
                              f"did not change the result (does the schedule let them act?)")  # fmt: skip
        print(f"study {name}: warning: {summary['warning']}")
    best = study.best_trial
    best_file = write_best(cfg, root, name, best)
    parent.log_metrics({"best_value": best.value})
    parent.set_tags({"best_trial": str(best.number), "best_run_id": best.user_attrs.get("final_run_id", "")})
    parent.log_artifact(best_file)
    with tempfile.TemporaryDirectory() as folder:
        for path in study_plots(study, Path(folder)):
            parent.log_artifact(path, "plots")
    summary.update(best_value=best.value, best_trial=best.number, best_params=best.params, best_file=str(best_file),
                   best_run_id=best.user_attrs.get("final_run_id"))  # fmt: skip
    print(f"study {name}: best validation balanced top-1 {best.value:.2f} (trial {best.number}) with {best.params}; "
          f"written to {best_file}")  # fmt: skip
    return summary


def write_best(cfg: Config, root: Path, name: str, best: optuna.trial.FrozenTrial) -> Path:
    """The best params as a config layer: ``ltrepro train --config params.yaml --config <it>``."""
    values = {"method": cfg.method, **unflatten({key: round(value, 6) for key, value in best.params.items()})}
    path = root / cfg.tune.best_dir / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Best trial {best.number} of Optuna study {name!r}: validation balanced top-1 {best.value:.2f}.\n"
        f"# Written by `ltrepro tune`; use as `ltrepro train --config params.yaml --config {path.relative_to(root)}`.\n"
    )
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return path


def study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history and parameter importances (the latter needs two completed trials)."""
    import warnings

    from optuna.visualization import matplotlib as plots

    written = []
    for name, draw in (("optimization_history", plots.plot_optimization_history), ("param_importances", plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
                axes = draw(study)
        except (ValueError, RuntimeError) as exc:
            print(f"plot {name} skipped: {exc}")
            continue
        path = folder / f"{name}.png"
        axes.figure.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    return written


def best_trial_run(cfg: Config, name: str, root: Path) -> str:
    """The final stage run of a study's best trial: its local directory, or ``runs:/<id>``."""
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage_url(cfg, root)))
        best = study.best_trial
    except KeyError:
        raise LtreproError(f"no study {name!r} in {storage_url(cfg, root)}") from None
    except ValueError:
        raise LtreproError(f"study {name!r} has no completed trial yet") from None
    run_dir = Path(best.user_attrs.get("final_run_dir", ""))
    return str(run_dir) if (run_dir / "best.pt").is_file() else f"runs:/{best.user_attrs['final_run_id']}"
