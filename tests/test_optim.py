"""The stage plan's optimiser and update rules, against hand-computed weights."""
import math

import numpy as np
import pytest
import torch

from ltrepro import engine
from ltrepro.config import SamConfig, StageConfig
from ltrepro.optim import PlainUpdate, SharpnessAwareUpdate, build_optimizer, build_update
from ltrepro.readouts import LogitReadout
from ltrepro.stages import StagePlan


def toy_parameters():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    u = torch.nn.Parameter(torch.tensor([1.0]))
    return w, u


def loss_without_u_in_the_first_pass(w, u):
    """L1 = ||w||^2 / 2 at the perturbation pass (u gets no gradient), L2 = ||w||^2 / 2 + u^2 after."""
    return lambda perturbation_pass: 0.5 * (w**2).sum() + (0.0 if perturbation_pass else (u**2).sum())


def test_sam_step_equals_the_hand_computed_update_and_survives_a_parameter_without_first_pass_gradient():
    w, u = toy_parameters()
    optimizer = torch.optim.SGD([w, u], lr=0.1)
    loss = SharpnessAwareUpdate(rho=0.05).step(optimizer, loss_without_u_in_the_first_pass(w, u))
    # g1 = w = (3, 4), |g1| = 5: eps = 0.05 (0.6, 0.8) = (0.03, 0.04); u is neither perturbed nor restored.
    # g2 at w + eps = (3.03, 4.04); du = 2 u = 2. SGD from the restored w: w - 0.1 g2, u - 0.1 * 2.
    assert torch.allclose(w.detach(), torch.tensor([3 - 0.303, 4 - 0.404]), atol=1e-6)
    assert torch.allclose(u.detach(), torch.tensor([0.8]), atol=1e-7)
    assert loss.item() == pytest.approx(12.5)  # the loss at w, the first pass's


def test_adaptive_sam_scales_the_perturbation_by_the_weights():
    w, u = toy_parameters()
    optimizer = torch.optim.SGD([w], lr=0.1)
    SharpnessAwareUpdate(rho=0.05, adaptive=True).step(optimizer, lambda first: 0.5 * (w**2).sum())
    # T = |w|: T g = (9, 16), |T g| = sqrt(337); eps = rho T^2 g / |T g| = 0.05 (27, 64) / sqrt(337).
    eps = 0.05 * np.array([27.0, 64.0]) / math.sqrt(337.0)
    expected = np.array([3.0, 4.0]) - 0.1 * (np.array([3.0, 4.0]) + eps)
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-6)


def test_plain_update_is_one_sgd_step():
    w, u = toy_parameters()
    optimizer = torch.optim.SGD([w, u], lr=0.1)
    PlainUpdate().step(optimizer, loss_without_u_in_the_first_pass(w, u))
    assert torch.allclose(w.detach(), torch.tensor([2.7, 3.6])) and torch.allclose(u.detach(), torch.tensor([0.8]))


def test_build_update_follows_the_config():
    assert isinstance(build_update(StageConfig()), PlainUpdate)
    rule = build_update(StageConfig(update="sam", sam=SamConfig(rho=0.1, adaptive=True)))
    assert isinstance(rule, SharpnessAwareUpdate) and (rule.rho, rule.adaptive) == (0.1, True)


def test_adamw_exempts_1d_parameters_from_decay_and_keeps_group_lr():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stage = StageConfig(optimizer="adamw", lr=0.1, weight_decay=0.5, decay_1d=False, betas=[0.8, 0.99])
    optimizer = build_optimizer(stage, [{"params": list(model.parameters()), "lr": 0.2}])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.8, 0.99)
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in optimizer.param_groups] == [(1, 0.5, 0.2), (3, 0.0, 0.2)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: AdamW's step is the decoupled decay alone
    optimizer.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.2 * 0.5))
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name], before[name])


def test_sgd_decays_every_parameter_by_default():
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(StageConfig(lr=0.1, weight_decay=0.5, momentum=0.0), [{"params": list(model.parameters())}])
    assert isinstance(optimizer, torch.optim.SGD) and [g["weight_decay"] for g in optimizer.param_groups] == [0.5]


class RecordingObjective:
    """Draws a mixup-like lambda from the step's rng on every call and records it."""

    def __init__(self):
        self.draws = []

    def set_epoch(self, epoch):
        pass

    def __call__(self, model, images, labels, rng):
        lam = float(rng.beta(1.0, 1.0))
        self.draws.append(lam)
        return lam * model(images).pow(2).mean()


class TwoBatches:
    def __len__(self):
        return 2

    def epoch(self, epoch=0, generator=None):
        for _ in range(2):
            yield torch.ones(4, 3), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("update", [PlainUpdate(), SharpnessAwareUpdate(0.05)], ids=["plain", "sam"])
def test_both_sam_passes_replay_the_steps_draws(update):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    objective = RecordingObjective()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = StagePlan(model, objective, TwoBatches(), optimizer, update, LogitReadout())
    engine.run_epoch(plan, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), torch.device("cpu"), 0, 0, 1)
    plain = np.random.default_rng([0, 0, 1])
    expected = [float(plain.beta(1.0, 1.0)) for _ in range(2)]  # one draw a step, as a plain run makes
    passes = 2 if isinstance(update, SharpnessAwareUpdate) else 1
    assert objective.draws == [lam for lam in expected for _ in range(passes)]
