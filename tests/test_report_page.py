"""ltrepro report --html: a static page whose every figure exists, is not blank, and is logged."""
import os
import re
import shutil
import subprocess

import mlflow
import numpy as np
from matplotlib import image

from ltrepro.cli import main
from ltrepro.report_page import markdown_to_html, safe, spread_figure
from ltrepro.runner import train

FAST = ["stage1.epochs=2", "stage1.batch_size=16", "stage2.epochs=2", "stage2.batch_size=16"]


def test_markdown_tables_become_html_tables_and_row_labels_file_names():
    table = "| method | top-1 |\n|---|---|\n| crt | 78.68 ± 1.89 |\n| a<b | - |\n"
    assert markdown_to_html(table) == (
        "<table><thead><tr><th>method</th><th>top-1</th></tr></thead><tbody>"
        "<tr><td>crt</td><td>78.68 ± 1.89</td></tr><tr><td>a&lt;b</td><td>-</td></tr></tbody></table>"
    )
    assert safe("crt, data.imbalance=10") == "crt_data.imbalance_10"


def test_the_spread_figure_draws_a_line_per_seed(tmp_path):
    by_value = {value: {seed: {"test_top1": 70.0 + 2 * int(value) + seed} for seed in range(3)} for value in "012"}
    path = spread_figure("data.split_seed", {"ce": by_value, "bs": by_value}, tmp_path / "spread.png")
    pixels = image.imread(path)
    assert pixels.shape[1] > pixels.shape[0] > 100 and np.std(pixels) > 0.01  # two panels side by side, not blank


def test_html_page_shows_the_runs_every_image_exists_is_not_blank_and_is_logged(project, capsys):
    crt = train(project / "params.yaml", ["method=crt", *FAST])
    for method in ("crt", "ce"):  # --optimism reads the audited runs, the baseline's too
        train(project / "params.yaml", [f"method={method}", *FAST, "audit.test_every_epoch=true"])
    out = project / "page"
    argv = ["report", "--config", str(project / "params.yaml"), *FAST, "--methods", "crt", "--baseline", "ce", "--seeds", "0"]
    assert main([*argv, "--optimism", "--html", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert f"<td>{crt[-1].metrics['test_top1']:.2f}</td>" in page  # the methods table, from the runs
    assert "<th>method - ce</th>" in page and "Test-selection optimism" in page
    assert "ltrepro report --config" in page and "torch_threads: " in page  # command and recorded hardware
    sources = re.findall(r"<img src='([^']+)'", page)
    assert {"per_class.png", "optimism.png", "reliability-crt-s0.png", "reliability-ce-s0.png"} <= set(sources)
    for source in sources:
        pixels = image.imread(out / source)
        assert pixels.shape[0] > 100 and np.std(pixels) > 0.01, f"{source} is blank"
    if os.environ.get("CI") or shutil.which("chromium"):  # .ci/run installs Debian's chromium
        shot = project / "shot.png"
        subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600",
                        f"--screenshot={shot}", (out / "index.html").as_uri()], check=True, capture_output=True, timeout=120)  # fmt: skip
        rendered = image.imread(shot)[..., :3]
        assert (rendered < 0.9).mean() > 0.01, "the page renders blank"  # tables, text and figures darken it
    run_id = capsys.readouterr().out.rsplit("(MLflow run ", 1)[1].split(")")[0]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "report")}
    assert {f"report/{name}" for name in ["index.html", *sources]} <= logged
