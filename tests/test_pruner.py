"""Pruner in your own loop is fit; fit with a target lands in the band; dict batches; settings are checked."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import vpsurgery
from vpsurgery.data import load_data
from vpsurgery.train import Pruner, fit, kept_macs, kept_params, seed_epoch

from test_fit import QUIET, student, teacher_data
from test_resume import SmallResNet


@pytest.fixture(scope="module")
def digits():
    data = load_data("digits")
    return data.train, data.val


def flat(dataset):
    x, y = zip(*[dataset[i] for i in range(len(dataset))])
    return TensorDataset(torch.stack(x).flatten(1), torch.stack(y))


def mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return vpsurgery.wrap(net, torch.randn(2, 64))


def cnn(seed=0):
    torch.manual_seed(seed)
    return vpsurgery.wrap(SmallResNet(), torch.randn(2, 1, 8, 8))


def train_loader(dataset, n=512, batch=64):
    return DataLoader(Subset(dataset, range(n)), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


# The same settings for fit and the own loop: a budget, in-training shrinks, one hardened epoch.
SETTINGS = {"epochs": 3, "harden": 0.34, "optimizer": "adam", "lr": 0.01, "theta_lr": 0.1, "target": 0.4, "per": "params",
            "prune_every": 3, "seed": 0, "estimator": "straight_through"}  # the own loop: one pass a step


def own_loop(gated, loader, settings):
    """The README's recipe, with fit's per-epoch seeding so that it is exactly fit's run."""
    pruner = Pruner(gated, len(loader.dataset), steps_per_epoch=len(loader), **settings)
    model = pruner.model
    opt = torch.optim.Adam(pruner.weights(), lr=settings["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=pruner.total_steps)
    for epoch in range(pruner.config.epochs):
        seed_epoch(loader, pruner.config.seed, epoch + 1)
        if epoch == pruner.hardening_epoch:  # the last epochs train the rounded network
            pruner.harden()
            model, opt = pruner.prune(opt)
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            (loss + pruner.loss()).backward()
            pruner.clip_gradients()
            opt.step()
            sched.step()
            opt.zero_grad()
            if pruner.step(loss):  # theta's step; True every prune_every steps
                model, opt = pruner.prune(opt)
        model, opt = pruner.prune(opt)
    seed_epoch(loader, pruner.config.seed, pruner.config.epochs + 1)
    vpsurgery.recalibrate_batchnorm(model, loader)
    return pruner


def test_the_own_loop_with_pruner_is_fit(digits):
    loader = train_loader(flat(digits[0]))
    gated = mlp()
    result = fit(gated, loader, device="cpu", progress=False, log=lambda line: None, **SETTINGS)
    pruner = own_loop(copy.deepcopy(gated), loader, SETTINGS)
    assert result.removed_units == pruner.removed_units and result.removed_units
    assert result.price == pruner.price
    assert result.decided_before_hardening == pruner.state.decided_before_hardening
    mine, fits = pruner.model.state_dict(), result.model.state_dict()
    assert mine.keys() == fits.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], fits[k], rtol=1e-6, atol=1e-7)
    # removed physically while training (at the latest when the last epoch starts), the optimizer carried
    assert pruner.state.removed_cost and pruner.state.removed_cost[0][0] <= pruner.stochastic_steps
    assert result.history[-1]["params"] < result.dense_params


@pytest.mark.parametrize("estimator", ["straight_through", "disarm"])
@pytest.mark.parametrize("make, data, per, target, accuracy", [
    pytest.param(mlp, "flat", "params", 0.3, 0.7, id="mlp-params"),
    # this 8-channel residual net reaches 0.87 dense in these 6 epochs; pruned: 0.66 measured
    pytest.param(cnn, "images", "flops", 0.5, 0.5, id="cnn-flops"),
])
def test_a_target_lands_in_the_band(make, data, per, target, accuracy, estimator, digits):
    train, val = digits
    if data == "flat":
        train, val = flat(train), flat(val)
    gated = make()
    result = fit(gated, train_loader(train, n=1024), DataLoader(val, batch_size=256), epochs=6, optimizer="adam",
                 lr=0.01, target=target, per=per, estimator=estimator, device="cpu", progress=False,
                 log=lambda line: None)
    small = vpsurgery.shrink(result.model)
    cost = kept_params if per == "params" else kept_macs
    share = cost(small) / cost(gated)
    assert abs(share - target) <= 0.1 * target, share
    assert result.history[-1]["val_acc"] > accuracy  # pruned to the budget, not broken
    assert result.price != vpsurgery.config.default("price")  # the price was found, not given
    sections = [g for g in vpsurgery.gates(result.model).values() if g.kind == "section"]
    assert not result.removed_sections and all(float(g.theta.detach()) == 1.0 for g in sections)  # widths only


