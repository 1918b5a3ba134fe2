"""fit: prunes to the known answer, shrinks exactly mid-training, slices optimizer state, resumes,
stops cleanly on divergence and on bad data, and refuses what it cannot train (tests/test_resume.py:
resume in depth)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vpsurgery
from vpsurgery.train import CHECKPOINT, NonFiniteInput, Pruner, TrainingDiverged, fit

TEACHER_WIDTH = 4


def teacher_data(n: int, seed: int = 0, d: int = 10, k: int = TEACHER_WIDTH) -> TensorDataset:
    """Regression targets from a ReLU teacher with k hidden units: the known answer is width k."""
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(k, d, generator=g), 0.5 * torch.randn(k, generator=g)
    w2 = torch.randn(k, generator=g).sign() * (1 + torch.rand(k, generator=g))
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (torch.relu(x @ w1.T + b1) @ w2)[:, None] / 3)


def student(width: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return vpsurgery.wrap(nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, 1)), torch.randn(2, 10))


def loader(n=1000, seed=0):
    return DataLoader(teacher_data(n, seed), batch_size=64, shuffle=True)


QUIET = {"progress": False, "log": lambda line: None, "loss_fn": F.mse_loss}


def hidden_theta(gm):
    return vpsurgery.gates(gm)["0"].theta.detach()


@pytest.mark.parametrize("seed, width", [(0, 32)])
def test_prunes_to_the_teacher_width(seed, width):
    """The setting measured in bench/toy_teacher.py (docs/method.md): every theta ends at exactly
    0 or 1 and the kept width is the teacher's. Other seeds and widths: bench/toy_teacher.py."""
    torch.manual_seed(seed)
    data = DataLoader(teacher_data(2000), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
    result = fit(student(width, seed), data, epochs=60, optimizer="adam", lr=0.01, price=3.0,
                 prune_every=100, device="cpu", **QUIET)
    theta = hidden_theta(result.model)  # pruned units (theta 0) are already gone from the model
    # every theta had reached 0 or 1 by itself before the last epochs rounded and froze them
    assert result.history[-1]["decided_before_hardening"] == 1.0
    assert int((theta == 1).sum()) == TEACHER_WIDTH == len(theta)
    result.model.eval()
    x, y = teacher_data(2000).tensors
    with torch.no_grad():
        assert F.mse_loss(result.model(x), y).item() < 0.01  # the teacher is fitted, not just cut


def eval_loss(gm, data):
    gm.eval()
    with torch.no_grad():
        return F.mse_loss(gm(data.tensors[0]), data.tensors[1]).item()


def one_step(model, opt, data):
    x, y = data.tensors
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def test_shrinking_mid_training_keeps_the_deterministic_network_and_slices_momentum():
    gm, data = student(), teacher_data(256)
    pruner = Pruner(gm, 256, steps_per_epoch=4, epochs=1)
    opt = torch.optim.SGD(pruner.weights(), lr=0.05, momentum=0.9)
    one_step(pruner.model, opt, data)
    off = [3, 7, 8, 20]
    theta = torch.ones(32)
    theta[off] = 0.0
    vpsurgery.gates(pruner.model)["0"].set(theta)
    before = eval_loss(pruner.model, data)
    old_momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in pruner.model.named_parameters()
                    if p in opt.state}
    model, new_opt = pruner.prune(opt)
    assert new_opt is opt and model is pruner.model  # the optimizer is updated in place
    assert len(hidden_theta(model)) == 28
    assert eval_loss(model, data) == pytest.approx(before, rel=1e-6, abs=1e-7)
    kept = torch.tensor([i for i in range(32) if i not in off])
    new = dict(model.named_parameters())
    assert pruner.last_shrink.slices["0.weight"][0].tolist() == kept.tolist()
    assert torch.equal(opt.state[new["0.weight"]]["momentum_buffer"], old_momentum["0.weight"][kept])
    assert torch.equal(opt.state[new["2.weight"]]["momentum_buffer"], old_momentum["2.weight"][:, kept])
    assert torch.equal(opt.state[new["2.bias"]]["momentum_buffer"], old_momentum["2.bias"])
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in pruner.weights()}
    one_step(model, opt, data)  # the updated optimizer trains the new parameters


