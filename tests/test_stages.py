import numpy as np
import pytest
import torch
from torch import nn

from ltrepro.config import AugmentConfig, StageConfig
from ltrepro.data.base import Split
from ltrepro.data.loader import DeviceLoader, fixed_seed_generator
from ltrepro.stages import FrozenBackbone, PairedLoader, stage_fcc_factors


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("bn, stats_move, test_uses_batch", [("eval", False, False), ("shift", True, False), ("batch", True, True)])
def test_frozen_backbone_bn_modes(bn, stats_move, test_uses_batch):
    frozen = FrozenBackbone(backbone(), bn)
    before = frozen.backbone[1].running_mean.clone()
    images = torch.randn(8, 1, 5, 5) + 3.0
    frozen.train()
    out = frozen(images)
    assert not out.requires_grad and all(not p.requires_grad for p in frozen.parameters())
    assert torch.equal(frozen.backbone[1].running_mean, before) != stats_move
    frozen.eval()
    reference = backbone()
    reference.load_state_dict(frozen.backbone.state_dict())
    reference.train(test_uses_batch)
    assert torch.allclose(frozen(images), reference(images))


def test_paired_loader_streams_are_balanced_and_instance_sampled():
    labels = np.repeat(np.arange(3), [90, 9, 1])
    images = torch.arange(100, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 4, 4).clone()
    plain = AugmentConfig(crop_padding=0, flip=False, cutout=0)

    def loader(sampler):
        return DeviceLoader(Split(labels, images), 25, torch.device("cpu"), (0.0,), (1 / 255,), plain, sampler, 1)

    paired = PairedLoader(loader("class_balanced"), loader("instance"))
    fused_labels, fusing_ids = [], []
    for epoch in range(30):
        for (fused, fusing), y in paired.epoch(epoch, fixed_seed_generator(0, epoch)):
            assert fused.shape == fusing.shape and torch.equal(torch.from_numpy(labels)[fused[:, 0, 0, 0].round().long()], y)
            fused_labels.append(y)
            fusing_ids.append(fusing[:, 0, 0, 0].round().long())
    fused_share = np.bincount(torch.cat(fused_labels).numpy(), minlength=3) / 3000
    fusing_share = np.bincount(labels[torch.cat(fusing_ids).numpy()], minlength=3) / 3000
    assert np.allclose(fused_share, [1 / 3] * 3, atol=0.03)  # fused: class-balanced
    assert np.allclose(fusing_share, [0.9, 0.09, 0.01], atol=1e-9)  # fusing: every image once an epoch
    again = [y for _, y in paired.epoch(0, fixed_seed_generator(0, 0))]
    assert all(torch.equal(a, b) for a, b in zip(again, fused_labels[:4], strict=True))


def test_fcc_factors_follow_frequency_rank_unless_by_index():
    """FC2: on counts [50, 1, 2500] the head is class 2; by index (the released code) class 0 gets 1 + gamma.
    gamma 0.6, C 3: tau_k = round(1.6 - 0.2 k, 2) = [1.6, 1.4, 1.2] for rank k."""
    counts = [50, 1, 2500]
    by_rank = stage_fcc_factors(StageConfig(fcc=0.6), counts)
    by_index = stage_fcc_factors(StageConfig(fcc=0.6, fcc_by_index=True), counts)
    assert torch.allclose(by_rank, torch.tensor([1.4, 1.2, 1.6]))
    assert torch.allclose(by_index, torch.tensor([1.6, 1.4, 1.2]))
    assert torch.equal(stage_fcc_factors(StageConfig(fcc=0.6, fcc_by_index=True), [2500, 50, 1]),
                       stage_fcc_factors(StageConfig(fcc=0.6), [2500, 50, 1]))  # sorted ids: the same table
