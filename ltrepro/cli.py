"""The ``ltrepro`` command. Every subcommand takes ``key.sub=value`` overrides of params.yaml.

Errors of input (config, data, checkpoint) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ltrepro.errors import LtreproError

CONFIG_HELP = (
    "params file holding the defaults (default: ./params.yaml); repeat to layer files, e.g. "
    "--config params.yaml --config configs/cifar100_lt/ffn_if100.yaml"
)
OVERRIDE_HELP = "overrides of params.yaml, e.g. stage1.lr=0.05 data.name=cifar100_lt"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, action="append", help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltrepro", description="Long-tailed recognition: train, evaluate, tune, export.")
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
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a killed run from its last.pt")

    methods = commands.add_parser("methods", help="list the registered methods, their stages and tunables")
    methods.add_argument("--json", action="store_true", help="machine-readable output")

    evaluate = commands.add_parser("evaluate", help="evaluate a finished run's checkpoint on the test set")
    evaluate.add_argument("run_dir", type=Path, help="run directory (holds config.yaml and best.pt)")
    evaluate.add_argument("--checkpoint", default="best.pt", help="file in the run directory (default best.pt)")
    evaluate.add_argument("--out", type=Path, help="write the metrics JSON here (default RUN_DIR/evaluation.json)")

    report = commands.add_parser("report", help="results table (mean ± std over seeds) from finished runs")
    add_config_arguments(report)
    report.add_argument("--methods", nargs="+", default=["ce", "crt", "ffn", "h2t", "mislas", "ce_fcc"])
    report.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    report.add_argument("--out", type=Path, help="also write the markdown table here")

    bench = commands.add_parser("bench", help="benchmarks; results are written to files")
    loader = bench.add_subparsers(dest="bench_command", required=True).add_parser(
        "loader", help="img/s of a training epoch: device-resident loader vs torchvision DataLoader"
    )
    add_config_arguments(loader)
    loader.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up (default 3)")
    loader.add_argument("--out", type=Path, default=Path("bench/loader.json"), help="result file")
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
    from ltrepro.train import train

    for result in train(config_files(args), args.overrides, args.resume):
        print(f"\n{result.stage}: {'reused' if result.reused else 'finished'}")
        print(f"  MLflow run     {result.run_id}")
        for key, value in result.metrics.items():
            print(f"  {key:<15}{value:.2f}" if isinstance(value, float) else f"  {key:<15}{value}")
        print(f"  checkpoint     {result.run_dir / 'best.pt'}")
    print(f"  MLflow UI      {result.tracking_ui}")


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


def command_evaluate(args: argparse.Namespace) -> None:
    from ltrepro.train import evaluate_run, to_json

    metrics = evaluate_run(args.run_dir, args.checkpoint)
    out = args.out or args.run_dir / "evaluation.json"
    out.write_text(to_json(metrics))
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    print(f"written to {out}")


def command_report(args: argparse.Namespace) -> None:
    from ltrepro.report import collect, markdown_table

    table = markdown_table(collect(config_files(args), project_root(args), args.methods, args.seeds, args.overrides))
    print(table)
    if args.out:
        args.out.write_text(table)


def command_bench(args: argparse.Namespace) -> None:
    from ltrepro.bench import bench_loader
    from ltrepro.config import load_config
    from ltrepro.data import load_data
    from ltrepro.stages import build_model
    from ltrepro.train import resolve, select_device

    cfg = resolve(load_config(config_files(args), args.overrides))
    root = project_root(args)
    data = load_data(cfg.data, cfg.seed, root)
    result = bench_loader(cfg, data, lambda: build_model(cfg, data), select_device(cfg.device), args.epochs, args.out)
    print(json.dumps(result, indent=2))


COMMANDS = {
    "data": command_prepare,
    "train": command_train,
    "methods": command_methods,
    "evaluate": command_evaluate,
    "report": command_report,
    "bench": command_bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except LtreproError as exc:
        print(f"ltrepro: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ltrepro: interrupted; the last finished epoch is kept in last.pt (resume with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
