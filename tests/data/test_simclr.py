"""Batched SimCLR augmentation (ltrepro.data.simclr): forced parameters against closed forms and
torchvision's per-image functions, plus the empirical law of the random draws."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.functional as TF

from ltrepro.data import simclr as S
from ltrepro.errors import LtreproError


def images(n: int = 4, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def plain_params(x: torch.Tensor, **changes: torch.Tensor) -> S.SimclrParams:
    """Parameters that leave x unchanged: full box, no flip/jitter/gray, sigma 0.1 (weights e^-50)."""
    n, _, h, w = x.shape
    params = S.draw_simclr_params(n, h, w, torch.Generator().manual_seed(0), 2.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    base = dict(
        flip=torch.zeros(n, dtype=torch.bool),
        jitter=torch.zeros(n, dtype=torch.bool),
        gray=torch.zeros(n, dtype=torch.bool),
        sigma=torch.full((n,), 0.1),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
        order=torch.arange(4).repeat(n, 1),
    )
    return dataclasses.replace(params, **{**base, **changes})


def jitter_only(x: torch.Tensor, factors: list[float], order: list[int]) -> torch.Tensor:
    n = len(x)
    params = plain_params(
        x,
        jitter=torch.ones(n, dtype=torch.bool),
        factors=torch.tensor([factors]).repeat(n, 1),
        order=torch.tensor([order]).repeat(n, 1),
    )
    return S.apply_simclr(x, params)


def test_output_shape_dtype_range_and_uint8_entry() -> None:
    x = images(8, 3, 32)
    out = S.simclr_views(x, torch.Generator().manual_seed(1), strength=2.0)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    augment = S.SimclrAugment(1.0)
    params = augment.draw(8, 32, 32, torch.Generator().manual_seed(1))
    assert torch.equal(augment(x, params), S.apply_simclr(x, params))  # the loader's augmenter interface


def test_same_generator_state_gives_same_view_and_calls_are_independent() -> None:
    x = images(6, 3, 32)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = S.simclr_views(x, g1, 2.0)
    assert torch.equal(first, S.simclr_views(x, g2, 2.0))
    second = S.simclr_views(x, g1, 2.0)  # same generator, next state: the other view
    other_seed = S.simclr_views(x, torch.Generator().manual_seed(8), 2.0)
    assert (second - first).abs().max() > 0.1 and (other_seed - first).abs().max() > 0.1


def test_full_box_without_jitter_or_blur_is_identity() -> None:
    x = images(3, 3, 16)
    params = plain_params(x)
    assert params.box.tolist() == [[0, 0, 16, 16]] * 3
    assert torch.allclose(S.apply_simclr(x, params), x, atol=1e-5, rtol=0)


def test_crop_equals_torchvision_crop_then_bilinear_resize() -> None:
    x = images(16, 3, 12, seed=3)
    boxes = S.draw_crop_boxes(16, 12, 12, torch.Generator().manual_seed(3))
    out = S.resized_crop(x, boxes, (12, 12))
    assert not torch.equal(boxes[:, 2:], torch.full((16, 2), 12))
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(x[i], top, left, h, w, [12, 12], antialias=False)
        assert torch.allclose(out[i], expected, atol=1e-5, rtol=0), (top, left, h, w)


def test_crop_fallback_is_torchvision_centre_crop() -> None:
    # Area fraction 1 at ratio 2 never fits a square: torchvision falls back to the full width and
    # height round(32 / 2) = 16, centred at top (32 - 16) // 2 = 8.
    boxes = S.draw_crop_boxes(5, 32, 32, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(2.0, 2.0))
    assert boxes.tolist() == [[8, 0, 16, 32]] * 5


def test_flip_flips() -> None:
    x = images(2, 3, 8)
    out = S.apply_simclr(x, plain_params(x, flip=torch.tensor([True, False])))
    assert torch.allclose(out[0], x[0].flip(2), atol=1e-5) and torch.allclose(out[1], x[1], atol=1e-5)
    assert not torch.allclose(out[0], x[0], atol=1e-2)


def test_grayscale_gives_equal_luma_channels() -> None:
    x = images(2, 3, 8)
    out = S.apply_simclr(x, plain_params(x, gray=torch.tensor([True, False])))
    luma = 0.299 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2]
    for channel in range(3):
        assert torch.allclose(out[0, channel], luma, atol=1e-5)
    assert torch.allclose(out[1], x[1], atol=1e-5)


def test_brightness_factor_multiplies_then_clamps() -> None:
    x = images(2, 3, 8)
    assert torch.allclose(jitter_only(x, [0.5, 1, 1, 0], [0, 1, 2, 3]), 0.5 * x, atol=1e-5)
    assert torch.allclose(jitter_only(x, [1.7, 1, 1, 0], [0, 1, 2, 3]), (1.7 * x).clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_jitter_matches_torchvision_in_the_given_order(order: list[int]) -> None:
    x = images(1, 3, 8, seed=5)
    factors = [1.4, 0.6, 1.8, 0.23]
    expected = x[0]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for index in order:
        expected = ops[index](expected, factors[index])
    # 1e-3: torchvision's tensor grayscale weighs red 0.2989, ours (and PIL's) 0.299.
    assert torch.allclose(jitter_only(x, factors, order)[0], expected, atol=1e-3, rtol=0)


def test_jitter_order_matters() -> None:
    x = images(1, 3, 8, seed=5)
    factors = [1.8, 0.3, 1.0, 0.0]
    assert (jitter_only(x, factors, [0, 1, 2, 3]) - jitter_only(x, factors, [1, 0, 2, 3])).abs().max() > 1e-2


@pytest.mark.parametrize("shift", [0.0, 0.13, -0.37, 0.5])
def test_hue_is_exact_hsv_rotation(shift: float) -> None:
    x = images(3, 3, 8, seed=6)
    out = S.adjust_hue(x, torch.full((3,), shift))
    assert torch.allclose(out, TF.adjust_hue(x, shift), atol=1e-5, rtol=0)
    assert torch.allclose(S.hsv_to_rgb(S.rgb_to_hsv(x)), x, atol=1e-5)


def test_blur_near_identity_at_small_sigma_and_keeps_constants() -> None:
    x = images(2, 3, 16)
    assert S.blur_kernel_size(32) == 3 and S.blur_kernel_size(28) == 3 and S.blur_kernel_size(40) == 5
    assert S.blur_kernel_size(64) == 7 and S.blur_kernel_size(10) == 3
    assert torch.allclose(S.gaussian_blur(x, torch.full((2,), 0.1), 3), x, atol=1e-6)
    blurred = S.gaussian_blur(x, torch.tensor([2.0, 0.1]), 3)
    assert (blurred[0] - x[0]).abs().max() > 0.05 and torch.allclose(blurred[1], x[1], atol=1e-6)
    expected = TF.gaussian_blur(x[0], [3, 3], [2.0, 2.0])  # reflection padding as here
    assert torch.allclose(blurred[0], expected, atol=1e-5)
    constant = torch.full((2, 3, 16, 16), 0.37)
    assert torch.allclose(S.gaussian_blur(constant, torch.tensor([2.0, 0.7]), 5), constant, atol=1e-6)


def test_random_parameters_follow_the_reference_law() -> None:
    n, size = 4000, 32
    params = S.draw_simclr_params(n, size, size, torch.Generator().manual_seed(0), strength=2.0)
    assert abs(params.flip.float().mean() - 0.5) < 0.03
    assert abs(params.jitter.float().mean() - 0.8) < 0.03
    assert abs(params.gray.float().mean() - 0.2) < 0.03
    top, left, h, w = params.box.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= size).all() and (left + w <= size).all()
    fraction = (h * w).double() / size**2
    # Rounding w and h to pixels lets a box fall slightly under 0.08 (81.9 px -> 9 x 9 = 81 px).
    assert fraction.min() >= 0.07 and fraction.max() <= 1 and 0.45 < fraction.mean() < 0.6
    assert (fraction < 0.08 + 0.05).float().mean() > 0.02  # the small end is reached
    ratio = (w / h).double()
    assert ratio.min() >= 0.7 and ratio.max() <= 1.43
    low, high = params.factors.min(0).values, params.factors.max(0).values  # [0, 2.6] x 3 and [-0.4, 0.4]
    assert torch.allclose(low, torch.tensor([0.0, 0.0, 0.0, -0.4]), atol=0.01)
    assert torch.allclose(high, torch.tensor([2.6, 2.6, 2.6, 0.4]), atol=0.01)
    assert (params.order.sort(1).values == torch.arange(4)).all()
    assert abs((params.order[:, 0] == 3).float().mean() - 0.25) < 0.03
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0 and abs(params.sigma.mean() - 1.05) < 0.03
    half = params[: n // 2]
    assert len(half) == n // 2 and torch.equal(half.box, params.box[: n // 2])


def test_one_channel_batches() -> None:
    x = images(4, 1, 28)
    out = S.simclr_views(x, torch.Generator().manual_seed(0), 2.0)
    assert out.shape == (4, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    # Saturation 0 and hue 0.4 would change an RGB image; on one channel they, and grayscale, are no-ops.
    params = plain_params(x, gray=torch.ones(4, dtype=torch.bool))
    assert torch.allclose(S.apply_simclr(x, params), x, atol=1e-5)
    assert torch.allclose(jitter_only(x, [1, 1, 0, 0.4], [3, 2, 1, 0]), x, atol=1e-5)
    contrast = jitter_only(x, [1, 0.5, 1, 0], [0, 1, 2, 3])
    mean = x.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(contrast, 0.5 * x + 0.5 * mean, atol=1e-5)


def test_bad_strength_is_rejected() -> None:
    with pytest.raises(LtreproError):
        S.SimclrAugment(3.0)


def test_device_loader_gives_two_independent_simclr_views_of_the_same_images() -> None:
    import numpy as np

    from ltrepro.data.base import Split
    from ltrepro.data.loader import DeviceLoader

    labels = np.repeat(np.arange(3), 4)
    raw = (images(12, 1, 28) * 255).to(torch.uint8)
    loader = DeviceLoader(Split(labels, raw), 5, torch.device("cpu"), (0.5,), (0.25,), S.SimclrAugment(2.0), views=2, drop_last=True)
    batches = list(loader.epoch(0, torch.Generator().manual_seed(0)))
    assert len(loader) == len(batches) == 2 and all(len(y) == 5 for _, y in batches)  # the last 2 images dropped
    (first, second), _ = batches[0]
    assert first.shape == second.shape == (5, 1, 28, 28) and not torch.equal(first, second)
    again = list(loader.epoch(0, torch.Generator().manual_seed(0)))
    assert torch.equal(again[0][0][0], first) and torch.equal(again[1][1], batches[1][1])
