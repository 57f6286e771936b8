"""Results tables generated from tracked runs, never typed by hand.

For each row (a method, optionally at one point of a grid such as ``data.imbalance=10,100``) and
seed, the stage keys are computed exactly as the runner computes them, and the newest FINISHED
MLflow run tagged with the final stage's key supplies the metrics. So a cell is the run that
``ltrepro train``, ``dvc repro`` / ``dvc exp run`` or ``mlflow run`` produced with that config,
wherever it ran, as long as it logged to this tracking store.

``paired_table`` compares each row with a baseline row seed by seed: a seed fixes the LT subset,
the validation split and the initialisation, and stages shared between methods are the same runs,
so the per-seed difference removes the variance the two share.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from ltrepro.config import load_config
from ltrepro.context import resolve
from ltrepro.errors import LtreproError
from ltrepro.runner import plan_method
from ltrepro.scoring import AUDIT_METRIC
from ltrepro.tracking import open_store

COLUMNS = ("test_top1", "test_many", "test_medium", "test_few", "test_ece")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["data.imbalance=10,100"]`` -> ``{"data.imbalance": ["10", "100"]}``."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise LtreproError(f"--grid {item!r}: expected key=value1,value2")
        grid[key] = values.split(",")
    return grid


def finished_run(key: str):
    """The newest FINISHED MLflow run tagged with stage key ``key``, or None."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.stage_key = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )  # fmt: skip
    return runs[0] if runs else None


def seed_result(plan: list) -> dict | None:
    """The final stage's metrics plus ``wall_s``, each stage's wall time in seconds (its MLflow run's
    end - start; a stage reused from another method counts its own run), its ``run_id`` and
    ``tags``; None when the final stage has not finished."""
    final = finished_run(plan[-1][2])
    if final is None:
        return None
    walls = {}
    for stage, _, key in plan:
        run = final if key == plan[-1][2] else finished_run(key)
        if run is not None and run.info.end_time:
            walls[stage.name] = (run.info.end_time - run.info.start_time) / 1000
    return {**final.data.metrics, "wall_s": walls, "run_id": final.info.run_id, "tags": final.data.tags}


def up_to(plan: list, stage: str | None, method: str) -> list:
    """The plan through the stage named ``stage`` (all of it when None)."""
    names = [entry[0].name for entry in plan]
    if stage is None:
        return plan
    if stage not in names:
        raise LtreproError(f"--stage {stage!r}: method {method} has stages {', '.join(names)}")
    return plan[: names.index(stage) + 1]


def row_label(method: str, settings: list[str]) -> str:
    """A report row: the method at one grid point, 'ffn, data.imbalance=10'."""
    return ", ".join([method, *settings])


def collect(
    paths: list[Path] | None, root: Path, methods: list[str], seeds: list[int], overrides: list[str],
    grid: dict[str, list[str]] | None = None, stage: str | None = None, missing: list[list[str]] | None = None,
) -> dict:  # fmt: skip
    """{row: {seed: metrics (with ``wall_s``) or None}} for the final stage of each method (or the
    stage named ``stage``, with the stages before it) at each grid point; the overrides of each
    cell without a finished run are appended to ``missing`` (what ``ltrepro train`` takes)."""

    open_store(root)
    grid = grid or {}
    results: dict[str, dict[int, dict | None]] = {}
    for point in itertools.product(*grid.values()):
        settings = [f"{key}={value}" for key, value in zip(grid, point)]
        for method in methods:
            row = row_label(method, settings)
            results[row] = {}
            for seed in seeds:
                cell = [*overrides, *settings, f"method={method}", f"seed={seed}"]
                results[row][seed] = seed_result(up_to(plan_method(resolve(load_config(paths, cell))), stage, method))
                if results[row][seed] is None and missing is not None:
                    missing.append(cell)
    return results


def wall_cell(results: list[dict]) -> str:
    """Mean wall minutes of each stage over the finished seeds, in stage order: 'stage1 6.5 + stage2 1.0'."""
    names = list(dict.fromkeys(name for result in results for name in result.get("wall_s", {})))
    means = [(name, np.mean([r["wall_s"][name] for r in results if name in r.get("wall_s", {})]) / 60) for name in names]
    return " + ".join(f"{name} {minutes:.1f}" for name, minutes in means) or "-"


