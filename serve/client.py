"""Classify image files with a served ltrepro model.

    python -m serve.client shirt.png boot.jpg --url http://127.0.0.1:5000 --top-k 3

Sends the files' bytes base64-encoded in one request (``{"inputs": {"image": [...]}}``) and prints
one line per file. Standard library only, so it runs anywhere Python does.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def classify(url: str, paths: list[Path], top_k: int = 0, timeout: float = 60) -> list[dict]:
    """The server's predictions for ``paths``, in order; raises RuntimeError with its message on a 4xx/5xx."""
    body: dict = {"inputs": {"image": [base64.b64encode(path.read_bytes()).decode("ascii") for path in paths]}}
    if top_k:
        body["params"] = {"top_k": top_k}
    request = urllib.request.Request(
        f"{url.rstrip('/')}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["predictions"]
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise RuntimeError(f"HTTP {error.code}: {detail}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify PNG/JPEG files with a model served by `mlflow models serve`.")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="the server (default http://127.0.0.1:5000)")
    parser.add_argument("--top-k", type=int, default=0, help="also print the k best classes")
    args = parser.parse_args(argv)
    try:
        predictions = classify(args.url, args.images, args.top_k)
    except (OSError, RuntimeError) as exc:
        print(f"serve.client: error: {exc}", file=sys.stderr)
        return 1
    for path, prediction in zip(args.images, predictions):
        line = f"{path}\t{prediction['label']}\t{prediction['class_name']}\t{prediction['score']:.4f}"
        if "top_classes" in prediction:
            line += "\t" + ", ".join(f"{name} {score:.3f}" for name, score in zip(prediction["top_classes"], prediction["top_scores"]))
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
