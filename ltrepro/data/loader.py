"""Batches for training and evaluation.

In-memory datasets (CIFAR, Fashion-MNIST) live on the training device as one uint8 tensor and
are augmented there batch-wise: random crop after zero padding, horizontal flip, optional
cutout, normalisation (docs/methods/README.md#augmentation). Every random number of an epoch is
drawn up front from the epoch's seeded CPU generator and moved once, so there is no per-sample
Python and a resumed run sees exactly the batches of an uninterrupted one. Datasets on disk use a
DataLoader with workers and torchvision transforms.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ltrepro.config import AugmentConfig
from ltrepro.data.base import LTData, Split
from ltrepro.data.samplers import epoch_indices, power_probabilities, weighted_indices
from ltrepro.errors import LtreproError

Batch = tuple[torch.Tensor, torch.Tensor]


def augment_batch(
    images: torch.Tensor,
    shift_y: torch.Tensor,
    shift_x: torch.Tensor,
    flip: torch.Tensor,
    cutout_centre: torch.Tensor,
    augment: AugmentConfig,
) -> torch.Tensor:
    """Crop, flip and cut out a float batch N x C x H x W in one pass of tensor ops.

    shift_y/x in [0, 2 * padding] pick each crop's corner in the zero-padded image; flip is a bool
    per image; cutout_centre (N x 2) is the centre of a zeroed square of side ``augment.cutout``.
    """
    n, _, h, w = images.shape
    pad = augment.crop_padding
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = (shift_y[:, None] + torch.arange(h, device=images.device))[:, :, None]
        cols = (shift_x[:, None] + torch.arange(w, device=images.device))[:, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None]
        images = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced dims come first
    if augment.flip:
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if augment.cutout:
        # A side x side square with rows/cols [centre - side//2, centre + side - side//2), clipped
        # at the border (DeVries & Taylor 2017, Cutout).
        low, high = -(augment.cutout // 2), augment.cutout - augment.cutout // 2
        ys = torch.arange(h, device=images.device)[None, :, None] - cutout_centre[:, 0, None, None]
        xs = torch.arange(w, device=images.device)[None, None, :] - cutout_centre[:, 1, None, None]
        inside = (ys >= low) & (ys < high) & (xs >= low) & (xs < high)
        images = images.masked_fill(inside[:, None], 0.0)
    return images


class CropFlip:
    """The CIFAR recipe as an augmenter: random crop after zero padding, flip, cutout.

    An augmenter draws every random number of ``n`` images from a CPU generator (``draw``) and
    applies them batch-wise on the device (``__call__`` on a float batch in [0, 1] and the batch's
    slice of the draws), so the loader never loops over samples.
    """

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    def draw(self, n: int, height: int, width: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        span = 2 * self.config.crop_padding + 1
        return {
            "shift_y": torch.randint(span, (n,), generator=generator),
            "shift_x": torch.randint(span, (n,), generator=generator),
            "flip": torch.rand(n, generator=generator) < 0.5,
            "cutout_centre": torch.stack(
                [torch.randint(height, (n,), generator=generator), torch.randint(width, (n,), generator=generator)], 1
            ),
        }

    def __call__(self, images: torch.Tensor, randoms: dict[str, torch.Tensor]) -> torch.Tensor:
        return augment_batch(images, **randoms, augment=self.config)


def training_order(loader: "DeviceLoader | FileLoader", generator: torch.Generator | None, epoch: int) -> torch.Tensor:
    """One epoch of a training loader's indices: stored order (``ordered``), draws ∝ n_c^q
    (``class_power``), or its sampler's."""
    labels = loader.label_array
    if loader.ordered:
        return torch.arange(len(labels))
    if loader.class_power is not None:
        return weighted_indices(labels, power_probabilities(np.bincount(labels), loader.class_power), generator)
    return epoch_indices(labels, loader.sampler, generator, epoch, loader.total_epochs)


def moved(draws, device: torch.device):
    """An augmenter's draws (a dict of tensors or an object with ``to``) on ``device``."""
    if isinstance(draws, dict):
        return {key: value.to(device, non_blocking=True) for key, value in draws.items()}
    return draws.to(device)


def sliced(draws, window: slice):
    return {key: value[window] for key, value in draws.items()} if isinstance(draws, dict) else draws[window]


