"""BatchNorm statistics re-estimated at the end of training: exact averages, the rest of the
network in eval mode, the invariant kept, and a short run of a small-momentum net (MNASNet's
3e-4) that is at chance in eval mode without it."""
import copy

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import vpsurgery
from vpsurgery.data import load_data
from vpsurgery.train import fit, recalibrate_batchnorm

from conftest import assert_invariant, random_hard_gates


def batches(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=g) * 3 + 1, torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def test_statistics_are_the_exact_average_over_the_batches_with_the_rest_in_eval_mode():
    torch.manual_seed(0)
    drop, bn = nn.Dropout(0.9), nn.BatchNorm1d(4, momentum=1e-4)
    net = nn.Sequential(drop, bn).train()
    data = batches()
    assert recalibrate_batchnorm(net, data + data, batches=3) == 3  # only the first 3
    # dropout was off (eval) while the statistics were taken: they are those of the inputs themselves
    means = torch.stack([x.mean(0) for x, _ in data])
    variances = torch.stack([x.var(0, unbiased=True) for x, _ in data])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 1e-4 and net.training and bn.training and drop.training  # all as they were


def test_nothing_to_do_without_batchnorm_or_batches():
    assert recalibrate_batchnorm(nn.Linear(4, 2), batches()) == 0
    bn = nn.BatchNorm1d(4)
    before = bn.running_mean.clone()
    assert recalibrate_batchnorm(bn, batches(), batches=0) == 0
    assert torch.equal(bn.running_mean, before)


def test_the_gated_and_shrunk_networks_stay_equal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    gm = vpsurgery.wrap(model, torch.randn(2, 3, 12, 12))
    random_hard_gates(gm, p=0.4, seed=1)
    loader = [(torch.randn(8, 3, 12, 12), torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    recalibrate_batchnorm(gm, loader)
    assert_invariant(gm, torch.randn(5, 3, 12, 12), smaller=True)


class SlowStats(nn.Module):
    """A small CNN whose BatchNorm statistics barely move (torchvision's MNASNet momentum)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=3e-4), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=3e-4), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_fit_ends_with_the_statistics_of_its_final_network():
    data = load_data("digits")
    loader = DataLoader(Subset(data.train, range(768)), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    val = DataLoader(data.val, batch_size=256)
    torch.manual_seed(0)
    gated = vpsurgery.wrap(SlowStats(), torch.randn(2, 1, 8, 8))
    run = dict(epochs=4, optimizer="adam", lr=0.01, target=0.5, per="flops", device="cpu", progress=False)
    logs = []
    kept = fit(copy.deepcopy(gated), loader, val, bn_recalibration_batches=0, log=lambda line: None, **run)
    fresh = fit(gated, loader, val, log=logs.append, **run)
    # measured: train accuracy 0.52 (train-mode statistics) in both; val 0.16 with the running averages,
    # which still describe the untrained net, and 0.51 with the re-estimated statistics
    assert kept.history[-1]["val_acc"] < 0.3
    assert fresh.history[-1]["val_acc"] > max(0.4, fresh.history[-1]["train_acc"] - 0.1)
    assert any("BatchNorm statistics re-estimated over 12 training batches" in line for line in logs)
    small = vpsurgery.shrink(fresh.model)  # and the shrunk model is that network
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(small.eval()(x), fresh.model.eval()(x), rtol=1e-4, atol=1e-5)
