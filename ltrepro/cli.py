"""The ``ltrepro`` command. Subcommands that read params.yaml take ``key.sub=value`` overrides
anywhere on the line, and MLflow's ``--key.sub value`` form (how ``mlflow run -P key=value``
passes a parameter its entry point does not declare).

Errors of input (config, data, checkpoint, arguments) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ltrepro.errors import LtreproError, first_line

CONFIG_HELP = (
    "params file holding the defaults (default: ./params.yaml); repeat to layer files, e.g. "
    "--config params.yaml --config configs/cifar100_lt/ffn_if100.yaml"
)
OVERRIDE_HELP = "overrides of params.yaml, e.g. stage1.lr=0.05 data.name=cifar100_lt"


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, action="append", help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without config overrides, the overrides as key=value): ``key=value`` tokens and
    ``--key value`` / ``--key=value`` pairs whose key is a config key. The value of an option that
    takes one stays with it, even when it reads key=value (``report --grid data.imbalance=10,100``)."""
    from ltrepro.config import is_config_key

    takes_value = value_options(build_parser())
    rest, overrides, index = [], [], 0
    while index < len(argv):
        token = argv[index]
        name, sep, value = token.removeprefix("--").partition("=")
        if token in takes_value and index + 1 < len(argv):
            rest += [token, argv[index + 1]]
            index += 1
        elif token.startswith("--") and is_config_key(name):
            if not sep:
                if index + 1 >= len(argv):
                    raise LtreproError(f"{token}: missing its value")
                index, value = index + 1, argv[index + 1]
            overrides.append(f"{name}={value}")
        elif not token.startswith("-") and sep and is_config_key(name):
            overrides.append(token)
        else:
            rest.append(token)
        index += 1
    return rest, overrides


