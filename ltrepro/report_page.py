"""``ltrepro report --html OUT/``: one static results page from the finished runs, no server.

The page holds the methods table (and the paired and optimism tables when asked for), per-class
test accuracy against training count for every method, each method's reliability diagrams (the
``plots/reliability.png`` every stage run logs) and, from audited runs, the test-selection
optimism. Under every figure: the command that made the page, the seeds, and the hardware and
thread count the runs recorded. The folder is also logged as the artifacts of a ``report-...``
MLflow run.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ltrepro.evaluate import save_figure
from ltrepro.report import finished, spread_matrix
from ltrepro.tracking import run_files


def per_class_figure(evaluations: dict[str, list[dict]], path: Path) -> Path:
    """Test accuracy of each class against its training count (log scale), one line per row (its
    seeds' ``metrics.json``), the mean over its seeds; classes sorted by count."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for row, runs in evaluations.items():
        counts = np.asarray(runs[0]["train_counts"], dtype=float)
        accuracy = np.nanmean(np.array([e["per_class"] for e in runs], dtype=float), axis=0)
        order = np.argsort(counts)
        ax.plot(counts[order], accuracy[order], marker="o", markersize=3, label=f"{row} ({len(runs)} seeds)")
    ax.set_xscale("log")
    ax.set(xlabel="training images of the class", ylabel="test accuracy (%)", ylim=(0, 100))
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def optimism_figure(optimism: dict[str, list[tuple[float, ...]]], path: Path) -> Path:
    """Per row, the best-epoch-on-test and last-epoch test top-1 minus the validation-selected one
    (mean over audited seeds, with each seed as a dot); ``optimism``: each row's ``optimism_figures``."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    rows = list(optimism)
    for offset, (index, label) in zip((-0.2, 0.2), ((2, "best epoch on test - selected"), (4, "last epoch - selected"))):
        values = [np.array([figures[index] for figures in optimism[row]]) for row in rows]
        x = np.arange(len(rows)) + offset
        ax.bar(x, [v.mean() for v in values], width=0.4, label=label, alpha=0.7)
        for position, seeds in zip(x, values):
            ax.plot(np.full(len(seeds), position), seeds, "k.", markersize=4)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(np.arange(len(rows)), rows, rotation=20, fontsize=8)
    ax.set_ylabel("test top-1 points")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def spread_figure(key: str, groups: dict[str, dict[str, dict]], path: Path) -> Path:
    """Test top-1 at each value of ``key`` (x), one line per seed, one panel per group
    (``report.spread_groups``): lines that cross show the split and the seed interacting, parallel
    lines a split that is easier for every seed."""
    fig = Figure(figsize=(min(4 * len(groups), 12), 3.5), layout="constrained")
    for index, (group, by_value) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), index + 1)
        matrix, seeds = spread_matrix(by_value)
        for column, seed in enumerate(seeds):
            ax.plot(range(len(by_value)), matrix[:, column], marker="o", label=f"seed {seed} (init, validation)")
        ax.set_xticks(range(len(by_value)), list(by_value))
        ax.set(title=group, xlabel=key, ylabel="test top-1 (%)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def markdown_to_html(table: str) -> str:
    """A markdown pipe table (``ltrepro.report``'s) as an HTML table."""
    lines = [line.strip().strip("|") for line in table.strip().splitlines() if line.strip()]
    header, body = lines[0], lines[2:]  # lines[1] is the |---| rule

    def cells(line: str, tag: str) -> str:
        return "".join(f"<{tag}>{html.escape(cell.strip())}</{tag}>" for cell in line.split("|"))

    head = cells(header, "th")
    rows = "".join(f"<tr>{cells(line, 'td')}</tr>" for line in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def hardware_line(results: dict) -> str:
    """What the runs recorded about where they ran: device, CPU, torch threads (each distinct value)."""
    seen: dict[str, set[str]] = {"device": set(), "cpu": set(), "torch_threads": set()}
    for by_seed in results.values():
        for metrics in finished(by_seed).values():
            for key in seen:
                seen[key].add(metrics["tags"].get(key, "not recorded"))
    return "; ".join(f"{key}: {', '.join(sorted(values))}" for key, values in seen.items() if values)


def write_page(
    out: Path, results: dict, tables: list[tuple[str, str]], command: str, seeds: list[int],
    audited: dict | None = None, spread: tuple[str, dict] | None = None,
) -> Path:  # fmt: skip
    """Write ``out/index.html`` and its figures; ``tables`` are (title, markdown) pairs, shown first;
    ``audited`` (``report.audited_figures``) adds the optimism figure, ``spread`` (the key and its
    ``report.spread_groups``) the spread figure."""
    out.mkdir(parents=True, exist_ok=True)
    downloads = out / "runs"
    evaluations: dict[str, list[dict]] = {}
    reliability: dict[str, list[tuple[int, Path]]] = {}
    for row, by_seed in results.items():
        for seed, metrics in finished(by_seed).items():
            files = run_files(metrics["run_id"], ["metrics.json", "plots/reliability.png"], downloads)
            if "metrics.json" in files:
                evaluations.setdefault(row, []).append(json.loads(files["metrics.json"].read_text()))
            if "plots/reliability.png" in files:
                target = out / f"reliability-{safe(row)}-s{seed}.png"
                shutil.copyfile(files["plots/reliability.png"], target)
                reliability.setdefault(row, []).append((seed, target))
    shutil.rmtree(downloads, ignore_errors=True)
    meta = (f"<p class=meta>Command: <code>{html.escape(command)}</code>. Seeds: {' '.join(map(str, seeds))}. "
            f"Runs recorded {html.escape(hardware_line(results))}. Page written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>")  # fmt: skip
    parts = [f"<h2>{html.escape(title)}</h2>{markdown_to_html(table)}{meta}" for title, table in tables]
    per_class = per_class_figure(evaluations, out / "per_class.png")
    parts.append(f"<h2>Per-class test accuracy against training count</h2><img src='{per_class.name}' alt='per-class accuracy'>{meta}")
    cells = "".join(
        f"<figure><img src='{path.name}' alt='reliability {html.escape(row)} seed {seed}'><figcaption>{html.escape(row)}, seed {seed}</figcaption></figure>"
        for row, entries in reliability.items() for seed, path in entries
    )  # fmt: skip
    parts.append(f"<h2>Reliability diagrams (test, 15 bins)</h2><div class=grid>{cells}</div>{meta}")
    optimism = {row: list(finished(by_seed).values()) for row, by_seed in (audited or {}).items()}
    optimism = {row: figures for row, figures in optimism.items() if figures}
    if optimism:
        figure = optimism_figure(optimism, out / "optimism.png")
        parts.append(f"<h2>Test-selection optimism (audited runs)</h2><img src='{figure.name}' alt='optimism'>{meta}")
    if spread is not None:
        figure = spread_figure(*spread, out / "spread.png")
        parts.append(f"<h2>Spread across {html.escape(spread[0])} and across seeds</h2><img src='{figure.name}' alt='spread'>{meta}")
    page = out / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>ltrepro results</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}th{background:#eee}.meta{color:#555;font-size:12px}"
        ".grid{display:flex;flex-wrap:wrap;gap:8px}.grid img{width:250px}figure{margin:0}figcaption{font-size:12px}"
        "</style></head><body><h1>ltrepro results</h1>" + "".join(parts) + "</body></html>\n"
    )
    return page


def safe(row: str) -> str:
    """A row label as a file-name part: 'crt, data.imbalance=10' -> 'crt_data.imbalance_10'."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", row).strip("_")


def log_page(root: Path, experiment: str, out: Path) -> str:
    """The page's folder as the artifacts of a new ``report-<time>`` MLflow run; returns its id."""
    from ltrepro.tracking import Tracker

    tracker = Tracker(root, experiment, f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    tracker.set_tags({"stage": "report"})
    for path in sorted(out.iterdir()):
        tracker.log_artifact(path, "report")
    tracker.end()
    return tracker.run_id
