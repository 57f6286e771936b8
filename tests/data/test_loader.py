import numpy as np
import pytest
import torch

from ltrepro.config import AugmentConfig
from ltrepro.data.base import Split
from ltrepro.data.loader import DeviceLoader, augment_batch, fixed_seed_generator
from ltrepro.data.samplers import class_probabilities, epoch_indices


def numbered_images(n: int, size: int = 6) -> torch.Tensor:
    """N x 1 x size x size float images whose pixel (i, j) is 10 i + j, so crops are readable."""
    grid = (10 * torch.arange(size)[:, None] + torch.arange(size)[None, :]).float()
    return grid.expand(n, 1, size, size).clone()


def test_centred_crop_is_identity_and_shift_moves_content():
    images = numbered_images(2)
    aug = AugmentConfig(crop_padding=2, flip=False, cutout=0)
    none = torch.zeros(2, dtype=torch.bool)
    centres = torch.zeros(2, 2, dtype=torch.long)
    same = augment_batch(images, torch.tensor([2, 2]), torch.tensor([2, 2]), none, centres, aug)
    assert torch.equal(same, images)
    shifted = augment_batch(images, torch.tensor([3, 0]), torch.tensor([2, 4]), none, centres, aug)
    assert shifted.shape == images.shape
    # image 0 moved down one row in the padded frame: its first row shows source row 1
    assert torch.equal(shifted[0, 0, 0], images[0, 0, 1])
    assert torch.equal(shifted[0, 0, -1], torch.zeros(6))  # zero padding entered at the bottom
    # image 1: rows shifted up by two (zeros on top), columns by +2 (zeros on the right)
    assert torch.equal(shifted[1, 0, :2], torch.zeros(2, 6))
    assert torch.equal(shifted[1, 0, 2, :4], images[1, 0, 0, 2:])
    assert torch.equal(shifted[1, 0, 2, 4:], torch.zeros(2))


def test_flip_and_cutout():
    images = numbered_images(2)
    aug = AugmentConfig(crop_padding=0, flip=True, cutout=2)
    flips = torch.tensor([True, False])
    centres = torch.tensor([[0, 0], [3, 3]])
    out = augment_batch(images, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), flips, centres, aug)
    assert torch.equal(out[0, 0, 2], images[0, 0, 2].flip(0))
    assert torch.equal(out[1, 0, 1], images[1, 0, 1])
    # side 2 centred at (3, 3) zeroes rows and columns 2..3 of image 1 (its pixel (0, 0) is 0 anyway)
    assert torch.equal(out[1, 0, 2:4, 2:4], torch.zeros(2, 2)) and (out[1] == 0).sum() == 5
    # image 0 is flipped (its own 0 moves to (0, 5)); cutout at (0, 0) is clipped to that one pixel
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 5] == 0 and (out[0] == 0).sum() == 2


def make_loader(sampler: str = "instance", augment: AugmentConfig | None = AugmentConfig(cutout=4)) -> DeviceLoader:
    labels = np.repeat(np.arange(4), [40, 20, 8, 4])
    images = torch.arange(len(labels), dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 8, 8).clone()
    return DeviceLoader(Split(labels, images), 16, torch.device("cpu"), (0.5,), (0.25,), augment, sampler, 10)


def collect(loader: DeviceLoader, seed: int, epoch: int = 0):
    batches = list(loader.epoch(epoch, fixed_seed_generator(seed, epoch)))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_device_loader_shapes_normalisation_and_determinism():
    loader = make_loader()
    images, labels = collect(loader, seed=3)
    assert images.shape == (72, 1, 8, 8) and images.dtype == torch.float32 and len(loader) == 5
    again_images, again_labels = collect(loader, seed=3)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    other_images, _ = collect(loader, seed=4)
    assert not torch.equal(images, other_images)
    assert not torch.equal(images, collect(loader, seed=3, epoch=1)[0])


def test_instance_sampler_visits_every_image_once():
    loader = make_loader(augment=AugmentConfig(crop_padding=0, flip=False, cutout=0))
    images, labels = collect(loader, seed=0)
    identities = torch.round(images[:, 0, 0, 0] * 0.25 * 255 + 0.5 * 255).long()  # undo normalisation
    assert sorted(identities.tolist()) == list(range(72))
    assert torch.equal(labels, torch.from_numpy(loader.label_array)[identities])


def test_eval_loader_is_ordered_and_unaugmented():
    loader = make_loader(augment=None)
    images, labels = collect(loader, seed=0)
    assert torch.equal(labels, torch.from_numpy(loader.label_array))
    assert torch.allclose(images[5], torch.full((1, 8, 8), (5 / 255 - 0.5) / 0.25))


def test_class_probabilities_by_hand():
    counts = np.array([100, 25, 4])
    assert np.allclose(class_probabilities(counts, "instance"), [100 / 129, 25 / 129, 4 / 129])
    assert np.allclose(class_probabilities(counts, "sqrt"), [10 / 17, 5 / 17, 2 / 17])
    assert np.allclose(class_probabilities(counts, "class_balanced"), [1 / 3] * 3)
    assert np.allclose(class_probabilities(counts, "progressive", 0, 11), class_probabilities(counts, "instance"))
    assert np.allclose(class_probabilities(counts, "progressive", 10, 11), [1 / 3] * 3)
    halfway = 0.5 * np.array([100, 25, 4]) / 129 + 0.5 / 3
    assert np.allclose(class_probabilities(counts, "progressive", 5, 11), halfway)


@pytest.mark.parametrize("kind, expected", [("class_balanced", [1 / 3] * 3), ("sqrt", [10 / 17, 5 / 17, 2 / 17])])
def test_epoch_indices_follow_the_class_probabilities(kind, expected):
    labels = np.repeat(np.arange(3), [100, 25, 4])
    draws = torch.cat([epoch_indices(labels, kind, torch.Generator().manual_seed(s)) for s in range(200)])
    frequencies = np.bincount(labels[draws.numpy()], minlength=3) / len(draws)
    assert np.allclose(frequencies, expected, atol=0.01)