def value_options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of every (sub)command that take exactly one value."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                found |= value_options(command)
        elif action.option_strings and action.nargs is None and not isinstance(action, argparse._HelpAction):
            found |= set(action.option_strings)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ltrepro", description="Long-tailed recognition: train, evaluate, tune, export.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser(
        "prepare",
        help="place or convert the dataset's files under data.root and check them",
        description="Fashion-MNIST: gunzip Debian's dataset-fashion-mnist files (installing the package "
        "when running as root). Other datasets: check that their files are in place and print the split counts.",
    )
    add_config_arguments(prepare)
    prepare.add_argument("--source", type=Path, help="folder with the four Fashion-MNIST idx .gz files")

    train = commands.add_parser(
        "train",
        help="run every stage of cfg.method (method=NAME), each evaluated on test once, tracked in MLflow",
        description="Runs the stages of the configured method in order; a stage whose config and inputs match "
        "a finished run is reused, not retrained.",
    )
    add_config_arguments(train)
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue that stopped run from its last.pt "
                       "(a stopped run of the same config is resumed without it)")  # fmt: skip
    train.add_argument("--restart", action="store_true", help="train afresh instead of resuming a stopped run")

    stage = commands.add_parser(
        "stage",
        help="train one stage of cfg.method (how dvc.yaml and the MLproject entry points run stages)",
        description="STAGE is a stage name of the method (`ltrepro methods`) or a slot: stageL:N is the method's "
        "N-th stage at depth L (stage1:N: the N-th stage without inputs; stage2:1: the first stage whose deepest input "
        "is at depth 1). A method with fewer writes a run.json marked UNUSED, so one dvc.yaml serves every method. "
        "Inputs not given are the finished runs of the same config under out_dir.",
    )
    stage.add_argument("stage", metavar="STAGE", help="stage name (stage1_kps, stage2, ...) or slot stageL:N")
    add_config_arguments(stage)
    stage.add_argument("--input", action="append", default=[], metavar="NAME=RUN", help="an input stage: a run "
                       "directory or an MLflow URI (runs:/RUN_ID); repeat, or separate with commas")  # fmt: skip
    stage.add_argument("--from", dest="from_dirs", action="append", type=Path, default=[], metavar="DIR",
                       help="a run directory whose run.json names the input it is (UNUSED slots are skipped)")  # fmt: skip
    stage.add_argument("--run-dir", type=Path, help="write the run here (default: a new folder in out_dir)")
    stage.add_argument("--metrics", type=Path, help="also write the final metrics as JSON here")
    stage.add_argument("--restart", action="store_true", help="train afresh instead of resuming a stopped run")

    pipeline = commands.add_parser(
        "pipeline",
        help="the MLproject `main` entry point: prepare, every stage, evaluate, export, each an MLflow project run",
        description="Runs each step as `mlflow run . -e STEP` and reuses a FINISHED run of a step whose entry "
        "point, stage key (its config and inputs), git commit and data hash match. Stage 2 gets its stage-1 "
        "checkpoints as runs:/ artifact URIs.",
    )
    add_config_arguments(pipeline)

    tune = commands.add_parser(
        "tune",
        help="Optuna study over cfg.method's tunables, on validation balanced top-1 (the tune: block of params.yaml)",
        description="Each trial runs the method with sampled values (finished stages it does not change are "
        "reused) as a nested MLflow run under the study's run; the final stage's validation accuracy is reported "
        "every epoch and bad trials are pruned. The best params go to <tune.best_dir>/<study>.yaml.",
    )
    add_config_arguments(tune)
    tune.add_argument("--resume", nargs="?", const="true", default="false", choices=["true", "false"],
                      help="continue (or join, as another worker) the study of that name")  # fmt: skip

    export = commands.add_parser(
        "export", help="export a finished stage run's model to one ONNX file, checked against PyTorch with ONNX Runtime"
    )
    export.add_argument("run", nargs="*", help="a finished stage run: its directory, MLflow run id or runs:/RUN_ID; "
                        "given several (dvc.yaml's slots), the one that is its method's final stage")  # fmt: skip
    export.add_argument("--study", help="export the final model of this Optuna study's best trial instead")
    export.add_argument("--config", type=Path, action="append", help="params file: tune.storage for --study, registry.*")
    export.set_defaults(overrides=[])  # key=value overrides, e.g. registry.name=NAME
    export.add_argument("--out", type=Path, help="ONNX file (default RUN_DIR/model.onnx)")
    export.add_argument("--metrics", type=Path, help="also write the parity figures as JSON here")
    export.add_argument("--root", type=Path, help="project root for data and inputs (default: the run's own)")
    export.add_argument("--atol", type=float, default=1e-3, help="max |ORT - PyTorch| logit difference, relative "
                        "to max(1, max |logit|) (default 1e-3)")  # fmt: skip

    rekey = commands.add_parser(
        "rekey", help="give finished runs keyed by an older ltrepro today's stage keys, from their saved configs"
    )
    add_config_arguments(rekey)
    rekey.add_argument("--dry-run", action="store_true", help="only list the runs whose key would change")

    methods = commands.add_parser("methods", help="list the registered methods, their stages and tunables")
    methods.add_argument("--json", action="store_true", help="machine-readable output")

    promote = commands.add_parser(
        "promote", help="move the registry alias champion to the challenger when its validation top-1 wins by registry.margin"
    )
    add_config_arguments(promote)
    promote.add_argument("--version", help="the version to consider (default: the one with alias challenger)")

    evaluate = commands.add_parser("evaluate", help="evaluate a finished run's checkpoint on the test set")
    evaluate.add_argument("run", nargs="+", help="run directory (holds config.yaml and best.pt) or MLflow URI "
                          "runs:/RUN_ID; given several (dvc.yaml's slots), the one that is its method's final stage")  # fmt: skip
    evaluate.add_argument("--checkpoint", default="best.pt", help="file in the run directory (default best.pt)")
    evaluate.add_argument("--out", type=Path, help="write the metrics JSON here (default RUN_DIR/evaluation.json)")
    evaluate.add_argument("--plots-dir", type=Path, help="also write per_class.csv and confusion.csv here (dvc plots)")
    evaluate.add_argument("--root", type=Path, help="project root for data and inputs (default: the run's own)")

    report = commands.add_parser("report", help="results table (mean ± std over seeds) from finished runs")
    add_config_arguments(report)
    report.add_argument("--methods", nargs="+", default=["ce", "crt", "ffn", "h2t", "mislas", "ce_fcc"])
    report.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    report.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="one row per value (and method), e.g. --grid data.imbalance=10,100; repeat for a product")  # fmt: skip
    report.add_argument("--stage", help="report this stage of each method (e.g. probe) instead of its final one")
    report.add_argument("--out", type=Path, help="also write the markdown table here")
    report.add_argument("--optimism", action="store_true",
                        help="the audited runs (audit.test_every_epoch=true): test top-1 selected on validation against the "
                             "best epoch on test and the last epoch")
    report.add_argument("--html", type=Path, metavar="OUT",
                        help="also write a static results page to OUT/index.html (figures as PNG), logged as a report-... MLflow run")
    report.add_argument("--defects", action="store_true",
                        help="the reference-code defects table: for each behaviour of the released code the methods declare "
                             "(`ltrepro methods`), its flag's paired difference from ltrepro's default")  # fmt: skip
    report.add_argument("--missing", action="store_true",
                        help="instead of the tables, the `ltrepro train` command of every cell they lack, one a line")
    report.add_argument("--spread", metavar="KEY",
                        help="a --grid key (e.g. data.split_seed): each method's spread across its values with the seed "
                             "fixed against its spread across seeds with the value fixed")  # fmt: skip
    report.add_argument("--baseline", metavar="METHOD",
                        help="also the paired difference of each method from METHOD over the seeds (mean, 95%% t interval)")

    archive = commands.add_parser(
        "archive", help="finished stage runs as plain files (no checkpoints) and back, so results outlive a store"
    ).add_subparsers(dest="archive_command", required=True)
    for name, text in (("export", "write each finished stage run of the store not yet in DIR"),
                       ("import", "recreate each run archived in DIR not yet in the store, with its original times")):  # fmt: skip
        action = archive.add_parser(name, help=text)
        add_config_arguments(action)
        action.add_argument("dir", type=Path, metavar="DIR")

    bench = commands.add_parser("bench", help="benchmarks; results are written to files")
    benchmarks = bench.add_subparsers(dest="bench_command", required=True)
    loader = benchmarks.add_parser("loader", help="img/s of a training epoch: device-resident loader vs torchvision DataLoader")
    add_config_arguments(loader)
    loader.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up (default 3)")
    loader.add_argument("--out", type=Path, default=Path("bench/loader.json"), help="result file")
    serve = benchmarks.add_parser("serve", help="ORT vs PyTorch latency; HTTP latency and throughput of mlflow models serve")
    serve.add_argument("--model", help="registered model URI (default models:/<registry name>@champion)")
    serve.add_argument("--config", type=Path, action="append", help=CONFIG_HELP)
    serve.add_argument("--repeats", type=int, default=50, help="timed calls per latency figure (default 50)")
    serve.add_argument("--out", type=Path, default=Path("bench/serve.json"), help="result file")
    train = benchmarks.add_parser("train", help="img/s of ResNet-32 training: the reference loop, the engine, compiled, model only")
    train.add_argument("--quick", action="store_true", help="1,236 images instead of 12,406 (about a minute on 2 cores)")
    train.add_argument("--epochs", type=int, default=1, help="timed epochs of each configuration, in interleaved rounds after one warm-up (default 1)")
    train.add_argument("--cpu-options", action="store_true", help="also time the engine with channels_last, torch.compile, fused SGD on CPU")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when present")
    train.add_argument("--out", type=Path, default=Path("bench/train.json"), help="result file")
    schedule = benchmarks.add_parser("schedule", help="seconds of a whole ResNet-32 stage-1 schedule on a CIFAR-100-LT-sized set")
    schedule.add_argument("--epochs", type=int, default=200, help="epochs of the schedule (default 200, LDAM-DRW's)")
    schedule.add_argument("--compile", action="store_true", help="torch.compile the backbone (inductor)")
    schedule.add_argument("--quick", action="store_true", help="293 images (n_max 8 at IF 8) instead of 10,847: a smoke run")
    schedule.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when present")
    schedule.add_argument("--out", type=Path, default=Path("bench/schedule.json"), help="result file")
    return parser


