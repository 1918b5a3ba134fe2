"""The one cost model (passes/analyse/cost.py) against torch's FlopCounterMode (FLOPs = 2 x MACs)
on conv/linear-only nets, and every MACs figure (groups, sections, objective) read from it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import vpsurgery
from vpsurgery.reporting import count_flops
from vpsurgery.passes.analyse import cost
from vpsurgery.passes.capture import capture
from vpsurgery.passes.capture.trace import trace
from vpsurgery.train.objective import macs_per_weight_entry


def flop_counter_macs_per_example(model, x):
    """torch's flop counter, as vpsurgery's report runs it (attention unfused: the counter has no
    count for the fused CPU kernels)."""
    return count_flops(model, x)[0] / 2 / x.shape[0]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, bias=False)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c2(torch.relu(self.c1(x)))), 1))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 12, 3, padding=1)
        self.g = nn.Conv2d(12, 24, 3, groups=4, padding=2, dilation=2)
        self.dw = nn.Conv2d(24, 24, 5, groups=24, stride=2)
        self.pw = nn.Conv1d(24, 6, 1)

    def forward(self, x):
        y = self.dw(self.g(self.a(x)))
        return self.pw(y.flatten(2))


class Tokens(nn.Module):  # a Linear on (N, T, F) input, and a module called twice
    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(12, 20), nn.Linear(20, 20)

    def forward(self, x):
        return self.out(self.out(self.proj(x)))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, stride=2)
        self.t = nn.ConvTranspose2d(8, 6, 4, stride=2, groups=2)
        self.t1 = nn.ConvTranspose1d(6, 4, 3)

    def forward(self, x):
        y = self.t(self.c(x))
        return self.t1(y.flatten(2))


CASES = {
    "small_cnn": (SmallCNN, (2, 3, 16, 16)),
    "resnet18_32px": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "grouped_depthwise": (Grouped, (2, 4, 20, 20)),
    "linear_3d": (Tokens, (2, 7, 12)),
    "conv_transpose": (Transposed, (2, 3, 17, 17)),
}


@pytest.mark.parametrize("name", CASES)
def test_cost_model_agrees_with_flop_counter(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    gm = trace(model, (x,))
    assert cost.total_macs(gm) == pytest.approx(flop_counter_macs_per_example(model, x), rel=1e-9)
    calls = cost.layer_calls(gm)
    assert calls and all(c.macs == c.per_entry * gm.get_submodule(c.module).weight.numel() for c in calls)


def test_unbatched_conv_is_one_example():
    conv = nn.Conv2d(3, 5, 3)
    gm = trace(nn.Sequential(conv), (torch.randn(3, 9, 9),))
    assert cost.total_macs(gm) == 7 * 7 * conv.weight.numel()


def test_every_macs_figure_reads_the_cost_model():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    gm = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gm)
    per_call = {c.node: c.macs for c in cost.layer_calls(gm)}
    assert macs_per_weight_entry(gm) == cost.macs_per_weight_entry(gm)
    assert plan.sections
    for s in plan.sections.values():
        assert s.macs == int(sum(per_call.get(n, 0) for n in s.nodes))
    # unit costs: each call's MACs spread over its out units (and in units, ungrouped convs)
    modules = dict(gm.named_modules())
    expected = sum(c.macs * sum(1 for a in ("in", "out") if a in plan.module_axes.get(c.module, {}) and not (
        a == "in" and getattr(modules[c.module], "groups", 1) > 1))
        for c in cost.layer_calls(gm) if c.module in plan.module_axes)
    assert sum(g.macs.sum() for g in plan.groups.values()) <= expected + 1e-6
    assert sum(g.macs.sum() for g in plan.groups.values()) > 0


# --------------------------------------------------------------------------- attention's products
from conftest import random_hard_gates  # noqa: E402
from test_transformers import Block, EinsumAttention, FusedQKV, SeparateQKV  # noqa: E402

from vpsurgery.train.objective import expected_cost  # noqa: E402

ATTENTION = {
    "sdpa": (lambda: Block(FusedQKV(32, 4, fused=True)), (2, 6, 8)),
    "matmul": (lambda: Block(FusedQKV(32, 4, fused=False)), (2, 6, 8)),
    "torch.matmul": (lambda: Block(SeparateQKV(32, 4)), (2, 6, 8)),
    "einsum": (EinsumAttention, (2, 6, 8)),
    "multihead": (lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                            mlp_dim=64, num_classes=10), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_products_are_counted_as_the_flop_counter_counts_them(name):
    """q k^T and weights x v cost MACs too: in the dense graph, and in the expected cost at a hard
    head assignment, which is the cost of the model shrink emits."""
    make, shape = ATTENTION[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    assert cost.total_macs(capture(model, (x,))[0]) == pytest.approx(flop_counter_macs_per_example(model, x),
                                                                    rel=1e-9)
    gated = vpsurgery.wrap(model, (x,))
    assert cost.product_calls(gated)
    random_hard_gates(gated, 0.5, 1, sections=0.0)
    small = vpsurgery.shrink(gated)
    counted = flop_counter_macs_per_example(small, x)
    assert counted < flop_counter_macs_per_example(model, x)  # heads went, and their products with them
    assert cost.total_macs(small) == pytest.approx(counted, rel=1e-9)
    assert float(expected_cost(gated, "flops").detach()) == pytest.approx(counted, rel=1e-6)


class Windows(nn.Module):
    """Swin's layout: a Linear and a bmm on tensors whose dim 0 folds batch and windows."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 16)

    def forward(self, x):  # (B, 4 windows x 5 tokens, 8)
        B = x.shape[0]
        q, k = self.qk(x.reshape(B * 4, 5, 8)).chunk(2, -1)
        return torch.bmm(q, k.transpose(1, 2)).reshape(B, -1)


def test_calls_on_folded_batches_are_counted_per_example_of_the_model():
    torch.manual_seed(0)
    model, x = Windows().eval(), torch.randn(3, 20, 8)
    gm = trace(model, (x,))
    assert cost.graph_batch(gm.graph) == 3  # not the weight layer's dim 0 (12: batch x windows)
    assert cost.total_macs(gm) == pytest.approx(flop_counter_macs_per_example(model, x), rel=1e-9)