def test_sections_move_with_a_price_and_stay_with_a_target_unless_asked():
    def moving_sections(**settings):
        pruner = Pruner(cnn(), 512, steps_per_epoch=8, **settings)
        moving = {id(t) for t in pruner.moving_thetas()}
        return sum(id(g.theta) in moving for g in vpsurgery.gates(pruner.model).values() if g.kind == "section")

    assert moving_sections() == 2  # the papers' residual sections
    assert moving_sections(target=0.5) == 0
    assert moving_sections(target=0.5, prune_sections=True) == 2
    gated = cnn()
    for g in vpsurgery.gates(gated).values():
        g.set(torch.full_like(g.theta, 0.7))
    pruner = Pruner(gated, 512, steps_per_epoch=8, target=0.5)  # a target: the sections pass everything
    assert all(float(g.theta) == 1.0 for g in vpsurgery.gates(gated).values() if g.kind == "section")
    pruner.harden()
    assert not vpsurgery.passes.shrink.Decision.below(pruner.model, 0.5).sections


def test_dict_batches_take_a_loss_of_model_and_batch():
    data = teacher_data(256)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"inputs": data.tensors[0][i], "labels": data.tensors[1][i], "name": "row"}

    loader = DataLoader(Dicts(), batch_size=64)

    def loss_fn(model, batch):  # Hugging Face style: an output object with .loss
        return SimpleNamespace(loss=F.mse_loss(model(batch["inputs"]), batch["labels"]))

    result = fit(student(), loader, loader, epochs=2, price=3.0, theta_lr=0.5, device="cpu",
                 **{**QUIET, "loss_fn": loss_fn})
    assert all(h["train_acc"] is None and h["val_acc"] is None for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    with pytest.raises(ValueError, match=r"a dict batch needs loss_fn\(model, batch\)"):
        fit(student(), loader, epochs=1, device="cpu", progress=False, log=lambda line: None)


def test_unknown_settings_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) learning_rate; settings: .*\blr\b.*fit's own: loss_fn"):
        fit(student(), DataLoader(teacher_data(64), batch_size=64), learning_rate=0.1, **QUIET)
    with pytest.raises(ValueError, match="unknown fit setting"):
        Pruner(student(), 64, steps_per_epoch=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="target must be in"):
        Pruner(student(), 64, steps_per_epoch=1, target=1.5)


def _train_steps(pruner, loader, steps):
    opt = torch.optim.SGD(pruner.weights(), lr=0.05)
    seen = 0
    while seen < steps:
        for x, y in loader:
            loss = F.cross_entropy(pruner.model(x), y) + pruner.loss()
            loss.backward()
            opt.step()
            opt.zero_grad()
            pruner.step()
            seen += 1
            if seen == steps:
                return