def config_files(args: argparse.Namespace) -> list[Path] | None:
    """The --config files in order; ./params.yaml when none is given (the built-in defaults if absent)."""
    if args.config:
        return args.config
    return [Path("params.yaml")] if Path("params.yaml").is_file() else None


def project_root(args: argparse.Namespace) -> Path:
    """Relative paths (data.root, out_dir) resolve against the first config file's folder."""
    files = config_files(args)
    return (files[0].parent if files else Path.cwd()).resolve()


def command_prepare(args: argparse.Namespace) -> None:
    from ltrepro.config import load_config
    from ltrepro.data import fmnist, load_data, resolve_data_config

    cfg = load_config(config_files(args), args.overrides)
    root = project_root(args)
    data_cfg = resolve_data_config(cfg.data)
    if data_cfg.name == "fmnist_lt":
        target = fmnist.prepare(root / data_cfg.root, args.source or fmnist.DEBIAN_DIR)
        print(f"Fashion-MNIST ready in {target}")
    data = load_data(data_cfg, cfg.seed, root)
    counts = data.train_counts.tolist()
    print(f"{data.name}: {data.num_classes} classes, train {len(data.train)} (n_max {counts[0] if counts else 0}, "
          f"min {min(counts)}), val {len(data.val)}, test {len(data.test)}, index hash {data.info['index_hash']}")


