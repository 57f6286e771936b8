"""The served model's request handling: decoding, limits, preprocessing as in training, top-k."""
import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ltrepro.serving import onnx_pyfunc as served
from ltrepro.serving.onnx_pyfunc import BadRequest, decode_image, image_column, read_preprocessing, to_input, top_k

FMNIST_META = {"mean": "[0.2860]", "std": "[0.3530]", "image_size": "28", "color_mode": "L", "resize_shorter": "0",
               "class_names": json.dumps([f"c{i}" for i in range(10)])}  # fmt: skip


def encode(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_in_memory_preprocessing_equals_the_training_normalisation():
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    got = to_input(decode_image(encode(Image.fromarray(pixels)), 0), read_preprocessing(FMNIST_META))
    expected = (torch.from_numpy(pixels).float().div(255) - 0.2860) / 0.3530  # the device loader's path
    assert got.shape == (1, 28, 28) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], expected.numpy(), atol=1e-6)


def test_other_sizes_and_modes_are_converted_and_resized():
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 40, 3), dtype=np.uint8))
    text = encode(rgb, "JPEG")
    got = to_input(decode_image(text, 0), read_preprocessing(FMNIST_META))
    sent = Image.open(io.BytesIO(base64.b64decode(text)))  # JPEG is lossy: compare with what was sent
    expected = np.asarray(sent.convert("L").resize((28, 28), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(got[0], (expected - 0.2860) / 0.3530, atol=1e-5)


def test_files_preprocessing_equals_torchvision_eval_transform():
    meta = {**FMNIST_META, "mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]", "image_size": "32",
            "color_mode": "RGB", "resize_shorter": "37"}  # fmt: skip
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 71, 3), dtype=np.uint8))
    transform = T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(), T.Normalize(json.loads(meta["mean"]), json.loads(meta["std"]))])
    got = to_input(decode_image(encode(image), 0), read_preprocessing(meta))
    np.testing.assert_allclose(got, transform(image).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (5, "row 0: column 'image' must hold base64 text; got int"),
        ("!!not base64!!", "row 0: not base64 text"),
        (base64.b64encode(b"GIF89a not allowed").decode(), "row 0: not a PNG or JPEG image"),
        ("A" * (served.MAX_IMAGE_BYTES * 4 // 3 + 8), "an image may have at most 4194304 bytes"),
    ],
)
def test_bad_images_are_client_errors_naming_the_row(text, message):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")) as error:
        decode_image(text, 0)
    assert error.value.get_http_status_code() == 400


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(served, "MAX_PIXELS", 100)
    with pytest.raises(BadRequest, match=r"row 3: 11x10 pixels; the limit is 100 pixels"):
        decode_image(encode(Image.new("L", (11, 10))), 3)


def test_truncated_image_is_a_client_error():
    whole = base64.b64decode(encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8))))
    with pytest.raises(BadRequest, match="row 0: a broken image"):
        decode_image(base64.b64encode(whole[: len(whole) // 2]).decode(), 0)


def test_batch_shape_checks():
    assert image_column({"image": np.array(["a", "b"])}) == ["a", "b"]
    with pytest.raises(BadRequest, match="needs a column 'image'"):
        image_column(pd.DataFrame({"img": ["a"]}))
    with pytest.raises(BadRequest, match="an empty batch"):
        image_column(pd.DataFrame({"image": []}))
    with pytest.raises(BadRequest, match=f"a batch of {served.MAX_BATCH + 1} images; the limit is {served.MAX_BATCH}"):
        image_column(pd.DataFrame({"image": ["a"] * (served.MAX_BATCH + 1)}))


def test_top_k_param():
    assert top_k(None, 10) == 0 and top_k({"top_k": 3}, 10) == 3
    for bad in (11, -1, True, "3", 2.5):
        with pytest.raises(BadRequest, match=r"params.top_k: expected an integer in \[0, 10\]"):
            top_k({"top_k": bad}, 10)


def test_server_prefix_is_stripped_from_the_message():
    error = BadRequest("row 0: not base64 text")
    error.message = f"Failed to predict data '{'x' * 10_000}'. \nError: {error.message}"  # what the scoring server does
    assert json.loads(error.serialize_as_json())["message"] == "row 0: not base64 text"


def test_providers_follow_torch_not_onnxruntime(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert served.choose_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert served.choose_providers()[0] == "CUDAExecutionProvider"


def test_ort_threads_come_from_the_environment_or_are_refused(monkeypatch):
    import onnxruntime as ort

    monkeypatch.delenv(served.THREADS_ENV, raising=False)
    assert served.session_options(ort).intra_op_num_threads == 0  # ORT's default: one thread per core
    monkeypatch.setenv(served.THREADS_ENV, "1")
    assert served.session_options(ort).intra_op_num_threads == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(served.THREADS_ENV, bad)
        with pytest.raises(served.MlflowException, match=f"LTREPRO_ORT_THREADS: expected a positive integer.*got '{bad}'"):
            served.session_options(ort)