def t_interval(differences: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean of paired differences, n - 1 degrees of
    freedom (NaN bounds for a single pair)."""
    from scipy import stats

    mean = float(differences.mean())
    if len(differences) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(differences) - 1) * differences.std(ddof=1) / np.sqrt(len(differences))
    return mean, mean - half, mean + half


def baseline_row(row: str, baseline: str) -> str:
    """The baseline's row at the same grid point as ``row`` ("ffn, data.imbalance=10" -> "bs, data.imbalance=10")."""
    method, sep, settings = row.partition(", ")
    return baseline + sep + settings


def paired_cells(by_seed: dict, base: dict) -> tuple[list[int], list[str]]:
    """(the seeds both finished, a cell per column): the mean of ``by_seed`` minus ``base`` over
    those seeds [95 % t interval], ``~`` where the interval contains zero (no difference shown);
    one paired seed gives the difference alone, a column either lacks ``-``."""
    seeds = [s for s, m in by_seed.items() if m is not None and base.get(s) is not None]
    cells = []
    for column in COLUMNS:
        diffs = np.array([by_seed[s].get(column, np.nan) - base[s].get(column, np.nan) for s in seeds], dtype=float)
        if not len(diffs) or np.isnan(diffs).any():
            cells.append("-")
            continue
        mean, low, high = t_interval(diffs)
        if len(diffs) < 2:
            cells.append(f"{mean:+.2f} (one seed)")
            continue
        mark = " ~" if low <= 0 <= high else ""
        cells.append(f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]{mark}")
    return seeds, cells


def paired_table(results: dict, baseline: str) -> str:
    """Each row minus the baseline at the same grid point, over the seeds both finished (``paired_cells``)."""
    header = (f"| method - {baseline} | paired seeds | top-1 | many | medium | few | ECE |\n"
              "|---|---|---|---|---|---|---|\n")  # fmt: skip
    rows = []
    for row, by_seed in results.items():
        base_row = baseline_row(row, baseline)
        if row == base_row:
            continue
        seeds, cells = paired_cells(by_seed, results[base_row])
        rows.append(f"| {row} | {','.join(map(str, seeds)) or '-'} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def test_curve(run_id: str) -> list[float]:
    """The audited run's test top-1 after each epoch, in epoch order (empty for an unaudited run)."""
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run_id, AUDIT_METRIC)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


OPTIMISM_COLUMNS = ("selected on validation", "best epoch on test", "optimism", "last epoch", "last - selected")


def optimism_figures(selected: float, curve: list[float]) -> tuple[float, ...]:
    """(selected, best on test, best - selected, last, last - selected) for one audited run: what
    choosing the epoch on the test set, or taking the last one, reports instead of the
    validation-selected test top-1."""
    best, last = max(curve), curve[-1]
    return selected, best, best - selected, last, last - selected


def audited_figures(results: dict) -> dict[str, dict[int, tuple[float, ...] | None]]:
    """{row: {seed: ``optimism_figures`` of its audited run, or None when the seed has no finished
    audited run}}; each run's test curve read once, for the table and the results page alike."""
    audited = {}
    for row, by_seed in results.items():
        audited[row] = {}
        for seed, metrics in by_seed.items():
            curve = test_curve(metrics["run_id"]) if metrics is not None else []
            audited[row][seed] = optimism_figures(metrics["test_top1"], curve) if curve else None
    return audited


def optimism_table(audited: dict[str, dict[int, tuple[float, ...] | None]]) -> str:
    """Per row, mean ± std over the audited seeds of ``optimism_figures`` (``audited_figures``);
    seeds whose run was not audited (``audit.test_every_epoch``) are named as missing."""
    header = "| method | audited seeds | " + " | ".join(OPTIMISM_COLUMNS) + " |\n|---|---|" + "---|" * len(OPTIMISM_COLUMNS) + "\n"
    rows = []
    for row, by_seed in audited.items():
        figures = finished(by_seed)
        missing = [seed for seed in by_seed if seed not in figures]
        values = np.array(list(figures.values()), dtype=float).reshape(len(figures), len(OPTIMISM_COLUMNS))
        cells = [
            f"{column.mean():.2f}" + (f" ± {column.std(ddof=1):.2f}" if len(column) > 1 else "") if len(column) else "-"
            for column in values.T
        ]
        seeds = ",".join(map(str, figures)) + (f" (missing {','.join(map(str, missing))})" if missing else "")
        rows.append(f"| {row} | {seeds} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def finished(by_seed: dict) -> dict:
    """The seeds of a row that have a result."""
    return {seed: value for seed, value in by_seed.items() if value is not None}


def markdown_table(results: dict) -> str:
    """Mean ± std (ddof 1) over the seeds that finished, and each stage's mean wall time; missing
    seeds are named."""
    header = "| method | seeds | top-1 | many | medium | few | ECE | wall (min per stage) |\n|---|---|---|---|---|---|---|---|\n"
    rows = []
    for method, by_seed in results.items():
        done = finished(by_seed)
        cells = []
        for column in COLUMNS:
            values = np.array([m.get(column, np.nan) for m in done.values()], dtype=float)
            spread = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.2f}{spread}" if len(values) else "-")
        cells.append(wall_cell(list(done.values())))
        missing = [s for s, m in by_seed.items() if m is None]
        seeds = ",".join(map(str, done)) + (f" (missing {','.join(map(str, missing))})" if missing else "")
        rows.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def spread_groups(results: dict, methods: list[str], grid: dict[str, list[str]], key: str) -> dict[str, dict[str, dict]]:
    """``collect``'s rows regrouped for ``spread_table``: {the method at a point of the other grid
    keys: {each value of ``key``: its row's {seed: metrics or None}}}."""
    if key not in grid:
        raise LtreproError(f"--spread {key}: not a --grid key (the grid has {', '.join(grid) or 'none'})")
    others = {name: values for name, values in grid.items() if name != key}
    groups = {}
    for point in itertools.product(*others.values()):
        fixed = dict(zip(others, point))
        for method in methods:
            groups[row_label(method, [f"{name}={value}" for name, value in fixed.items()])] = {
                value: results[row_label(method, [f"{name}={fixed.get(name, value)}" for name in grid])] for value in grid[key]
            }
    return groups


def spread_matrix(by_value: dict[str, dict], column: str = "test_top1") -> tuple[np.ndarray, list[int]]:
    """(values x seeds array of ``column``, the seeds): the seeds finished at every value of the key."""
    seeds = [seed for seed in next(iter(by_value.values())) if all(by_seed.get(seed) is not None for by_seed in by_value.values())]
    return np.array([[by_seed[seed][column] for seed in seeds] for by_seed in by_value.values()], dtype=float), seeds


def spread_table(groups: dict[str, dict[str, dict]], key: str) -> str:
    """Per group, test top-1 at each value of ``key`` (mean over seeds) and two spreads over the seeds
    finished at every value: across the key's values with the seed fixed, and across seeds with the
    value fixed, each a pooled sd (root of the mean of the per-seed, resp. per-value, variances,
    ddof 1); and the range of all cells. With ``key`` = ``data.split_seed`` the seed fixes the
    initialisation and the validation draw, the key the LT draw."""
    header = (f"| method | {key} | seeds | top-1 at each value | sd across {key} (same seed) | sd across seeds "
              f"(same {key}) | range of cells |\n|---|---|---|---|---|---|---|\n")  # fmt: skip
    rows = []
    for group, by_value in groups.items():
        matrix, seeds = spread_matrix(by_value)
        enough = len(seeds) > 1 and len(by_value) > 1
        across_key = f"{np.sqrt(matrix.var(axis=0, ddof=1).mean()):.2f}" if enough else "-"
        across_seeds = f"{np.sqrt(matrix.var(axis=1, ddof=1).mean()):.2f}" if enough else "-"
        means = " / ".join(f"{value:.2f}" for value in matrix.mean(axis=1)) if seeds else "-"
        spread = f"{matrix.max() - matrix.min():.2f}" if seeds else "-"
        rows.append(f"| {group} | {', '.join(by_value)} | {','.join(map(str, seeds)) or '-'} | {means} | {across_key} | {across_seeds} | {spread} |")
    return header + "\n".join(rows) + "\n"


def behaviour_results(
    paths: list[Path] | None, root: Path, methods: list[str], seeds: list[int], overrides: list[str],
    missing: list[list[str]] | None = None,
) -> list:  # fmt: skip
    """[(method, ``ReferenceBehaviour``, {seed: ltrepro's default}, {seed: the released code's
    behaviour})] for every reference behaviour the methods declare, both sides run with its
    ``setting``; an ``optimism`` behaviour compares each audited run's validation-selected test
    top-1 with its best test epoch (top-1 only: the audit logs nothing else per epoch); cells
    without a finished run go to ``missing`` as in ``collect``."""
    from ltrepro.methods import METHODS

    found = []
    for method in methods:
        for behaviour in METHODS.get(method).reference:
            base = [*overrides, *behaviour.setting]
            flagged = collect(paths, root, [method], seeds, [*base, *behaviour.overrides], stage=behaviour.stage, missing=missing)[method]
            if behaviour.optimism:
                figures = audited_figures({method: flagged})[method]
                default = {s: f and {"test_top1": f[0]} for s, f in figures.items()}
                flagged = {s: f and {"test_top1": f[1]} for s, f in figures.items()}
            else:
                default = collect(paths, root, [method], seeds, base, stage=behaviour.stage, missing=missing)[method]
            found.append((method, behaviour, default, flagged))
    return found


def behaviours_table(found: list) -> str:
    """Per reference behaviour (``behaviour_results``), the released code's behaviour minus
    ltrepro's default over the seeds both finished (``paired_cells``)."""
    header = ("| method | label | the released code | flag | both run with | paired seeds | top-1 | many | medium | few | ECE |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    rows = []
    for method, behaviour, default, flagged in found:
        seeds, cells = paired_cells(flagged, default)
        shown = "selection on the test set" if behaviour.optimism else " ".join(behaviour.overrides)
        setting = " ".join([*behaviour.setting, *([f"(stage {behaviour.stage})"] if behaviour.stage else [])]) or "-"
        rows.append(f"| {method} | {behaviour.label} | {behaviour.what} | {shown} | {setting} | {','.join(map(str, seeds)) or '-'} | "
                    + " | ".join(cells) + " |")  # fmt: skip
    return header + "\n".join(rows) + "\n"