def command_train(args: argparse.Namespace) -> None:
    from ltrepro import distributed
    from ltrepro.runner import train

    try:  # under torchrun every rank trains; rank 0 reports
        results = train(config_files(args), args.overrides, args.resume, args.restart)
        for result in results if distributed.current().is_main else []:
            print_result(result)
    finally:
        distributed.stop()


def print_result(result) -> None:
    print(f"\n{result.stage}: {'reused' if result.reused else 'finished'}")
    print(f"  MLflow run     {result.run_id}")
    for key, value in result.metrics.items():
        print(f"  {key:<15}{value:.2f}" if isinstance(value, float) else f"  {key:<15}{value}")
    print(f"  checkpoint     {result.run_dir / 'best.pt'}")
    print(f"  MLflow UI      {result.tracking_ui}")


def command_stage(args: argparse.Namespace) -> None:
    from ltrepro import distributed
    from ltrepro.config import load_config
    from ltrepro.context import get_method, resolve
    from ltrepro.runner import run_named_stage, select_stage
    from ltrepro.runs import read_run_json, write_run

    cfg = resolve(load_config(config_files(args), args.overrides))
    method = get_method(cfg.method)
    stage = select_stage(method, args.stage)
    if stage is None:  # an empty slot: a marker, so DVC has its outs
        depths = [method.depth(s) for s in method.stages]
        marker = {"status": "UNUSED", "method": method.name, "slot": args.stage,
                  "reason": f"{method.name}'s stages sit at depths {depths}"}  # fmt: skip
        target = args.run_dir or Path(cfg.out_dir) / f"unused-{method.name}-{args.stage.replace(':', '-')}"
        target.mkdir(parents=True, exist_ok=True)
        write_run(target, marker)
        write_metrics(args.metrics, {})
        print(f"{args.stage}: unused by {method.name} ({marker['reason']}); wrote {target / 'run.json'}")
        return
    inputs = {}
    for directory in args.from_dirs:
        if not (directory / "run.json").is_file():
            raise LtreproError(f"--from {directory}: no run.json there")
        info = read_run_json(directory / "run.json")
        if info.get("stage") in stage.inputs:  # a run's own files are checked when it is resolved as an input
            inputs[info["stage"]] = str(directory)
    for text in (item for value in args.input for item in value.split(",") if item):
        name, sep, spec = text.partition("=")
        if not sep or not name or not spec:
            raise LtreproError(f"--input {text!r}: expected NAME=RUN_DIR or NAME=runs:/RUN_ID")
        inputs[name] = spec
    try:  # under torchrun every rank trains; rank 0 reports
        result = run_named_stage(cfg, project_root(args), stage, inputs, args.run_dir, args.restart)
        if distributed.current().is_main:
            print_result(result)
            write_metrics(args.metrics, result.metrics)
    finally:
        distributed.stop()


def write_metrics(path: Path | None, values: dict) -> None:
    """The ``--metrics FILE`` of stage and export (DVC's metrics files); nothing when not asked."""
    from ltrepro.runs import to_json

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_json(values))


def command_pipeline(args: argparse.Namespace) -> None:
    from ltrepro.pipeline import run_pipeline

    run_pipeline(config_files(args), args.overrides, project_root(args))


def command_tune(args: argparse.Namespace) -> None:
    from ltrepro.tune import tune

    print(json.dumps(tune(config_files(args), args.overrides, project_root(args), args.resume == "true"), indent=2))


def command_export(args: argparse.Namespace) -> None:
    from ltrepro.config import load_config
    from ltrepro.export import export_run
    from ltrepro.runs import final_run

    runs = [run for run in args.run if run]  # MLproject passes "" for "not given"
    args.run, args.study = final_run(runs) if runs else None, args.study or None
    if (args.run is None) == (args.study is None):
        raise LtreproError("export: give a run (directory or runs:/RUN_ID) or --study NAME, not both")
    cfg = load_config(config_files(args), args.overrides)
    if args.study:
        from ltrepro.tune import best_trial_run

        args.run = best_trial_run(cfg, args.study, project_root(args))
    result = export_run(args.run, args.out, args.root, args.atol, cfg.registry)
    write_metrics(args.metrics, result)
    print(json.dumps(result, indent=2))


