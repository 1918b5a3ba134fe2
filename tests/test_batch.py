"""plan.per_example: gates sample per example only where dim 0 of every tensor they act on is the
batch; the check runs the graph at a second batch size (one example, or one more than the input's)."""
import pytest
import torch
from torch import nn

import vpsurgery
from vpsurgery.passes.attach import plan_of


class SeqFirst(nn.Module):
    """nn.MultiheadAttention without batch_first: (length, batch, features)."""

    def __init__(self):
        super().__init__()
        self.mha, self.fc = nn.MultiheadAttention(16, 2), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0])


class BakedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(self.conv(x).view(2, -1))  # the batch size written in


class Squeezing(nn.Module):
    """Batch first at a batch of 2 or more; at a batch of one `squeeze` drops it."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)).squeeze())


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


@pytest.mark.parametrize("make, shape, expected", [
    (cnn, (1, 3, 8, 8), True),
    (cnn, (2, 3, 8, 8), True),
    (cnn, (5, 3, 8, 8), True),
    (SeqFirst, (5, 2, 16), False),
    (SeqFirst, (3, 3, 16), False),  # length == batch: the second size tells them apart
    (BakedBatch, (2, 3, 8, 8), False),
    (Squeezing, (2, 3, 8, 8), True),  # no at one example, so asked again at three
    (Squeezing, (1, 3, 8, 8), False),  # at the example's batch of one, dim 0 is not there
])
def test_per_example_where_dim_0_follows_the_batch(make, shape, expected):
    torch.manual_seed(0)
    gated = vpsurgery.wrap(make().eval(), (torch.randn(shape),))
    assert plan_of(gated).per_example is expected
    assert all(g.per_example is expected for g in vpsurgery.gates(gated).values())


class FoldsWindows(nn.Module):
    """Swin-style: the two halves of the image are folded into dim 0 (batch x windows) where a
    conv reads them, so dim 0 there is twice the batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        n, _, h, w = x.shape
        y = self.b(self.a(x).reshape(n, 8, 2, h // 2, w).transpose(1, 2).reshape(n * 2, 8, h // 2, w))
        return self.fc(y.mean((2, 3)).reshape(n, 2, 8).mean(1))


def test_a_dim_0_that_is_a_multiple_of_the_batch_is_told_by_one_run(monkeypatch):
    """Windows folded into dim 0 scale it by their count at any batch: the run at one example says
    no, and the graph is not run a second time (on Swin at 224 px that run costs a second)."""
    from vpsurgery.passes.analyse import batch
    runs = []
    real = batch._shapes_cheaply
    monkeypatch.setattr(batch, "_shapes_cheaply", lambda *a: runs.append(a[1][0].shape[0]) or real(*a))
    gated = vpsurgery.wrap(FoldsWindows().eval(), (torch.randn(2, 3, 8, 8),))
    assert plan_of(gated).per_example is False
    assert runs == [1]
