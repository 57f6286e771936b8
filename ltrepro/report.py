"""Results tables generated from finished runs, never typed by hand.

For each (method, seed) the stage keys are computed exactly as the runner computes them, and
the final stage's FINISHED run supplies the metrics, so a table row is the run that
``ltrepro train method=M seed=S`` produced (or would reuse) with the same config.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ltrepro.config import load_config
from ltrepro.train import find_finished, plan_method, resolve

COLUMNS = ("test_top1", "test_many", "test_medium", "test_few", "test_ece")


def collect(paths: list[Path] | None, root: Path, methods: list[str], seeds: list[int], overrides: list[str]) -> dict:
    """{method: {seed: metrics or None}} for the final stage of each method."""
    results: dict[str, dict[int, dict | None]] = {}
    for method in methods:
        results[method] = {}
        for seed in seeds:
            cfg = resolve(load_config(paths, [*overrides, f"method={method}", f"seed={seed}"]))
            _, _, key = plan_method(cfg)[-1]
            run_dir = find_finished(root / cfg.out_dir, key)
            results[method][seed] = json.loads((run_dir / "run.json").read_text())["metrics"] if run_dir else None
    return results


def markdown_table(results: dict) -> str:
    """Mean ± std (ddof 1) over the seeds that finished; missing seeds are named."""
    header = "| method | seeds | top-1 | many | medium | few | ECE |\n|---|---|---|---|---|---|---|\n"
    rows = []
    for method, by_seed in results.items():
        done = {seed: m for seed, m in by_seed.items() if m is not None}
        cells = []
        for column in COLUMNS:
            values = np.array([m[column] for m in done.values()], dtype=float)
            spread = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.2f}{spread}" if len(values) else "-")
        missing = [s for s, m in by_seed.items() if m is None]
        seeds = ",".join(map(str, done)) + (f" (missing {','.join(map(str, missing))})" if missing else "")
        rows.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"
