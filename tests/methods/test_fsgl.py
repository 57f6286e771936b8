"""FSGL's parts against hand-computed values: the FSM, the CutMix box, the losses, alpha(e), the
two-stream batches, and one SAM step of the whole objective."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltrepro.config import StageConfig
from ltrepro.data.base import Split
from ltrepro.data.loader import DeviceLoader
from ltrepro.data.samplers import power_probabilities
from ltrepro.features import class_ranks, cutmix_box, fcc_factors, fcc_scale, paste_box
from ltrepro.losses import functional as LF
from ltrepro.methods.fsgl import FSGLConfig, FSGLNetwork, FSGLObjective, TwoStreamBatch, TwoStreamLoader, cumulative_alpha
from ltrepro.optim import SharpnessAwareUpdate, build_optimizer


def test_fsm_scale_is_the_soft_label_times_the_factor_table():
    tau10 = fcc_factors(10, 0.5)
    assert torch.allclose(tau10, torch.tensor([1.5, 1.45, 1.4, 1.35, 1.3, 1.25, 1.2, 1.15, 1.1, 1.05]))
    soft = 0.3 * F.one_hot(torch.tensor([0]), 10).float() + 0.7 * F.one_hot(torch.tensor([9]), 10).float()
    assert fcc_scale(torch.ones(1, 4), soft, tau10)[0, 0].item() == pytest.approx(1.185)
    tau100 = fcc_factors(100, 1.0)
    soft = 0.5 * F.one_hot(torch.tensor([0]), 100).float() + 0.5 * F.one_hot(torch.tensor([99]), 100).float()
    assert fcc_scale(torch.ones(1, 2), soft, tau100)[0, 1].item() == pytest.approx(1.505)
    # by frequency rank, not class index (FS5): with class 9 the largest, it gets the head's 1.5
    ranked = fcc_factors(10, 0.5, class_ranks([5, 6, 7, 8, 9, 10, 11, 12, 13, 100]))
    assert ranked[9].item() == pytest.approx(1.5) and ranked[0].item() == pytest.approx(1.05)


@pytest.mark.parametrize("lam, side", [(0.75, 16), (0.5, 22), (0.0, 32)])
def test_cutmix_box_follows_the_reference_rule(lam, side):
    y0, y1, x0, x1 = cutmix_box(32, 32, lam, 16, 16)
    assert (y1 - y0, x1 - x0) == (side, side)  # ceil(32 sqrt(1 - lam)) spans 2 * (side // 2): 23 -> 22
    assert cutmix_box(32, 32, 0.75, 0, 31) == (0, 8, 23, 32)  # clipped at the border


def test_paste_box_takes_the_box_from_the_source_only():
    target, source = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    mixed = paste_box(target, source, (1, 3, 0, 2))
    assert mixed.sum() == 2 * 4 and torch.equal(mixed[:, :, 1:3, 0:2], torch.ones(2, 1, 2, 2))
    assert target.sum() == 0  # inputs untouched


def test_soft_cross_entropy_keeps_unnormalised_targets():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax (0.25, 0.75)
    q = torch.tensor([[0.5, 1.0]])  # sums to 1.5: not renormalised
    expected = -(0.5 * math.log(0.25) + 1.0 * math.log(0.75))
    assert LF.soft_cross_entropy(logits, q).item() == pytest.approx(expected)
    labels = torch.tensor([1, 0])
    z = torch.randn(2, 3)
    assert LF.soft_cross_entropy(z, F.one_hot(labels, 3).float()).item() == pytest.approx(F.cross_entropy(z, labels).item(), rel=1e-6)


def test_label_weights_follow_the_power_of_the_counts():
    assert LF.power_class_weights([100, 25], 1.0).tolist() == pytest.approx([0.4, 1.6])
    assert LF.power_class_weights([100, 25], 1.2).tolist() == pytest.approx([0.3186, 1.6814], abs=1e-4)
    assert LF.power_class_weights([7, 3, 1], 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_simsiam_consistency_values_and_stop_gradient():
    z = torch.randn(5, 8)
    p = (2 * z).requires_grad_()
    assert LF.simsiam_consistency(p, z, p, z).item() == pytest.approx(-2.0)
    orthogonal = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert LF.simsiam_consistency(orthogonal[0], orthogonal[1], orthogonal[0], orthogonal[1]).item() == pytest.approx(0.0)
    z_a, z_b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    p_a, p_b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    LF.simsiam_consistency(p_a, z_a, p_b, z_b).backward()
    assert z_a.grad is None and z_b.grad is None and p_a.grad is not None and p_b.grad is not None


def test_cumulative_alpha():
    assert [cumulative_alpha(e, 200) for e in (0, 100, 199)] == pytest.approx([1.0, 0.75, 0.009975])


def test_resampled_stream_draws_classes_by_the_power_of_their_counts():
    counts = np.array([60, 30, 10])
    assert power_probabilities(counts, 1.0).tolist() == pytest.approx([0.6, 0.3, 0.1])  # rho_s = 0: instance
    assert power_probabilities(counts, 0.0).tolist() == pytest.approx([1 / 3] * 3)  # rho_s = 1: balanced
    labels = np.repeat(np.arange(3), counts)
    split = Split(labels, torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8))
    augmented = DeviceLoader(split, 100, torch.device("cpu"), (0.0,), (1.0,), FakeAugment(), class_power=0.0)
    frequencies = np.concatenate(
        [y.numpy() for e in range(30) for _, y in augmented.epoch(e, torch.Generator().manual_seed(e))]
    )
    assert np.bincount(frequencies, minlength=3) / len(frequencies) == pytest.approx([1 / 3] * 3, abs=0.02)


class FakeAugment:
    """An augmenter that draws nothing and changes nothing."""

    def draw(self, n, height, width, generator):
        return {}

    def __call__(self, images, randoms):
        return images


def tiny_network(num_classes=3, projection_dim=4):
    backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
    torch.manual_seed(0)
    return FSGLNetwork(backbone, 6, num_classes, projection_dim)


def batch(n=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(n, 1, size, size, generator=g) for _ in range(4)]
    labels, other = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 0])
    return TwoStreamBatch((images[0], images[1]), (images[2], images[3]), other), labels


def hand_loss(model, data, labels, rng, fsgl, factors, weights, alpha):
    """The FSGL loss written out from the method card, independently of FSGLObjective."""
    (o1, o2), (r1, r2), y_r = data.instance, data.resampled, data.resampled_labels
    lam = rng.beta(fsgl.mix_alpha, fsgl.mix_alpha)
    cy, cx = rng.integers(8), rng.integers(8)
    side = math.ceil(8 * math.sqrt(1 - lam)) // 2
    y0, y1, x0, x1 = max(cy - side, 0), min(cy + side, 8), max(cx - side, 0), min(cx + side, 8)
    x_cut = o2.clone()
    x_cut[:, :, y0:y1, x0:x1] = r2[:, :, y0:y1, x0:x1]
    e_o, e_r = F.one_hot(labels, 3).float(), F.one_hot(y_r, 3).float()
    soft = lam * e_o + (1 - lam) * e_r
    weighted = lam * weights[labels, None] * e_o + (1 - lam) * weights[y_r, None] * e_r
    outs = []
    for x in (lam * o1 + (1 - lam) * r1, x_cut):
        f = model.features(x) * (soft @ factors)[:, None]
        z = model.projector(f)
        outs.append((model.plain_head(f), model.head(f), z, model.predictor(z)))
    ce = lambda z, q: -(q * z.log_softmax(1)).sum(1).mean()  # noqa: E731
    balanced = ce(outs[0][0], soft) + ce(outs[1][0], soft)
    rebalanced = ce(outs[0][1], weighted) + ce(outs[1][1], weighted)
    cos = lambda p, z: F.cosine_similarity(p, z.detach(), dim=1).mean()  # noqa: E731
    consistency = -cos(outs[0][3], outs[1][2]) - cos(outs[1][3], outs[0][2])
    return alpha * balanced + (1 - alpha) * rebalanced, consistency


def test_objective_equals_the_loss_written_out_and_sam_first_pass_drops_the_consistency_term():
    fsgl = FSGLConfig(contrast_weight=4.0, label_weighting=1.2)
    factors, weights = fcc_factors(3, 0.5), LF.power_class_weights([50, 20, 5], 1.2).float()
    objective = FSGLObjective(fsgl, factors, weights, epochs=10, num_classes=3)
    objective.set_epoch(4)
    model, (data, labels) = tiny_network(), batch()
    total = objective(model, data, labels, np.random.default_rng(7))
    classification, consistency = hand_loss(model, data, labels, np.random.default_rng(7), fsgl, factors, weights, 1 - 0.16)
    assert total.item() == pytest.approx((classification + 4.0 * consistency).item(), rel=1e-5)
    first_pass = objective.perturbation_loss(model, data, labels, np.random.default_rng(7))
    assert first_pass.item() == pytest.approx(classification.item(), rel=1e-5)
    metrics = objective.epoch_metrics()
    assert metrics["fsgl_alpha"] == pytest.approx(0.84) and metrics["loss_consistency"] == pytest.approx(consistency.item(), rel=1e-5)
    with_term = FSGLObjective(FSGLConfig(perturb_with_consistency=True), factors, weights, 10, 3)
    with_term.set_epoch(4)
    assert with_term.perturbation_loss(model, data, labels, np.random.default_rng(7)).item() == pytest.approx(total.item(), rel=1e-5)


def test_no_fsm_when_gamma_is_zero_and_test_time_reads_the_reweighted_head_unscaled():
    model, (data, labels) = tiny_network(), batch()
    weights = torch.ones(3)
    plain = FSGLObjective(FSGLConfig(), None, weights, 10, 3)
    scaled = FSGLObjective(FSGLConfig(), fcc_factors(3, 0.5), weights, 10, 3)
    assert plain(model, data, labels, np.random.default_rng(1)) != scaled(model, data, labels, np.random.default_rng(1))
    model.eval()
    x = data.instance[0]
    assert torch.equal(model(x), model.head(model.features(x)))  # fc_cb on the unscaled feature


def test_one_sam_step_trains_the_projector_and_returns_the_weights_before_the_real_step():
    """The published SAM crashes here: projector and predictor get no first-pass gradient (FS1)."""
    model, (data, labels) = tiny_network(), batch()
    objective = FSGLObjective(FSGLConfig(), fcc_factors(3, 0.5), torch.ones(3), 10, 3)
    objective.set_epoch(0)
    stage = StageConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    optimizer = build_optimizer(stage, [{"params": list(model.parameters())}])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state

    def loss_fn(perturbation_pass):
        rng.bit_generator.state = state
        return (objective.perturbation_loss if perturbation_pass else objective)(model, data, labels, rng)

    SharpnessAwareUpdate(rho=0.05).step(optimizer, loss_fn)
    after = model.state_dict()
    assert not torch.equal(after["projector.weight"], before["projector.weight"])
    assert not torch.equal(after["predictor.weight"], before["predictor.weight"])
    # plain SGD with lr 0.1 on the second pass's gradient g2 (still in .grad): w_new = w - 0.1 g2,
    # so the weights were restored from w + eps before the real step, projector included
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.detach(), before[name] - 0.1 * parameter.grad, atol=1e-6), name


def test_two_stream_loader_pairs_two_views_of_each_stream_with_both_labels():
    labels = np.repeat(np.arange(3), [8, 4, 2])
    images = torch.arange(len(labels), dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 4, 4).clone()
    split = Split(labels, images)
    stream = lambda **kw: DeviceLoader(split, 5, torch.device("cpu"), (0.0,), (1.0,), FakeAugment(), views=2, **kw)  # noqa: E731
    loader = TwoStreamLoader(stream(), stream(class_power=0.0))
    batches = list(loader.epoch(0, torch.Generator().manual_seed(0)))
    assert len(batches) == len(loader) == 3
    def index(images):
        return (images[:, 0, 0, 0] * 255).round().long()

    for data, y in batches:
        (first, second), (r1, r2) = data.instance, data.resampled
        assert torch.equal(first, second) and torch.equal(r1, r2)  # FakeAugment: two identical views
        assert torch.equal(torch.from_numpy(labels)[index(first)], y)
        assert torch.equal(torch.from_numpy(labels)[index(r1)], data.resampled_labels)
    instance = torch.cat([index(d.instance[0]) for d, _ in batches])
    assert sorted(instance.tolist()) == list(range(len(labels)))  # the instance stream is a permutation