class DeviceLoader:
    """Batches from a uint8 tensor resident on ``device``; augmentation when ``augment`` is given.

    ``augment`` is the CIFAR recipe's config or any augmenter (``CropFlip``'s interface, e.g.
    ``ltrepro.data.simclr.SimclrAugment``). With ``views`` > 1 each batch holds that many
    independently augmented views of the same images, as a tuple. ``class_power`` q replaces the
    sampler by draws with replacement, class c with probability ∝ n_c^q; ``drop_last`` keeps
    only full batches; ``ordered`` augments the images in their stored order (scoring passes).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: AugmentConfig | CropFlip | None = None,
        sampler: str = "instance",
        total_epochs: int = 1,
        views: int = 1,
        class_power: float | None = None,
        drop_last: bool = False,
        ordered: bool = False,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.label_array = split.labels
        self.batch_size, self.device = batch_size, device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.augment = CropFlip(augment) if isinstance(augment, AugmentConfig) else augment
        self.sampler, self.total_epochs = sampler, total_epochs
        self.views, self.class_power, self.drop_last, self.ordered = views, class_power, drop_last, ordered
        self.channels_last = device.type == "cuda"

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        images = (images - self.mean) / self.std
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def epoch(self, epoch: int = 0, generator: torch.Generator | None = None) -> Iterator[Batch]:
        n = len(self.labels)
        if self.augment is None:
            order, draws = torch.arange(n), []
        else:
            order = training_order(self, generator, epoch)
            h, w = self.images.shape[2:]
            draws = [moved(self.augment.draw(n, h, w, generator), self.device) for _ in range(self.views)]
        order = order.to(self.device, non_blocking=True)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index].float().div_(255)
            if self.augment is None:
                yield self._normalise(images), self.labels[index]
                continue
            window = slice(start, start + len(index))
            views = [self._normalise(self.augment(images, sliced(view, window))) for view in draws]
            yield (views[0] if self.views == 1 else tuple(views)), self.labels[index]


class ImageFiles(torch.utils.data.Dataset):
    """Images on disk, decoded and transformed in DataLoader workers."""

    def __init__(self, split: Split, transform, mode: str, views: int = 1) -> None:
        self.paths, self.labels, self.transform, self.mode = split.paths, split.labels, transform, mode
        self.views = views

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            with Image.open(self.paths[index]) as image:
                image = image.convert(self.mode)
        except (OSError, UnidentifiedImageError) as exc:
            raise LtreproError(f"cannot read image {self.paths[index]}: {exc}") from None
        if self.views > 1:
            return tuple(self.transform(image) for _ in range(self.views)), int(self.labels[index])
        return self.transform(image), int(self.labels[index])


class FileLoader:
    """A torchvision DataLoader with the ImageNet recipe (docs/methods/README.md#augmentation), shared samplers.

    An augmenter with ``torchvision_steps(image_size)`` (SimCLR's) replaces the recipe's training
    transforms; ``views``, ``class_power`` and ``drop_last`` as for ``DeviceLoader``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int,
        train: bool,
        num_workers: int,
        sampler: str = "instance",
        total_epochs: int = 1,
        views: int = 1,
        class_power: float | None = None,
        drop_last: bool = False,
        augment=None,
        ordered: bool = False,
    ) -> None:
        from torchvision import transforms as T

        if train and hasattr(augment, "torchvision_steps"):
            steps = augment.torchvision_steps(image_size)
        elif train:
            steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0)]
        else:
            steps = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
        transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
        self.dataset = ImageFiles(split, transform, "L" if len(mean) == 1 else "RGB", views if train else 1)
        self.label_array, self.train = split.labels, train
        self.batch_size, self.device, self.num_workers = batch_size, device, num_workers
        self.sampler, self.total_epochs = sampler, total_epochs
        self.class_power, self.drop_last, self.ordered = class_power, drop_last and train, ordered

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int = 0, generator: torch.Generator | None = None) -> Iterator[Batch]:
        if self.train:
            order = training_order(self, generator, epoch).tolist()
            worker_seed = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        else:
            order, worker_seed = range(len(self.dataset)), None
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            generator=worker_seed,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            drop_last=self.drop_last,
        )
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

        def to_device(images: torch.Tensor) -> torch.Tensor:
            return images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)

        for images, labels in loader:
            images = tuple(map(to_device, images)) if isinstance(images, (list, tuple)) else to_device(images)
            yield images, labels.to(self.device, non_blocking=True)


def make_loader(
    data: LTData,
    split: str,
    batch_size: int,
    device: torch.device,
    augment: AugmentConfig | CropFlip | None = None,
    sampler: str = "instance",
    total_epochs: int = 1,
    num_workers: int = 2,
    in_order: bool = False,
    **options,
) -> DeviceLoader | FileLoader:
    """The loader for ``split`` ("train", "val" or "test"): augmented and sampled only for train,
    unless ``in_order`` (the training images read like an evaluation split, as a readout needs).
    ``options`` (views, class_power, drop_last, ordered) apply to training loaders."""
    train = split == "train" and not in_order
    return split_loader(getattr(data, split), data, batch_size, device, augment if train else None, sampler, total_epochs,
                        num_workers, train, **(options if train else {}))  # fmt: skip


def split_loader(
    part: Split, data: LTData, batch_size: int, device: torch.device, augment=None, sampler: str = "instance",
    total_epochs: int = 1, num_workers: int = 2, train: bool = True, **options,
) -> DeviceLoader | FileLoader:  # fmt: skip
    """A loader over any split of ``data`` (a subset of its training images, say), with its normalisation."""
    if part.in_memory:
        return DeviceLoader(part, batch_size, device, data.mean, data.std, augment, sampler, total_epochs, **options)
    return FileLoader(
        part, batch_size, device, data.mean, data.std, data.image_size, train, num_workers, sampler, total_epochs,
        augment=augment, **options,
    )  # fmt: skip


def fixed_seed_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *salt): epoch e of a run always draws the same numbers."""
    mixed = np.random.SeedSequence([seed, *salt]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))
