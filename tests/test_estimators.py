"""theta's gradient estimators. DisARM is unbiased for d E_q[loss] / d theta: its mean over many
steps matches the exact gradient, got by enumerating every gate sample; the straight-through
estimator's (fit's default) does not (the bias docs/method.md derives). DisARM refuses, with the
fix, the batches and losses it cannot use."""
from __future__ import annotations

import importlib
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vpsurgery
from vpsurgery.config import make_config
from vpsurgery.train.pruner import Pruner

fit_module = importlib.import_module("vpsurgery.train.fit")  # the package's `fit` is the function

THETA = [0.3, 0.6, 0.85]


def tiny():
    """One gated group of 3 hidden units, theta set inside (0, 1), and a batch of 6."""
    torch.manual_seed(0)
    gm = vpsurgery.wrap(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5)), torch.randn(2, 4))
    (gate,) = vpsurgery.gates(gm).values()
    gate.set(THETA)
    x, y = 2 * torch.randn(6, 4), torch.randint(0, 5, (6,))
    return gm, gate, x, y


def exact_gradient(gm, gate, x, y) -> torch.Tensor:
    """d/d theta of mean_i E_{z_i ~ Bern(theta)} loss_i(z_i), by summing over all 2^3 samples."""
    theta = gate.theta.detach().clone().requires_grad_(True)
    expected = 0.0
    gm.train()
    for bits in itertools.product((0.0, 1.0), repeat=len(THETA)):
        z = torch.tensor(bits)
        gate.fixed_sample = z.expand(len(x), -1)
        with torch.no_grad():
            losses = F.cross_entropy(gm(x), y, reduction="none")
        prob = torch.prod(torch.where(z > 0, theta, 1 - theta))
        expected = expected + prob * losses.mean()
    gate.fixed_sample = None
    expected.backward()
    return theta.grad


def mean_estimate(step, gm, gate, x, y, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over n steps of the loss part of theta's gradient (the regulariser's
    own gradient, deterministic, is subtracted)."""
    pruner = Pruner(gm, 1000, steps_per_epoch=1, price=0.0)
    gate.theta.grad = None
    pruner.loss().backward()
    reg = gate.theta.grad.clone()
    run = SimpleNamespace(pruner=pruner, model=gm)
    torch.manual_seed(1)
    draws = []
    for _ in range(n):
        gm.zero_grad(set_to_none=True)
        step(run, (x, y), F.cross_entropy, torch.device("cpu"))
        draws.append(gate.theta.grad - reg)
    draws = torch.stack(draws)
    return draws.mean(0), draws.std(0) / n ** 0.5


def test_disarm_is_unbiased_and_straight_through_is_not():
    gm, gate, x, y = tiny()
    assert gate.per_example  # every example is its own antithetic pair
    exact = exact_gradient(gm, gate, x, y)
    assert exact.abs().max() > 1e-2  # a gradient worth estimating
    disarm, err = mean_estimate(fit_module._disarm_step, gm, gate, x, y, 800)
    assert ((disarm - exact).abs() <= 4 * err + 1e-4).all(), (disarm, exact, err)
    straight, err_st = mean_estimate(fit_module._straight_through_step, gm, gate, x, y, 300)
    assert ((straight - exact).abs() > 4 * err_st + 1e-4).any(), (straight, exact, err_st)


def test_disarm_refuses_batches_and_losses_it_cannot_use():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    disarm = make_config(None, {"estimator": "disarm", "target": 0.5})
    fit_module.check_estimator(disarm, (x, y), F.cross_entropy)  # per-example losses: fine
    fit_module.check_estimator(make_config(None, {}), {"x": x}, lambda model, batch: 0.0)  # straight-through: anything
    with pytest.raises(ValueError, match="dict batch.*straight_through"):
        fit_module.check_estimator(disarm, {"x": x, "labels": y}, lambda model, batch: 0.0)
    with pytest.raises(ValueError, match="reduction=.*straight_through"):
        fit_module.check_estimator(disarm, (x, y), lambda out, target: F.cross_entropy(out, target))
    with pytest.raises(ValueError, match="reduction="):  # a loss module's forward takes no reduction=
        fit_module.check_estimator(disarm, (x, y), nn.CrossEntropyLoss())


def test_the_estimator_setting_is_checked():
    with pytest.raises(ValueError, match="estimator"):
        make_config(None, {"estimator": "reinforce"})