def test_shrinking_mid_training_carries_the_theta_optimizer_sliced():
    """Adam on theta keeps its moments (sliced like theta) and its step count through a shrink."""
    gm, data = student(), teacher_data(256)
    pruner = Pruner(gm, 256, steps_per_epoch=4, epochs=1)
    for _ in range(3):
        x, y = data.tensors
        F.mse_loss(pruner.model(x), y).backward()
        pruner.step()
    old = dict(pruner.theta_optimizer.state[vpsurgery.gates(pruner.model)["0"].theta])
    off = [1, 5]
    vpsurgery.gates(pruner.model)["0"].set(torch.tensor([0.0 if i in off else 1.0 for i in range(32)]))
    pruner.prune()
    new = pruner.theta_optimizer.state[vpsurgery.gates(pruner.model)["0"].theta]
    kept = [i for i in range(32) if i not in off]
    assert float(new["step"]) == float(old["step"]) == 3.0
    assert torch.equal(new["exp_avg"], old["exp_avg"][kept])
    assert torch.equal(new["exp_avg_sq"], old["exp_avg_sq"][kept])


class Interrupted(Exception):
    pass


def interrupt_after(epoch):
    def log(line):
        if line.startswith(f"epoch {epoch}/"):
            raise Interrupted
    return log


def test_resume_after_interruption_reproduces_the_run(tmp_path):
    args = {"epochs": 4, "optimizer": "adam", "lr": 0.01, "price": 3.0, "theta_lr": 2.0, "progress": False,
            "loss_fn": F.mse_loss}
    full = fit(student(), loader(), **args, log=lambda line: None)
    with pytest.raises(Interrupted):
        fit(student(), loader(), **args, checkpoint_dir=tmp_path, log=interrupt_after(2))
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 2
    resumed = fit(student(), loader(), **args, checkpoint_dir=tmp_path, resume=True, log=lambda line: None)
    assert resumed.removed_units == full.removed_units and full.removed_units
    assert torch.equal(hidden_theta(resumed.model), hidden_theta(full.model))
    assert [h["params"] for h in resumed.history] == [h["params"] for h in full.history]


class PoisonedLoader:
    """Clean batches in the first epoch, NaN inputs from the second on."""

    def __init__(self, data):
        self.loader, self.dataset, self.epochs = DataLoader(data, batch_size=64), data, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epochs += 1
        for x, y in self.loader:
            yield (x if self.epochs == 1 else x * float("nan")), y


def test_nan_inputs_are_reported_as_bad_data_and_keep_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteInput, match="the input batch contains NaN/inf at epoch 2 step 0; clean the data"):
        fit(student(), PoisonedLoader(teacher_data(256)), epochs=3, checkpoint_dir=tmp_path, **QUIET)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary files left behind


def test_nan_loss_on_clean_data_is_a_divergence(tmp_path):
    calls = []

    def exploding(out, y):  # finite for the first epoch (4 steps), then infinite
        calls.append(1)
        return F.mse_loss(out, y) * (1.0 if len(calls) <= 4 else float("inf"))

    with pytest.raises(TrainingDiverged, match="epoch 2, step 0"):
        fit(student(), DataLoader(teacher_data(256), batch_size=64), epochs=3, checkpoint_dir=tmp_path,
            **{**QUIET, "loss_fn": exploding})
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 1


def test_a_model_without_gates_is_refused_with_the_fix():
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 1))
    ungated = vpsurgery.wrap(net, torch.randn(2, 10), channels=False, sections=False)
    with pytest.raises(ValueError, match="has no gates.*wrap with channels=True"):
        fit(ungated, loader(64), epochs=1, **QUIET)
    with pytest.raises(ValueError, match="vpsurgery.wrap"):
        fit(net, loader(64), epochs=1, **QUIET)


@pytest.mark.parametrize("n, drop_last, message", [
    (0, False, "the training set is empty"),
    (10, True, r"yields no batch \(10 examples, batch_size 64, drop_last=True\); use a smaller batch size"),
])
def test_a_loader_without_batches_is_refused(n, drop_last, message):
    data = DataLoader(teacher_data(10), batch_size=64, drop_last=drop_last) if n else \
        DataLoader(TensorDataset(torch.zeros(0, 10), torch.zeros(0, 1)), batch_size=64)
    with pytest.raises(ValueError, match=message):
        fit(student(), data, epochs=1, **QUIET)