def test_theta_waits_for_the_weights_in_budget_mode(digits):
    """With a target, theta and the price stay put for at least THETA_WARMUP of the stochastic phase
    (random weights push every gate down through the loss itself); without one, theta moves from step 1."""
    from vpsurgery.train import pruner as pruner_module

    loader = train_loader(flat(digits[0]))
    budget = Pruner(mlp(), len(loader.dataset), steps_per_epoch=len(loader), epochs=5, target=0.3)
    stochastic = budget.stochastic_steps
    assert budget.warmup_steps == round(pruner_module.THETA_WARMUP * stochastic) > 0
    price0 = budget.price
    _train_steps(budget, loader, budget.warmup_steps)
    assert all(bool((t == 1).all()) for t in budget.thetas()) and budget.price == price0
    _train_steps(budget, loader, 3)
    assert any(bool((t < 1).any()) for t in budget.thetas())
    # given the loss, theta waits until its running mean has halved, or at most WARMUP_MAX of the phase
    stuck = Pruner(mlp(), len(loader.dataset), steps_per_epoch=len(loader), epochs=5, target=0.3)
    for _ in range(stuck.warmup_max_steps):
        assert stuck.goal == 1.0
        stuck.step(loss=2.3)  # a net that learns nothing
    assert stuck.state.theta_start is None
    stuck.step(loss=2.3)
    assert stuck.state.theta_start == stuck.warmup_max_steps
    learning = Pruner(mlp(), len(loader.dataset), steps_per_epoch=100, epochs=5, target=0.3)
    for i in range(learning.warmup_steps + 1):
        learning.step(loss=2.3 if i < 10 else 0.5)
    assert learning.state.theta_start == learning.warmup_steps < learning.warmup_max_steps
    assert learning.state_dict()["theta_start"] == learning.warmup_steps
    priced = Pruner(mlp(), len(loader.dataset), steps_per_epoch=len(loader), epochs=5, price=0.5)
    assert priced.warmup_steps == 0
    _train_steps(priced, loader, 2)
    assert any(bool((t < 1).any()) for t in priced.thetas())


def test_harden_defaults_to_half_the_run_with_a_target_and_a_fifth_with_a_price():
    from vpsurgery.config import FitConfig
    from vpsurgery.train.pruner import hardening_epoch

    assert hardening_epoch(FitConfig(epochs=10, target=0.3)) == 5
    assert hardening_epoch(FitConfig(epochs=10)) == 8
    assert hardening_epoch(FitConfig(epochs=10, target=0.3, harden=0.2)) == 8  # an explicit value wins


def test_clip_gradients_cuts_spikes_not_trends(digits):
    """A gradient norm above SPIKE_FACTOR times its running mean is scaled to that; the mean
    follows a steady change; it is saved with the Pruner's state."""
    from vpsurgery.train.pruner import SPIKE_FACTOR

    loader = train_loader(flat(digits[0]))
    pruner = Pruner(mlp(), len(loader.dataset), steps_per_epoch=len(loader), epochs=2, target=0.5)
    weights = pruner.weights()

    def norm_after(scale):
        for p in weights:
            p.grad = torch.full_like(p, scale)
        before = pruner.clip_gradients()
        return before, float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in weights])))

    base, after = norm_after(1.0)
    assert after == pytest.approx(base)  # the first norm only starts the mean
    for _ in range(5):
        assert norm_after(1.0)[1] == pytest.approx(base)
    before, after = norm_after(100.0)  # a spike: cut to SPIKE_FACTOR x the mean
    assert before == pytest.approx(100 * base) and after == pytest.approx(SPIKE_FACTOR * base, rel=1e-4)
    for _ in range(60):  # a trend: a norm twice the old one passes once the mean has followed
        norm_after(2.0)
    assert norm_after(2.0)[1] == pytest.approx(2 * base)
    state = pruner.state_dict()
    assert state["grad_norm"] == pytest.approx(pruner.state.grad_norm)
    other = Pruner(mlp(), len(loader.dataset), steps_per_epoch=len(loader), epochs=2, target=0.5)
    other.load_state_dict(state)
    assert other.state.grad_norm == pruner.state.grad_norm


def test_no_removal_below_the_target_before_hardening():
    """Removal cannot be undone: in the stochastic phase, structures at 0 that would leave less than
    the target stay (MNASNet at 50 % of its FLOPs kept 0.334 when they went); the rounding decides."""
    gated = mlp()
    pruner = Pruner(gated, 512, steps_per_epoch=8, target=0.5, per="params")
    first = vpsurgery.gates(gated)[sorted(vpsurgery.gates(gated))[0]]
    few = torch.ones(64)
    few[:8] = 0.0
    first.set(few)
    assert len(pruner.decision().units) == 8  # still above the target without them
    first.set(torch.zeros(64) + (torch.arange(64) < 4).float())  # 60 of 64 hidden units: far below it
    assert not pruner.decision()
    pruner.harden()  # the rounding puts back what fits, then they can go
    share = kept_params(vpsurgery.shrink(pruner.model)) / kept_params(mlp())
    assert abs(share - 0.5) <= 0.05, share
