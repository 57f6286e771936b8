"""The MLproject ``main`` entry point: prepare, each stage of the method, evaluate, export.

Every step is an MLflow project run (``mlflow.projects.run(..., env_manager="local")``) nested
under the main run. A step is reused, not run, when a FINISHED run carries the same signature:
its entry point, what determines its result (the data config for ``prepare``; the stage key, i.e.
its config block and its inputs' keys, for a stage; the input run for ``evaluate`` / ``export``),
the git commit and the data hash. So a stage-2 sweep (``-P ffn.lam=0.7``) never retrains stage 1.
Stage 2 receives its stage-1 checkpoints as ``runs:/<run id>`` artifact URIs and tags their ids.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ltrepro.config import load_config, to_dict
from ltrepro.data import data_hash, load_data
from ltrepro.errors import LtreproError
from ltrepro.tracking import Tracker, git_commit, tracking_uri
from ltrepro.context import resolve
from ltrepro.runner import check_method, plan_method

SIGNATURE_TAG = "ltrepro_signature"


def signature(entry_point: str, determinant, commit: str, data_digest: str) -> str:
    payload = json.dumps([entry_point, determinant, commit, data_digest], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class Steps:
    """Runs or reuses the steps of one ``main`` run."""

    def __init__(self, root: Path, config: str, overrides: list[str], parent: Tracker) -> None:
        import mlflow

        self.mlflow, self.root, self.parent = mlflow, root, parent
        self.experiment_id = parent.run.info.experiment_id
        self.parameters = {"config": config} | dict(text.split("=", 1) for text in overrides)

    def find(self, sig: str) -> str | None:
        runs = self.mlflow.search_runs(
            experiment_ids=[self.experiment_id],
            filter_string=f"tags.{SIGNATURE_TAG} = '{sig}' and attributes.status = 'FINISHED'",
            output_format="list", max_results=1,
        )  # fmt: skip
        return runs[0].info.run_id if runs else None

    def run(self, entry_point: str, sig: str, label: str, configured: bool = True, **parameters: str) -> str:
        """The run id of the step: a FINISHED run with this signature, or a new project run
        (given the params file and overrides when ``configured``)."""
        found = self.find(sig)
        if found:
            print(f"main: {label}: reusing FINISHED run {found}", flush=True)
            self.parent.set_tags({f"step.{label}.run_id": found, f"step.{label}.reused": "true"})
            return found
        print(f"main: {label}: mlflow run -e {entry_point}", flush=True)
        try:
            submitted = self.mlflow.projects.run(
                str(self.root), entry_point, parameters=(self.parameters if configured else {}) | parameters, env_manager="local",
                experiment_id=self.experiment_id, synchronous=True,
            )  # fmt: skip
        except self.mlflow.exceptions.ExecutionException as exc:
            raise LtreproError(f"main: step {label} (entry point {entry_point}) failed: {exc}") from None
        client = self.mlflow.MlflowClient()
        client.set_tag(submitted.run_id, SIGNATURE_TAG, sig)
        client.set_tag(submitted.run_id, "mlflow.parentRunId", self.parent.run_id)
        self.parent.set_tags({f"step.{label}.run_id": submitted.run_id, f"step.{label}.reused": "false"})
        return submitted.run_id


def run_pipeline(config_paths: list[Path] | None, overrides: list[str], root: Path) -> dict[str, str]:
    """Chain the steps for cfg.method; returns {step: run id}."""
    if config_paths and len(config_paths) > 1:
        raise LtreproError("main takes one params file (MLproject parameter config); pass other values as -P key=value")
    cfg = resolve(load_config(config_paths, overrides))
    method = check_method(cfg)
    config = str(config_paths[0]) if config_paths else "params.yaml"
    commit = git_commit(root)
    parent = Tracker(root, cfg.experiment, f"main-{method.name}-{cfg.data.name}-s{cfg.seed}")
    parent.set_tags({"method": method.name, "stage": "main", "git_commit": commit})
    parent.log_params({"config": config, "overrides": " ".join(overrides) or "-"})
    steps = Steps(root, config, overrides, parent)
    try:
        ids = {"prepare": steps.run("prepare", signature("prepare", to_dict(cfg.data), commit, ""), "prepare")}
        digest = data_hash(load_data(cfg.data, cfg.seed, root))
        for stage, _, key in plan_method(cfg):
            entry = "stage2" if stage.inputs else "stage1"
            inputs = ",".join(f"{name}=runs:/{ids[name]}" for name in stage.inputs)
            extra = {"stage": stage.name} | ({"inputs": inputs} if stage.inputs else {})
            ids[stage.name] = steps.run(entry, signature(entry, key, commit, digest), stage.name, **extra)
        final = f"runs:/{ids[method.stages[-1].name]}"
        for entry in ("evaluate", "export"):
            ids[entry] = steps.run(entry, signature(entry, final, commit, digest), entry, False, run=final)
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end()
    print(f"main: done; runs {json.dumps(ids)}; MLflow UI: mlflow ui --backend-store-uri {tracking_uri(root)}")
    return ids
