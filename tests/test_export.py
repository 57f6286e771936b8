"""ONNX export: one file, dynamic batch, metadata, parity with PyTorch, loud failure."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ltrepro.cli import main
from ltrepro.errors import LtreproError
from ltrepro.export import export_run, parity, to_onnx
from ltrepro.model_registry import onnx_val_top1
from ltrepro.rebuild import load_run
from ltrepro.runner import train

FAST = ["stage1.epochs=2", "stage2.epochs=2", "stage2.batch_size=16", "ffn.kps_params={ga_epoch: 1}"]
NEW_METHODS = ["stage1.batch_size=16", "probe.epochs=1", "ipdpp.k=5"]  # the fixture's 90 images: full BNS batches


@pytest.mark.parametrize("method", ["ffn", "h2t", "fsgl", "bns_ipdpp", "tau_norm"])
def test_export_matches_pytorch_and_carries_preprocessing(project, tmp_path, method):
    final = train(project / "params.yaml", [f"method={method}", *FAST, *NEW_METHODS])[-1]
    out = tmp_path / "model.onnx"
    result = export_run(str(final.run_dir), out, None)
    assert result["parity_top1_agreement"] == 1.0 and result["parity_max_abs_diff"] <= result["parity_tolerance"]

    graph = onnx.load(str(out))
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == ["logits"]
    assert not list(out.parent.glob("*.data"))  # one file, no external data
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["class_names"])[0] == "T-shirt/top" and meta["image_size"] == "28" and meta["method"] == method
    assert meta["source_run_id"] == final.run_id

    run = load_run(final.run_dir)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # the batch axis is dynamic
        images = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = run.model.cpu()(images).numpy()
        np.testing.assert_allclose(session.run(["logits"], {"images": images.numpy()})[0], expected, atol=1e-4, rtol=1e-4)


def test_parity_check_fails_loudly_on_a_different_model(project, tmp_path):
    runs = train(project / "params.yaml", ["method=crt", *FAST])
    out = tmp_path / "model.onnx"
    export_run(str(runs[-1].run_dir), out, None)
    stage1 = load_run(runs[0].run_dir).model.cpu()  # same architecture, other weights
    with pytest.raises(LtreproError, match="ONNX parity check failed on 8 validation images"):
        parity(stage1, out, torch.randn(8, 1, 28, 28), 1e-3)
    # A model with NaN weights: NaN - NaN is no difference at all, so every non-finite logit fails it.
    broken = load_run(runs[-1].run_dir).model.cpu()
    with torch.no_grad():
        for parameter in broken.parameters():
            parameter.fill_(float("nan"))
    nan_file = tmp_path / "nan.onnx"
    to_onnx(broken, torch.zeros(2, 1, 28, 28), nan_file, {})
    with pytest.raises(LtreproError, match="NaN or infinite logits"):
        parity(broken, nan_file, torch.randn(8, 1, 28, 28), 1e-3)
    with pytest.raises(LtreproError, match="NaN or infinite logits on validation images"):  # promote's figure
        onnx_val_top1(nan_file, load_run(runs[-1].run_dir).data)


def test_export_cli_writes_metrics_and_refuses_bad_runs(project, tmp_path, capsys):
    final = train(project / "params.yaml", ["method=crt", *FAST])[-1]
    metrics = tmp_path / "export.json"
    assert main(["export", str(final.run_dir), "--out", str(tmp_path / "m.onnx"), "--metrics", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["parity_images"] > 0
    assert main(["export", str(tmp_path)]) == 2
    assert "not an ltrepro run directory" in capsys.readouterr().err
    assert main(["export"]) == 2
    assert "give a run (directory or runs:/RUN_ID) or --study NAME" in capsys.readouterr().err
