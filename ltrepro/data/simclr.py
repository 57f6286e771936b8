"""SimCLR augmentation of whole batches on the device, as BNS pre-training, probing and fine-tuning use it.

The pipeline is the BNS reference's ``get_simclr_pipeline_transform(size, s)`` (Lin & Yuan,
"Long-Tailed Recognition via Information-Preservable Two-Stage Learning", arXiv:2510.08836), which
follows SimCLR (Chen et al., ICML'20, Appendix A). Per image, in order:

1. RandomResizedCrop to the image's own size: scale (0.08, 1), log-uniform ratio (3/4, 4/3), bilinear;
2. horizontal flip, p = 0.5;
3. with p = 0.8, ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s), the four in a random order per image;
4. grayscale, p = 0.2;
5. Gaussian blur, always, sigma ~ U(0.1, 2), kernel int(0.1 size) rounded up to odd (>= 3);
6. clamp to [0, 1].

As in ``ltrepro.data.loader``, every random number is drawn up front from a seeded CPU generator
(``draw_simclr_params``) and moved to the images' device once; ``apply_simclr`` is then a fixed
sequence of batched tensor ops with no per-image Python. Two draws give two independent views.
The colour strength s is a named parameter (the reference passes its ``num_views`` argument as s).
Differences from the reference: images stay float (the reference re-quantises to uint8 between PIL
steps and after the blur), and grayscale uses ITU-R 601-2 weights 0.299 / 0.587 / 0.114 (PIL's) where
torchvision's tensor functions use 0.2989.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ltrepro.errors import LtreproError

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before its centre crop
FLIP_P, JITTER_P, GRAY_P = 0.5, 0.8, 0.2
SIGMA_RANGE = (0.1, 2.0)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
# Order of the four jitter operations in SimclrParams.factors and in SimclrParams.order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclasses.dataclass
class SimclrParams:
    """Every random choice for N images; index it (``params[a:b]``) to take a batch's share.

    box: (N, 4) int64 crop top, left, height, width in pixels; flip, jitter, gray: (N,) bool;
    factors: (N, 4) float brightness, contrast, saturation factors and hue shift; order: (N, 4)
    int64, row i the permutation in which image i gets the four jitter ops; sigma: (N,) blur sigma.
    """

    box: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    sigma: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = True) -> SimclrParams:
        """The same parameters on ``device`` (one copy per field, no sync when pinned or on CPU)."""
        return SimclrParams(**{k: v.to(device, non_blocking=non_blocking) for k, v in vars(self).items()})

    def __getitem__(self, index: slice | torch.Tensor) -> SimclrParams:
        return SimclrParams(**{k: v[index] for k, v in vars(self).items()})

    def __len__(self) -> int:
        return len(self.flip)


def jitter_ranges(strength: float) -> torch.Tensor:
    """(4, 2) low/high of the brightness, contrast, saturation factors and the hue shift for strength s.

    torchvision's ColorJitter(x, x, x, h) with x = 0.8 s, h = 0.2 s: factors ~ U[max(0, 1 - x), 1 + x],
    hue shift ~ U[-h, h]; h must stay <= 0.5 (a shift of half the hue circle), so s <= 2.5.
    """
    if not 0 <= strength <= 2.5:
        raise LtreproError(f"SimCLR colour strength must be in [0, 2.5] (hue 0.2 s <= 0.5); got {strength!r}")
    x, h = 0.8 * strength, 0.2 * strength
    return torch.tensor([[max(0.0, 1 - x), 1 + x]] * 3 + [[-h, h]], dtype=torch.float64)


def draw_crop_boxes(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> torch.Tensor:
    """(n, 4) int64 crop boxes (top, left, height, width) with torchvision's RandomResizedCrop law.

    torchvision tries up to 10 (area fraction ~ U(scale), log ratio ~ U(log ratio)) pairs, rounds
    w = sqrt(area r), h = sqrt(area / r) to pixels and takes the first box that fits, at a uniform
    position; if none fits it takes a centre crop of the image clipped to the ratio range. Here all
    10 attempts are drawn for every image at once and the first fitting one is picked with argmax,
    which gives exactly that distribution (only the number of generator draws differs).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u_area, u_ratio = torch.rand(2, n, CROP_ATTEMPTS, generator=generator, dtype=torch.float64).unbind(0)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()  # half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # index of the first fitting attempt (0 if none)
    found = fits.any(1)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    position = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.minimum((position[:, 0] * (height - h + 1)).long(), height - h)
    left = torch.minimum((position[:, 1] * (width - w + 1)).long(), width - w)
    # torchvision's fallback: the largest centred box whose ratio is clipped into [ratio[0], ratio[1]].
    if width / height < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    top = torch.where(found, top, (height - fh) // 2)
    left = torch.where(found, left, (width - fw) // 2)
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    return torch.stack([top, left, h, w], 1)


def draw_simclr_params(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None,
    strength: float,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> SimclrParams:
    """Draw one view's random choices for n images of height x width from ``generator`` (CPU).

    The draws happen in a fixed order and amount, so the generator's state after the call depends
    only on n: a second call gives an independent second view, and a resumed run sees the same views.
    """
    box = draw_crop_boxes(n, height, width, generator, scale, ratio)
    flip = torch.rand(n, generator=generator) < FLIP_P
    jitter = torch.rand(n, generator=generator) < JITTER_P
    ranges = jitter_ranges(strength)
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    factors = (ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * u).float()
    order = torch.rand(n, 4, generator=generator).argsort(1)  # a uniform permutation per image
    gray = torch.rand(n, generator=generator) < GRAY_P
    sigma = SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * torch.rand(n, generator=generator)
    return SimclrParams(box, flip, jitter, factors, order, gray, sigma)


def resized_crop(images: torch.Tensor, box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop box (top, left, h, w) of every image and resize it bilinearly to ``size``, in one grid_sample.

    Output pixel d samples the crop at d (h / out) + (h / out - 1) / 2 (align_corners=False), clamped
    to the crop's first and last pixel, so the result equals cropping and then ``F.interpolate``
    (bilinear) per image; without the clamp grid_sample would mix in pixels just outside the box.
    """
    n, _, height, width = images.shape
    out_h, out_w = size
    top, left, h, w = box.to(images.device, images.dtype).unbind(1)

    def axis(start: torch.Tensor, length: torch.Tensor, out: int, full: int) -> torch.Tensor:
        steps = torch.arange(out, device=images.device, dtype=images.dtype) + 0.5
        src = start[:, None] + steps[None] * (length / out)[:, None] - 0.5
        src = torch.clamp(src, start[:, None], (start + length - 1)[:, None])
        return (2 * src + 1) / full - 1  # pixel centre -> grid_sample's [-1, 1] (align_corners=False)

    ys, xs = axis(top, h, out_h, height), axis(left, w, out_w, width)
    grid = torch.stack([xs[:, None, :].expand(n, out_h, out_w), ys[:, :, None].expand(n, out_h, out_w)], -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W luma 0.299 R + 0.587 G + 0.114 B; a 1-channel batch is its own grayscale."""
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float32).view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f x, clamped to [0, 1] (torchvision's blend with black)."""
    return (images * _per_image(factor)).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f x + (1 - f) m with m the image's mean grayscale, clamped to [0, 1] (torchvision's)."""
    f = _per_image(factor)
    mean = grayscale(images).mean((1, 2, 3), keepdim=True)
    return (f * images + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f x + (1 - f) gray(x), clamped to [0, 1]; a no-op for 1 channel, as in torchvision."""
    if images.shape[1] == 1:
        return images
    f = _per_image(factor)
    return (f * images + (1 - f) * grayscale(images)).clamp(0, 1)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle, 0 for grays)."""
    r, g, b = images.unbind(1)
    value, argmax = images.max(1)
    chroma = value - images.min(1).values
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # Hue in sixths of the circle, in the sector of the largest channel (ties give the same hue).
    sixths = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(chroma > 0, torch.remainder(sixths / 6, 1.0), torch.zeros_like(value))
    return torch.stack([hue, saturation, value], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``: channel n in (5, 3, 1) for (R, G, B) is V - V S clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 H) mod 6, the closed form of the six-sector HSV rule."""
    hue, saturation, value = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = hsv.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = torch.remainder(n + 6 * hue, 6.0)
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (fraction of the circle) in exact HSV, as torchvision; no-op for 1 channel."""
    if images.shape[1] == 1:
        return images
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0:1] + _per_image(shift), 1.0)
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], 1))


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed BRIGHTNESS..HUE


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with a random order per image: op ``order[i, slot]`` is image i's
    ``slot``-th; each slot runs all four ops on the batch and keeps each image's own (16 cheap ops)."""
    for slot in range(4):
        chosen = order[:, slot]
        result = images
        for index, op in enumerate(JITTER_OPS):
            result = torch.where((chosen == index).view(-1, 1, 1, 1), op(images, factors[:, index]), result)
        images = result
    return images


def blur_kernel_size(size: int) -> int:
    """int(0.1 size) rounded up to odd, at least 3 (32 and 28 px -> 3), the reference's kernel rule."""
    return max(3, 2 * (int(0.1 * size) // 2) + 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma and reflection padding, as one grouped conv per axis.

    Folding the batch into channels (1 x N C x H x W) lets each image-channel have its own kernel.
    """
    n, c, height, width = images.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    sigma = sigma.to(images.device, torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.dtype).repeat_interleave(c, 0)  # (N C, k)
    x = F.pad(images.reshape(1, n * c, height, width), (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return x.view(n, c, height, width)


def apply_simclr(images: torch.Tensor, params: SimclrParams) -> torch.Tensor:
    """One SimCLR view of a float batch N x C x H x W in [0, 1] (C = 1 or 3) with these random choices.

    Output has the input's shape and lies in [0, 1]. For C = 1 saturation, hue and grayscale are no-ops.
    """
    n, c, height, width = images.shape
    if c not in (1, 3) or len(params) != n:
        raise ValueError(
            f"apply_simclr: need N x (1|3) x H x W images, N parameter rows; got {tuple(images.shape)}, {len(params)}"
        )
    params = params.to(images.device)
    x = resized_crop(images, params.box, (height, width))
    x = torch.where(params.flip.view(-1, 1, 1, 1), x.flip(3), x)
    x = torch.where(params.jitter.view(-1, 1, 1, 1), color_jitter(x, params.factors, params.order), x)
    if c == 3:
        x = torch.where(params.gray.view(-1, 1, 1, 1), grayscale(x).expand(-1, 3, -1, -1), x)
    x = gaussian_blur(x, params.sigma, blur_kernel_size(height))
    return x.clamp(0, 1)


def simclr_views(images: torch.Tensor, generator: torch.Generator | None, strength: float) -> torch.Tensor:
    """One random SimCLR view of a float batch in [0, 1]; call twice for the two views of BNS."""
    n, _, height, width = images.shape
    return apply_simclr(images, draw_simclr_params(n, height, width, generator, strength))


class SimclrAugment:
    """The SimCLR pipeline as a loader augmenter (``ltrepro.data.loader.CropFlip``'s interface).

    ``draw`` takes every random choice of n images from the CPU generator, ``__call__`` applies a
    batch's share to a float batch in [0, 1] on the device; the loader normalises afterwards.
    ``strength`` is the colour strength s (BNS: 2 for pre-training and the probe, 1 for fine-tuning).
    ``torchvision_steps`` is the same pipeline for datasets read from disk, per image with PIL.
    """

    def __init__(self, strength: float) -> None:
        jitter_ranges(strength)  # validate now, not at the first batch
        self.strength = strength

    def draw(self, n: int, height: int, width: int, generator: torch.Generator | None) -> SimclrParams:
        return draw_simclr_params(n, height, width, generator, self.strength)

    def __call__(self, images: torch.Tensor, params: SimclrParams) -> torch.Tensor:
        return apply_simclr(images, params)

    def torchvision_steps(self, size: int) -> list:
        from torchvision import transforms as T

        s = self.strength
        return [
            T.RandomResizedCrop(size, CROP_SCALE, CROP_RATIO),
            T.RandomHorizontalFlip(FLIP_P),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=JITTER_P),
            T.RandomGrayscale(GRAY_P),
            T.GaussianBlur(blur_kernel_size(size), SIGMA_RANGE),
        ]


__all__ = [
    "SimclrAugment",
    "SimclrParams",
    "apply_simclr",
    "blur_kernel_size",
    "draw_crop_boxes",
    "draw_simclr_params",
    "simclr_views",
]
