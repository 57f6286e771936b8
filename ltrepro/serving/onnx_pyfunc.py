"""The served model: an MLflow pyfunc over one exported ONNX file (MLflow models-from-code).

MLflow copies this file into the logged model and runs it at load time, so it imports nothing from
ltrepro and nothing a client sends is ever executed: a request carries base64 image bytes, decoded
by Pillow as PNG or JPEG only. Input: a table with one string column ``image``. Each image is
converted to the model's colour mode and resized as in training (read from the ONNX metadata that
``ltrepro export`` writes), scaled to [0, 1] and normalised. Output: one record per image with
``label``, ``class_name``, ``score`` (softmax probability of the label), and with
``params={"top_k": k}`` (k >= 1) the k best as ``top_labels``, ``top_classes``, ``top_scores``.
Records, not a DataFrame: the server writes the same JSON without building and converting a table.

ONNX Runtime's intra-op threads: ``LTREPRO_ORT_THREADS`` in the server's environment, else ORT's
default (one per core). With ``mlflow models serve -w N`` on C cores, C / N keeps the workers
from fighting over the cores (see the README's serving benchmark).

Limits (a request past one gets HTTP 400 naming it): MAX_BATCH images a request, MAX_IMAGE_BYTES of
decoded bytes and MAX_PIXELS pixels an image.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError

MAX_BATCH = 512
MAX_IMAGE_BYTES = 4 * 2**20
MAX_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG")
THREADS_ENV = "LTREPRO_ORT_THREADS"


class BadRequest(MlflowException):
    """A client error: the scoring server answers HTTP 400 with this message.

    The server rewrites the message as ``Failed to predict data '<the whole input>'. \nError: ...``,
    which for images echoes megabytes of base64 back to the client and into logs; the setter keeps
    only the sentence after ``Error: ``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self._message = value.rpartition("\nError: ")[2]


def choose_providers() -> list[str]:
    """CUDA when torch sees a GPU, else CPU. onnxruntime-gpu lists CUDAExecutionProvider even on a
    machine without a GPU, so its provider list cannot decide."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def session_options(ort):
    """ORT session options: ``LTREPRO_ORT_THREADS`` intra-op threads when set (a positive integer)."""
    options = ort.SessionOptions()
    value = os.environ.get(THREADS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise MlflowException(f"{THREADS_ENV}: expected a positive integer (ONNX Runtime threads a worker); got {value!r}")
        options.intra_op_num_threads = int(value)
    return options


def read_preprocessing(metadata: dict[str, str]) -> dict:
    """The export's metadata as numbers: how training turned an image into the ``images`` input."""
    return {
        "mean": np.asarray(json.loads(metadata["mean"]), dtype=np.float32).reshape(-1, 1, 1),
        "std": np.asarray(json.loads(metadata["std"]), dtype=np.float32).reshape(-1, 1, 1),
        "image_size": int(metadata["image_size"]),
        "color_mode": metadata["color_mode"],
        "resize_shorter": int(metadata["resize_shorter"]),  # 0: resize to image_size x image_size
        "class_names": json.loads(metadata["class_names"]),
    }


def decode_image(text: object, row: int):
    """base64 text -> a Pillow image, checked against the limits before its pixels are decoded."""
    if not isinstance(text, str):
        raise BadRequest(f"row {row}: column 'image' must hold base64 text; got {type(text).__name__}")
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise BadRequest(f"row {row}: {len(text)} base64 characters; an image may have at most {MAX_IMAGE_BYTES} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"row {row}: not base64 text") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=FORMATS)
    except (UnidentifiedImageError, OSError):
        raise BadRequest(f"row {row}: not a PNG or JPEG image") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadRequest(f"row {row}: {width}x{height} pixels; the limit is {MAX_PIXELS} pixels")
    try:
        image.load()
    except (OSError, ValueError) as exc:  # truncated or corrupt data behind a valid header
        raise BadRequest(f"row {row}: a broken image ({exc})") from None
    return image


def to_input(image, prep: dict) -> np.ndarray:
    """One image -> C x H x W float32, as the evaluation transform of training: the colour mode,
    then (files) the shorter side to resize_shorter and a centre crop, or (in-memory sets) a resize
    to image_size x image_size when the size differs; then x / 255 and (x - mean) / std."""
    image = image.convert(prep["color_mode"])
    size = prep["image_size"]
    if prep["resize_shorter"]:
        shorter, (width, height) = prep["resize_shorter"], image.size
        if width <= height:
            new = (shorter, int(shorter * height / width))
        else:
            new = (int(shorter * width / height), shorter)
        image = image.resize(new, Image.BILINEAR)
        left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    elif image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return (pixels - prep["mean"]) / prep["std"]


def image_column(model_input) -> list:
    """The ``image`` values of a request, however MLflow handed them over."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
        raise BadRequest("the input needs a column 'image' of base64-encoded PNG or JPEG bytes")
    values = model_input["image"].tolist()
    if not values:
        raise BadRequest("an empty batch: send at least one image")
    if len(values) > MAX_BATCH:
        raise BadRequest(f"a batch of {len(values)} images; the limit is {MAX_BATCH} a request")
    return values


def top_k(params: dict | None, num_classes: int) -> int:
    """``params["top_k"]``: 0 (the default) for the label alone, k for the k best classes too."""
    value = (params or {}).get("top_k", 0)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= num_classes:
        raise BadRequest(f"params.top_k: expected an integer in [0, {num_classes}]; got {value!r}")
    return int(value)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class OnnxImageClassifier(PythonModel):
    """Base64 images in, labels out, through ONNX Runtime."""

    def load_context(self, context) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(context.artifacts["onnx"], session_options(ort), providers=choose_providers())
        self.prep = read_preprocessing(self.session.get_modelmeta().custom_metadata_map)

    def predict(self, context, model_input, params: dict | None = None) -> list[dict]:
        texts = image_column(model_input)
        names = self.prep["class_names"]
        k = top_k(params, len(names))
        batch = np.stack([to_input(decode_image(text, row), self.prep) for row, text in enumerate(texts)])
        probabilities = softmax(self.session.run(["logits"], {"images": batch})[0].astype(np.float64))
        labels, scores = probabilities.argmax(axis=1), probabilities.max(axis=1)
        records = [{"label": int(label), "class_name": names[label], "score": float(score)} for label, score in zip(labels, scores)]
        if k:
            best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
            for record, order, row in zip(records, best, probabilities):
                record |= {"top_labels": order.tolist(), "top_classes": [names[i] for i in order], "top_scores": row[order].tolist()}
        return records


mlflow.models.set_model(OnnxImageClassifier())