def command_promote(args: argparse.Namespace) -> None:
    from ltrepro.config import load_config
    from ltrepro.model_registry import promote

    cfg = load_config(config_files(args), args.overrides)
    print(json.dumps(promote(cfg, project_root(args), args.version or None), indent=2))  # MLproject passes ""


def command_rekey(args: argparse.Namespace) -> None:
    from ltrepro.config import load_config
    from ltrepro.rekey import rekey_runs

    cfg = load_config(config_files(args), args.overrides)
    changes = rekey_runs(project_root(args), cfg.out_dir, args.dry_run)
    for change in changes:
        print(f"{change['run_dir']}: {change['old']} -> {change['new']}")
    print(f"{len(changes)} run(s) {'would be ' if args.dry_run else ''}re-keyed")


def command_methods(args: argparse.Namespace) -> None:
    from ltrepro.methods import METHODS

    described = [METHODS.get(name).describe() for name in METHODS.names()]
    if args.json:
        print(json.dumps(described, indent=2))
        return
    for method in described:
        stages = " -> ".join(
            f"{s['name']}({s['config']}{', from ' + '+'.join(s['inputs']) if s['inputs'] else ''})" for s in method["stages"]
        )
        tunables = ", ".join(f"{t['key']} in [{t['low']}, {t['high']}]" for t in method["tunables"]) or "-"
        print(f"{method['name']:<11} {method['summary']}\n{'':<11} stages: {stages}\n{'':<11} tunable: {tunables}")
        for s in method["stages"]:
            print(f"{'':<11} {s['name']} reads: {s['config']} plan fields, data, model, seed, {', '.join(s['reads']) or '-'}")
        for r in method["reference"]:
            flag = "the audit (selection on test)" if r["optimism"] else " ".join(r["overrides"])
            print(f"{'':<11} released code {r['label']}: {r['what']} ({flag})")


def command_evaluate(args: argparse.Namespace) -> None:
    from ltrepro.runs import final_run, to_json
    from ltrepro.scoring import evaluate_run

    metrics = evaluate_run(final_run(args.run), args.checkpoint, args.root and args.root.resolve(), args.plots_dir, track=True)
    out = args.out or Path(metrics["run_dir"]) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_json(metrics))
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    print(f"written to {out}")


def command_report(args: argparse.Namespace) -> None:
    from ltrepro.config import load_config
    from ltrepro.report import (
        audited_figures,
        behaviour_results,
        behaviours_table,
        collect,
        markdown_table,
        optimism_table,
        paired_table,
        parse_grid,
        spread_groups,
        spread_table,
    )

    grid = parse_grid(args.grid)
    methods = [*args.methods, *([args.baseline] if args.baseline and args.baseline not in args.methods else [])]
    overrides = [*args.overrides, *(["audit.test_every_epoch=true"] if args.optimism else [])]
    missing: list[list[str]] = []
    results = collect(config_files(args), project_root(args), methods, args.seeds, overrides, grid, args.stage, missing)
    tables = [("Methods (test, mean ± std over seeds)", markdown_table(results))]
    if args.baseline:
        tables.append((f"Paired difference from {args.baseline}", paired_table(results, args.baseline)))
    audited = audited_figures(results) if args.optimism else None
    if audited is not None:
        tables.append(("Test-selection optimism", optimism_table(audited)))
    if args.defects:
        found = behaviour_results(config_files(args), project_root(args), args.methods, args.seeds, args.overrides, missing)
        tables.append(("The released code's behaviours against ltrepro's defaults", behaviours_table(found)))
    if args.missing:  # instead of the tables: what to train to fill them, one command a line
        for cell in dict.fromkeys(shlex.join(["ltrepro", "train", *cell]) for cell in missing):
            print(cell)
        return
    spread = (args.spread, spread_groups(results, methods, grid, args.spread)) if args.spread else None
    if spread is not None:
        tables.append((f"Spread across {args.spread} and across seeds (test top-1)", spread_table(spread[1], args.spread)))
    table = "\n".join(markdown for _, markdown in tables)
    if args.html:
        from ltrepro.report_page import log_page, write_page

        page = write_page(args.html, results, tables, args.command_line, args.seeds, audited, spread)
        run_id = log_page(project_root(args), load_config(config_files(args), overrides).experiment, args.html)
        print(f"results page: {page} (MLflow run {run_id})")
    print(table)
    if args.out:
        args.out.write_text(table)


