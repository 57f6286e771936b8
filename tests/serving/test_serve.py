"""End to end: train a tiny FFN on a tiny Fashion-MNIST in the real idx format, export, register,
promote, `mlflow models serve` it, predict over HTTP (both JSON forms), bad requests, the client,
the load test and `mlflow models predict`; the served labels equal the PyTorch model's. (Debian's
real files are read by tests/data/test_fmnist.py; here they would only make every stage's test pass
take 10,000 images.)"""
import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from ltrepro.data import fmnist
from ltrepro.data.loader import make_loader
from ltrepro.export import export_run
from ltrepro.model_registry import image_base64, promote
from ltrepro.config import load_config
from ltrepro.serving.loadtest import request_body, run_load
from ltrepro.serving.server import mlflow_server
from ltrepro.rebuild import load_run
from ltrepro.runner import train
from serve.client import classify
from tests.conftest import write_fmnist_source

MODEL = "models:/ltrepro-fmnist_lt@champion"
IMAGES = 48


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny FFN, exported, registered and promoted; its PyTorch test predictions."""
    root = tmp_path_factory.mktemp("serve")
    fmnist.prepare(root / "data/raw", write_fmnist_source(root / "debian", train_per_class=60))
    params = {"seed": 0, "device": "cpu", "method": "ffn",
              "data": {"name": "fmnist_lt", "n_max": 40, "imbalance": 10, "val_per_class": 10},
              "stage1": {"epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0},
              "stage2": {"epochs": 2, "batch_size": 32}, "ffn": {"kps_params": {"ga_epoch": 1}}}  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        final = train(root / "params.yaml", [])[-1]
        export_run(str(final.run_dir), root / "model.onnx", None)
        promote(load_config(root / "params.yaml"), root)
        run = load_run(final.run_dir)
        images, _ = next(iter(make_loader(run.data, "test", IMAGES, torch.device("cpu"), num_workers=0).epoch()))
        with torch.no_grad():
            expected = run.model.cpu()(images).argmax(1).tolist()
        encoded = [image_base64(run.data.test, i) for i in range(IMAGES)]
        with mlflow_server(MODEL, uri, root / "server.log") as url:
            yield {"url": url, "root": root, "uri": uri, "encoded": encoded, "expected": expected}
    finally:  # set_experiment exported MLFLOW_EXPERIMENT_ID; later tests' subprocesses must not inherit it
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
            os.environ.pop(name, None)


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_predictions_equal_pytorch_in_both_json_forms(served):
    status, split = post(served["url"], {"dataframe_split": {"columns": ["image"], "data": [[e] for e in served["encoded"]]}})
    assert status == 200 and [p["label"] for p in split["predictions"]] == served["expected"]
    status, inputs = post(served["url"], {"inputs": {"image": served["encoded"][:5]}, "params": {"top_k": 3}})
    first = inputs["predictions"][0]
    assert status == 200 and first["top_labels"][0] == first["label"] == served["expected"][0]
    assert first["class_name"] == fmnist.CLASS_NAMES[first["label"]] and 0 < first["score"] <= 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": {"image": ["%%%"]}}, "row 0: not base64 text"),
        ({"inputs": {"image": [base64.b64encode(b"just text").decode()]}}, "row 0: not a PNG or JPEG image"),
        ({"inputs": {"picture": ["abc"]}}, "Model is missing inputs ['image']"),
        ({"inputs": {"image": []}}, "an empty batch"),
        ({"dataframe_split": {"columns": ["image"], "data": [[1.5]]}}, "row 0: column 'image' must hold base64 text; got float"),
        ({"inputs": {"image": ["A"]}, "params": {"top_k": "x"}}, "top_k"),
        ({"inputs": {"image": ["A"] * 513}}, "a batch of 513 images; the limit is 512"),
        ({"inputs": {"image": ["A" * (6 * 2**20)]}}, "an image may have at most 4194304 bytes"),
        (b"{not json", "JSON"),
    ],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(served, body, message):
    status, answer = post(served["url"], body)
    assert status == 400 and message in answer["message"]
    assert len(answer["message"]) < 2000  # the payload is not echoed back
    assert post(served["url"], {"inputs": {"image": served["encoded"][:1]}})[0] == 200


def test_client_and_load_test(served, tmp_path, capsys):
    paths = []
    for index, text in enumerate(served["encoded"][:4]):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(base64.b64decode(text))
    assert [p["label"] for p in classify(served["url"], paths)] == served["expected"][:4]
    bodies = [request_body([text]) for text in served["encoded"]]
    result = run_load(served["url"], bodies, clients=4, requests=40, images_per_request=1)
    assert result["errors"] == 0 and result["statuses"] == {"200": 40} and result["p50_ms"] <= result["p99_ms"]


def test_mlflow_models_predict(served, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps({"inputs": {"image": served["encoded"][:8]}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": served["uri"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", MODEL, "--env-manager", "local",
         "-i", str(tmp_path / "in.json"), "-o", str(tmp_path / "out.json"), "-t", "json"],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert [p["label"] for p in predictions] == served["expected"][:8]
    assert all(0 < p["score"] <= 1 for p in predictions)