def command_archive(args: argparse.Namespace) -> None:
    from ltrepro.archive import export_runs, import_runs

    run = export_runs if args.archive_command == "export" else import_runs
    done = run(project_root(args), args.dir)
    print(f"{len(done)} run(s) {args.archive_command}ed ({args.dir})")


def command_bench(args: argparse.Namespace) -> None:
    commands = {"loader": command_bench_loader, "serve": command_bench_serve, "train": command_bench_train,
                "schedule": command_bench_schedule}  # fmt: skip
    commands[args.bench_command](args)


def command_bench_loader(args: argparse.Namespace) -> None:
    from ltrepro.bench import bench_loader
    from ltrepro.config import load_config
    from ltrepro.context import resolve, select_device
    from ltrepro.data import load_data
    from ltrepro.stages import build_model

    cfg = resolve(load_config(config_files(args), args.overrides))
    root = project_root(args)
    data = load_data(cfg.data, cfg.seed, root)
    result = bench_loader(cfg, data, lambda: build_model(cfg, data), select_device(cfg.device), args.epochs, args.out)
    print(json.dumps(result, indent=2))


def command_bench_train(args: argparse.Namespace) -> None:
    from ltrepro.bench_train import bench_train, markdown_table
    from ltrepro.context import select_device

    if args.epochs < 1:
        raise LtreproError(f"--epochs must be at least 1, got {args.epochs}")
    result = bench_train(select_device(args.device), args.out, args.quick, args.epochs, args.cpu_options)
    print(markdown_table(result))
    print(f"written: {args.out}")


def command_bench_schedule(args: argparse.Namespace) -> None:
    from ltrepro.bench_train import bench_schedule
    from ltrepro.context import select_device

    if args.epochs < 2:
        raise LtreproError(f"--epochs must be at least 2 (one warm-up epoch and one more), got {args.epochs}")
    result = bench_schedule(select_device(args.device), args.out, args.epochs, args.compile, args.quick)
    print(f"{result['epochs']} epochs of {result['train_images']} images on {result['device']}"
          f"{' (compiled)' if result['compiled'] else ''}: {result['training_seconds']:.1f} s training, "
          f"{result['wall_seconds']:.1f} s with validation and checkpoints")  # fmt: skip
    print(f"written: {args.out}")


def command_bench_serve(args: argparse.Namespace) -> None:
    from ltrepro.bench import bench_serve
    from ltrepro.config import load_config
    from ltrepro.model_registry import registered_name

    cfg = load_config(config_files(args))
    model_uri = args.model or f"models:/{registered_name(cfg.registry, cfg.data.name)}@champion"
    print(json.dumps(bench_serve(model_uri, project_root(args), args.out, args.repeats), indent=2))


COMMANDS = {
    "data": command_prepare,
    "train": command_train,
    "stage": command_stage,
    "pipeline": command_pipeline,
    "tune": command_tune,
    "export": command_export,
    "promote": command_promote,
    "rekey": command_rekey,
    "methods": command_methods,
    "evaluate": command_evaluate,
    "report": command_report,
    "archive": command_archive,
    "bench": command_bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = split_overrides(argv)
    except LtreproError as exc:
        print(f"ltrepro: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    args.command_line = shlex.join(["ltrepro", *argv])  # as typed, for what records it (the results page)
    if overrides and not hasattr(args, "overrides"):
        print(f"ltrepro {args.command}: error: takes no config overrides, got {' '.join(overrides)}", file=sys.stderr)
        return 2
    if hasattr(args, "overrides"):
        args.overrides = overrides + args.overrides
    try:
        COMMANDS[args.command](args)
    except LtreproError as exc:
        print(f"ltrepro: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"ltrepro: interrupted; {str(exc) or 'nothing was left half-written'}", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__module__.partition(".")[0] not in STORE_MODULES:
            raise
        print(f"ltrepro: error: tracking or study store: {first_line(exc)}", file=sys.stderr)
        return 1
    return 0


STORE_MODULES = ("mlflow", "sqlalchemy", "alembic", "sqlite3", "optuna")  # their errors are about a store, not our input


if __name__ == "__main__":
    sys.exit(main())
