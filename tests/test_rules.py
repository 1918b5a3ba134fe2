"""Each channel rule on a tiny hand-written module: the groups it produces (sizes, producers,
which channels are one unit), what it pins and reports, and THE INVARIANT after random hard gating."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vpsurgery

from conftest import assert_invariant, channel_gates, random_hard_gates, realistic_stats, rel_err


# ------------------------------------------------------------------------------------------ helpers
def wrap(model, x):
    torch.manual_seed(0)
    model = realistic_stats(model).eval()
    gm = vpsurgery.wrap(model, (x,))
    with torch.no_grad():
        assert rel_err(gm.eval()(x), model(x)) <= 1e-6  # theta = 1: the model itself
    return gm


def group_of(gm, module):
    found = [g for g in vpsurgery.plan(gm).groups.values() if module in g.producers]
    assert len(found) <= 1
    return found[0] if found else None


def unit_index(gm, module, axis="out"):
    """Per channel of `module`'s axis: index of its unit within its group (-1 if ungated)."""
    plan = vpsurgery.plan(gm)
    owner = plan.unit_group()
    return [owner[int(u)][1] if int(u) in owner else -1 for u in plan.module_axes[module][axis].units]


def check_invariant(gm, x, seeds=(0, 1, 2), p=0.4):
    for seed in seeds:
        random_hard_gates(gm, p=p, seed=seed)
        assert_invariant(gm, x, smaller=True)
        x2 = torch.randn(3, *x.shape[1:])
        shrunk = vpsurgery.shrink(gm).eval()
        with torch.no_grad():
            assert rel_err(shrunk(x2), gm.eval()(x2)) <= 1e-4


def unprunable_reasons(gm):
    return {u.reason: u for u in vpsurgery.plan(gm).unprunable}


def assert_pinned(gm, module, reason_part):
    """`module`'s output channels are not gated, and the reason is in plan and report."""
    assert group_of(gm, module) is None, vpsurgery.report(gm)
    hits = [u for u in vpsurgery.plan(gm).unprunable if reason_part in u.reason and module in u.producers]
    assert hits, vpsurgery.plan(gm).unprunable
    assert reason_part in vpsurgery.report(gm)


class Head(nn.Module):
    def __init__(self, c, n=5):
        super().__init__()
        self.fc = nn.Linear(c, n)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


# ------------------------------------------------------------------------------------------ conv/bn
class ConvBnReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.conv2(F.relu(self.bn(self.conv1(x)))))


def test_conv_bn_relu_conv():
    gm = wrap(ConvBnReluConv(), X)
    plan = vpsurgery.plan(gm)
    g1, g2 = group_of(gm, "conv1"), group_of(gm, "conv2")
    assert len(g1.units) == 8 and g1.producers == ["conv1"]
    assert len(g2.units) == 6 and g2.producers == ["conv2"]
    assert group_of(gm, "head.fc") is None  # reaches the output
    # bn's channels are conv1's units, position by position
    assert list(plan.module_axes["bn"]["ch"].units) == list(plan.module_axes["conv1"]["out"].units)
    assert list(plan.module_axes["conv2"]["in"].units) == list(plan.module_axes["conv1"]["out"].units)
    assert {s.node for s in plan.sites.values()} == {"conv2", "head_fc"}
    check_invariant(gm, X)
    random_hard_gates(gm, p=0.5, seed=0)
    shrunk = vpsurgery.shrink(gm)
    assert shrunk.conv1.out_channels == shrunk.bn.num_features == shrunk.conv2.in_channels == 4
    assert shrunk.bn.running_mean.shape == (4,)


# ------------------------------------------------------------------------------------------ residual
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = Head(4)

    def forward(self, x):
        x = self.a(x)
        y = self.bn(self.b(F.relu(x))) + x
        return self.head(self.c(F.relu(y)))


def test_residual_add_couples_producers():
    gm = wrap(Residual(), X)
    g = group_of(gm, "a")
    assert g is group_of(gm, "b") and sorted(g.producers) == ["a", "b"] and len(g.units) == 8
    assert unit_index(gm, "a") == unit_index(gm, "b") == list(range(8))  # position i of a is position i of b
    assert len(group_of(gm, "c").units) == 4
    assert len(vpsurgery.plan(gm).sections) == 1
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ cat
class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(10, 5, 1)
        self.head = Head(5)

    def forward(self, x):
        return self.head(self.c3(torch.cat([self.c1(x), self.c2(x)], dim=1)))


def test_cat_offsets():
    gm = wrap(Cat(), X)
    plan = vpsurgery.plan(gm)
    g1, g2 = group_of(gm, "c1"), group_of(gm, "c2")
    assert g1 is not g2 and len(g1.units) == 4 and len(g2.units) == 6
    cin = list(plan.module_axes["c3"]["in"].units)
    assert cin == list(plan.module_axes["c1"]["out"].units) + list(plan.module_axes["c2"]["out"].units)
    site = next(s for s in plan.sites.values() if s.node == "c3")
    mask = gm.get_submodule(f"vps_masks.{site.name}")
    assert mask.index.tolist() == list(range(1, 11))  # both groups' gates, at their offsets
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ split
class Split(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2, self.c3 = nn.Conv2d(3 if how == "split" else 4, 4, 1), nn.Conv2d(5 if how == "split" else 4, 4, 1)
        self.head = Head(8)

    def forward(self, x):
        y = self.c1(x)
        if self.how == "chunk":
            a, b = y.chunk(2, dim=1)
        elif self.how == "torch.chunk":
            a, b = torch.chunk(y, 2, 1)
        else:
            a, b = torch.split(y, [3, 5], dim=1)
        return self.head(torch.cat([self.c2(F.relu(a)), self.c3(b)], 1))


@pytest.mark.parametrize("how", ["chunk", "torch.chunk", "split"])
def test_split_chunk(how):
    gm = wrap(Split(how), X)
    plan = vpsurgery.plan(gm)
    g = group_of(gm, "c1")
    assert len(g.units) == 8
    k = 3 if how == "split" else 4
    assert list(plan.module_axes["c2"]["in"].units) == list(plan.module_axes["c1"]["out"].units[:k])
    assert list(plan.module_axes["c3"]["in"].units) == list(plan.module_axes["c1"]["out"].units[k:])
    check_invariant(gm, X, seeds=range(5))


# ------------------------------------------------------------------------------------------ flatten
class FlattenLinear(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3)  # 8x8 -> 6x6
        self.fc1, self.fc2 = nn.Linear(4 * 36, 7), nn.Linear(7, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.how == "flatten":
            y = torch.flatten(y, 1)
        elif self.how == "view":
            y = y.view(y.size(0), -1)
        elif self.how == "view_literal":
            y = y.view(-1, 144)
        elif self.how == "reshape":
            y = y.reshape(y.shape[0], 4 * 36)
        elif self.how == "module":
            y = nn.Flatten()(y)
        return self.fc2(F.relu(self.fc1(y)))


@pytest.mark.parametrize("how", ["flatten", "view", "view_literal", "reshape"])
def test_flatten_linear_blocks(how):
    gm = wrap(FlattenLinear(how), X)
    plan = vpsurgery.plan(gm)
    g = group_of(gm, "conv")
    assert len(g.units) == 4
    conv_units = plan.module_axes["conv"]["out"].units
    fc_in = plan.module_axes["fc1"]["in"].units
    # channel c of conv is the block of 36 features [36c, 36c + 36) of fc1
    assert list(fc_in) == [u for u in conv_units for _ in range(36)]
    assert len(group_of(gm, "fc1").units) == 7
    check_invariant(gm, X)
    random_hard_gates(gm, p=0.5, seed=0)
    assert vpsurgery.shrink(gm).fc1.in_features == 2 * 36


class ReshapeMean(nn.Module):
    """(N, C, H, W) -> (N, C, H*W) -> mean over the last dim -> linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.reshape(y.shape[0], 6, -1).mean(-1))


def test_view_reshape_keeps_channel_dim():
    gm = wrap(ReshapeMean(), X)
    assert len(group_of(gm, "conv").units) == 6
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ permute / LayerNorm
class ChannelsLast(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(6, 4, 1)
        self.ln = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 6)
        self.head = Head(4)

    def forward(self, x):
        y = self.c1(x).permute(0, 2, 3, 1)  # N H W C
        if self.norm:
            y = self.ln(y)
        y = self.lin(F.gelu(y)).permute(0, 3, 1, 2)
        return self.head(self.c2(y))


def test_permute_linear_channels_last():
    gm = wrap(ChannelsLast(norm=False), X)
    plan = vpsurgery.plan(gm)
    assert len(group_of(gm, "c1").units) == 8
    assert len(group_of(gm, "lin").units) == 6
    assert list(plan.module_axes["lin"]["in"].units) == list(plan.module_axes["c1"]["out"].units)
    check_invariant(gm, X)


def test_layernorm_over_channels_takes_active_channel_statistics():
    gm = wrap(ChannelsLast(norm=True), X)
    assert len(group_of(gm, "c1").units) == 8  # the normalised channels are prunable
    assert any(s.kind == "norm" for s in vpsurgery.plan(gm).sites.values())
    assert len(group_of(gm, "lin").units) == 6
    check_invariant(gm, X)


class LayerNormSpatial(nn.Module):
    """LayerNorm over the last (spatial) dim only: channels stay prunable."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.ln = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.LayerNorm(8)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.c2(self.ln(self.c1(x))))


def test_layernorm_over_spatial_dim_does_not_pin():
    gm = wrap(LayerNormSpatial(), X)
    assert len(group_of(gm, "c1").units) == 8
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ grouped conv
class Grouped(nn.Module):
    def __init__(self, groups, out, transposed=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(out)
        self.g = (nn.ConvTranspose2d if transposed else nn.Conv2d)(8, out, 3, padding=1, groups=groups)
        self.c3 = nn.Conv2d(out, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.c3(F.relu(self.bn(self.g(F.relu(self.c1(x)))))))


@pytest.mark.parametrize("groups,out,units", [(4, 8, 4), (4, 12, 4), (8, 8, 8), (8, 16, 8)],
                         ids=["grouped", "grouped-uneven", "depthwise", "depthwise-x2"])
def test_grouped_and_depthwise_conv_whole_groups(groups, out, units):
    gm = wrap(Grouped(groups, out), X)
    plan = vpsurgery.plan(gm)
    g = group_of(gm, "c1")
    assert g is group_of(gm, "g") and sorted(g.producers) == ["c1", "g"] and len(g.units) == units
    cin, cout = 8 // groups, out // groups
    idx_in, idx_out = unit_index(gm, "g", "in"), unit_index(gm, "g", "out")
    assert idx_in == [j for j in range(groups) for _ in range(cin)]
    assert idx_out == [j for j in range(groups) for _ in range(cout)]
    assert list(plan.module_axes["c1"]["out"].units) == list(plan.module_axes["g"]["in"].units)
    check_invariant(gm, X)
    random_hard_gates(gm, p=0.5, seed=0)
    shrunk = vpsurgery.shrink(gm)
    assert shrunk.g.groups == groups - groups // 2
    assert shrunk.g.in_channels == cin * shrunk.g.groups and shrunk.g.out_channels == cout * shrunk.g.groups


@pytest.mark.parametrize("transposed", [False, True])
def test_a_conv_of_few_wide_groups_loses_one_position_of_every_group(transposed):
    """2 groups of 4 in and 6 out channels: whole groups would be 2 units, positions across the
    groups are 4 (in) and 6 (out): the finer choice, and the groups stay 2, narrower."""
    gm = wrap(Grouped(2, 12, transposed), X)
    plan = vpsurgery.plan(gm)
    assert group_of(gm, "c1") is not group_of(gm, "g")  # the conv mixes its inputs: in and out apart
    assert len(group_of(gm, "c1").units) == 4 and len(group_of(gm, "g").units) == 6
    in_units, out_units = plan.module_axes["g"]["in"].units, plan.module_axes["g"]["out"].units
    assert list(in_units[:4]) == list(in_units[4:]) and len(set(in_units[:4].tolist())) == 4
    assert list(out_units[:6]) == list(out_units[6:]) and len(set(out_units[:6].tolist())) == 6
    check_invariant(gm, X)
    random_hard_gates(gm, p=0.5, seed=0)
    shrunk = vpsurgery.shrink(gm)
    assert shrunk.g.groups == 2 and (shrunk.g.in_channels, shrunk.g.out_channels) == (4, 6)
    for g in vpsurgery.gates(gm).values():  # fractional theta folds into the grouped weight
        g.set(torch.where(g.theta > 0, torch.rand(g.theta.shape) * 0.5 + 0.5, g.theta.detach()))
    with torch.no_grad():
        assert rel_err(vpsurgery.shrink(gm)(X), gm.eval()(X)) <= 1e-5


# ------------------------------------------------------------------------------------------ shuffle
class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        y = self.c1(x)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(self.c2(y))


def test_channel_shuffle():
    gm = wrap(Shuffle(), X)
    plan = vpsurgery.plan(gm)
    g = group_of(gm, "c1")
    # channel i and i + 4 must go together (otherwise the (n, 2, c/2) view is not rectangular)
    assert len(g.units) == 4
    idx = unit_index(gm, "c1")
    assert idx[:4] == idx[4:]
    # after the shuffle, c2 reads c1's channels in interleaved order
    c1, c2 = plan.module_axes["c1"]["out"].units, plan.module_axes["c2"]["in"].units
    assert list(c2) == [c1[(i % 2) * 4 + i // 2] for i in range(8)]
    check_invariant(gm, X, seeds=range(4))


# ------------------------------------------------------------------------------------------ SE / layer scale
class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.fc1, self.fc2, self.c3 = (nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1), nn.Conv2d(3, 8, 1),
                                                nn.Conv2d(8, 4, 1))
        self.head = Head(4)

    def forward(self, x):
        y = F.relu(self.c1(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(self.c3(y * s))


def test_se_block_mul_with_broadcast():
    gm = wrap(SE(), X)
    g = group_of(gm, "c1")
    assert g is group_of(gm, "fc2") and sorted(g.producers) == ["c1", "fc2"] and len(g.units) == 8
    assert unit_index(gm, "c1") == unit_index(gm, "fc2")
    assert len(group_of(gm, "fc1").units) == 3
    check_invariant(gm, X)


class LayerScale(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.rand(shape) + 0.5)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.c2(self.c1(x) * self.gamma))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1, 1)])
def test_layer_scale_parameter(shape):
    gm = wrap(LayerScale(shape), X)
    plan = vpsurgery.plan(gm)
    assert len(group_of(gm, "c1").units) == 8
    ax = plan.param_axes["gamma"]
    assert ax.dim == len(shape) - 3 and list(ax.units) == list(plan.module_axes["c1"]["out"].units)
    check_invariant(gm, X)
    random_hard_gates(gm, p=0.5, seed=0)
    assert vpsurgery.shrink(gm).gamma.shape[len(shape) - 3] == 4


class SpatialMask(nn.Module):
    """x * (N, 1, H, W) attention map: the map is broadcast across channels; x stays prunable."""

    def __init__(self):
        super().__init__()
        self.c1, self.att, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        y = self.c1(x)
        return self.head(self.c2(y * torch.sigmoid(self.att(y))))


def test_spatial_attention_broadcast():
    gm = wrap(SpatialMask(), X)
    assert len(group_of(gm, "c1").units) == 8
    assert group_of(gm, "att") is None  # its single channel is broadcast: a size-1 dim cannot shrink
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ reductions
class Reduce(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.c1(x))
        if self.how == "mean":
            y = y.mean((2, 3))
        elif self.how == "mean-neg-keepdim":
            y = y.mean(dim=[-2, -1], keepdim=True).flatten(1)
        elif self.how == "torch.sum":
            y = torch.sum(y, dim=(2, 3))
        elif self.how == "amax":
            y = torch.amax(y, dim=(-1, -2))
        return self.fc(y)


@pytest.mark.parametrize("how", ["mean", "mean-neg-keepdim", "torch.sum", "amax"])
def test_mean_over_spatial_dims(how):
    gm = wrap(Reduce(how), X)
    assert len(group_of(gm, "c1").units) == 8
    check_invariant(gm, X)


class ReduceChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        y = self.c1(x)
        return self.head(self.c2(y) + y.mean(1, keepdim=True))


def test_mean_over_channels_pins():
    gm = wrap(ReduceChannels(), X)
    assert_pinned(gm, "c1", "reduction over the channel dim")
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ getitem
class Slices(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 8, 1)
        n = {"range": 4, "open": 5, "neg": 3, "ellipsis": 4, "int": 1, "strided": 4}[how]
        self.c2 = nn.Conv2d(n, 4, 1)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        y = self.c1(x)
        if self.how == "range":
            s = y[:, 2:6]
        elif self.how == "open":
            s = y[:, 3:]
        elif self.how == "neg":
            s = y[:, -3:]
        elif self.how == "ellipsis":
            s = y[..., 2:6, :, :]
        elif self.how == "int":
            s = y[:, 5].unsqueeze(1)
        else:
            s = y[:, ::2]
        return self.head(self.c2(s) + self.c3(y))


@pytest.mark.parametrize("how", ["range", "open", "neg", "ellipsis"])
def test_getitem_slices(how):
    gm = wrap(Slices(how), X)
    plan = vpsurgery.plan(gm)
    assert len(group_of(gm, "c1").units) == 8
    sl = {"range": slice(2, 6), "open": slice(3, None), "neg": slice(-3, None), "ellipsis": slice(2, 6)}[how]
    assert list(plan.module_axes["c2"]["in"].units) == list(plan.module_axes["c1"]["out"].units[sl])
    check_invariant(gm, X, seeds=range(6))


def test_getitem_single_channel_pins_that_channel():
    gm = wrap(Slices("int"), X)
    g = group_of(gm, "c1")
    assert len(g.units) == 7  # channel 5 stays, the others are prunable
    assert unit_index(gm, "c1")[5] == -1
    assert any("single channel" in u.reason for u in vpsurgery.plan(gm).unprunable)
    check_invariant(gm, X)


def test_getitem_strided_slice_pins():
    gm = wrap(Slices("strided"), X)
    assert_pinned(gm, "c1", "strided slice")
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ softmax
class Softmax(nn.Module):
    def __init__(self, dim, module=False):
        super().__init__()
        self.dim = dim
        self.sm = nn.Softmax(dim) if module else None
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        y = self.c1(x)
        y = self.sm(y) if self.sm is not None else F.softmax(y, dim=self.dim)
        return self.head(self.c2(y))


@pytest.mark.parametrize("module", [False, True])
def test_softmax_over_channels_pins(module):
    gm = wrap(Softmax(1, module), X)
    assert_pinned(gm, "c1", "softmax over the channel dim")
    check_invariant(gm, X)


def test_softmax_over_spatial_dim_keeps_channels():
    gm = wrap(Softmax(-1), X)
    assert len(group_of(gm, "c1").units) == 8
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ no rule
class NoRule(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        y = self.c1(x)
        if self.how == "cumsum":
            y = torch.cumsum(y, dim=1)
        elif self.how == "cumsum-spatial":
            y = torch.cumsum(y, dim=3)
        elif self.how == "sort":
            y = torch.sort(y, dim=1)[0]
        elif self.how == "nonzero-where":
            y = y * len(torch.where(y > 0)[0])
        elif self.how == "matmul":
            y = torch.matmul(y.permute(0, 2, 3, 1), torch.ones(8, 8)).permute(0, 3, 1, 2)
        elif self.how == "roll":
            y = y.roll(1, 1)
        return self.head(self.c2(y))


@pytest.mark.parametrize("how,name", [("sort", "sort")])
def test_op_without_rule_pins_and_reports(how, name):
    gm = wrap(NoRule(how), X)
    reasons = [u for u in vpsurgery.plan(gm).unprunable if "no channel rule" in u.reason and name in u.reason]
    assert reasons, vpsurgery.plan(gm).unprunable
    assert "c1" in reasons[0].producers
    assert group_of(gm, "c1") is None  # never treated as elementwise
    assert name in vpsurgery.report(gm)
    assert len(group_of(gm, "c2").units) == 4
    check_invariant(gm, X)


@pytest.mark.parametrize("how,reason", [("matmul", "matmul contracts over a channel dim"),
                                        ("roll", "roll along the channel dim"),
                                        ("cumsum", "cumsum along the channel dim")])
def test_ops_that_move_channels_pin_them(how, reason):
    """x @ W over the channel dim mixes channels where no mask can go; rolling the channel dim moves
    channels into other positions: they stay, and the report says why."""
    gm = wrap(NoRule(how), X)
    assert_pinned(gm, "c1", reason)
    assert len(group_of(gm, "c2").units) == 4
    check_invariant(gm, X)


class StackGather(nn.Module):
    """Split-attention style stack+sum, an SE scale applied with expand_as, a bias gathered from a table."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.fc, self.out = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.table = nn.Parameter(torch.randn(9, 8))
        self.register_buffer("idx", torch.randint(0, 9, (5,)))
    def forward(self, x):
        st = torch.stack([self.a(x), self.b(x)], dim=1)  # N, 2, C, H, W
        y = st.sum(1)
        w = torch.sigmoid(self.fc(y.mean((2,3), keepdim=True)))
        y = y * w.expand_as(y)
        bias = self.table[self.idx].mean(0)  # (C,)
        y = y + bias.view(1, -1, 1, 1)
        return self.out(y)

def test_stack_expand_as_and_a_gathered_table_couple_channels_exactly():
    gm = wrap(StackGather(), X)
    group = group_of(gm, "a")
    assert group is not None and set(group.producers) == {"a", "b", "fc"} and len(group.units) == 8
    assert vpsurgery.plan(gm).param_axes["table"].dim == 1  # the table's columns go with the channels
    check_invariant(gm, X)


class LinearNormTokens(nn.Module):
    """LeViT's Linear+BN over tokens (BN on the flattened tokens, then reshape_as), a per-head bias
    table read as table[:, idx], and addcmul (ResMLP's affine)."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)
        self.table = nn.Parameter(torch.randn(8, 5))
        self.register_buffer("idx", torch.randint(0, 5, (3,)))
        self.alpha, self.beta = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # N, HW, 3
        y = self.lin(t)
        y = self.bn(y.flatten(0, 1)).reshape_as(y)
        y = y + self.table[:, self.idx].mean(1)
        y = torch.addcmul(self.beta, self.alpha, y)
        return self.out(y).mean(1)


def test_reshape_as_a_column_gather_and_addcmul_keep_channels_exact():
    gm = wrap(LinearNormTokens(), X)
    group = group_of(gm, "lin")
    assert group is not None and len(group.units) == 8, vpsurgery.report(gm)
    assert vpsurgery.plan(gm).param_axes["table"].dim == 0
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ others
class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.gn = nn.GroupNorm(4, 8)
        self.prelu = nn.PReLU(8)
        self.head = Head(4)

    def forward(self, x):
        y = self.pool(self.prelu(self.c1(x)))
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = self.gn(self.c2(F.avg_pool2d(y, 2)))
        return self.head(self.c3(F.hardswish(y)))


def test_pool_interpolate_groupnorm_prelu():
    gm = wrap(Pools(), X)
    assert len(group_of(gm, "c1").units) == 8
    g2 = group_of(gm, "c2")
    assert len(g2.units) == 4  # GroupNorm(4, 8): a group's statistics need all of its channels
    assert unit_index(gm, "c2") == [0, 0, 1, 1, 2, 2, 3, 3]
    check_invariant(gm, X)
    random_hard_gates(gm, p=0.5, seed=0)
    shrunk = vpsurgery.shrink(gm)
    assert shrunk.gn.num_groups == 2 and shrunk.gn.num_channels == 4
    assert shrunk.prelu.weight.numel() == 4


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.Conv1d(8, 4, 3, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c2(F.relu(self.bn(self.c1(x)))).mean(-1))


def test_conv1d_batchnorm1d():
    x = torch.randn(2, 3, 16)
    gm = wrap(Conv1dNet(), x)
    g = group_of(gm, "c1")  # c2 is grouped (2 groups): c1's channels go in halves with c2's groups
    assert g is group_of(gm, "c2") and len(g.units) == 2
    assert unit_index(gm, "c1") == [0] * 4 + [1] * 4
    check_invariant(gm, x)


class ConvTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.up, self.c2 = nn.Conv2d(3, 8, 1), nn.ConvTranspose2d(8, 6, 2, stride=2), nn.Conv2d(6, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.c2(F.relu(self.up(F.relu(self.c1(x))))))


def test_conv_transpose():
    gm = wrap(ConvTranspose(), X)
    assert len(group_of(gm, "c1").units) == 8
    assert len(group_of(gm, "up").units) == 6
    check_invariant(gm, X)


def test_elementwise_with_python_scalars_and_sizes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
            self.head = Head(4)

        def forward(self, x):
            y = self.c1(x)
            h = y.shape[2] // 2 * 2  # int arithmetic on sizes
            y = (2.0 * y - 1) / 3 + y.clamp(min=0) ** 2
            return self.head(self.c2(y[:, :, :h]))

    gm = wrap(M(), X)
    assert len(group_of(gm, "c1").units) == 8
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ pad, self-cat
class Pad(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8 + (3 if how == "channels" else 0), 4, 3)
        self.head = Head(4)

    def forward(self, x):
        y = F.relu(self.c1(x))
        if self.how == "channels":
            y = F.pad(y, (0, 0, 0, 0, 1, 2))  # CIFAR ResNet option-A style: zero channels
        elif self.how == "computed":
            y = F.pad(y, (0, y.shape[3] % 3, 1, y.size(2) // 4), mode="replicate")
        else:
            y = F.pad(y, (1, 1, 1, 1), mode="reflect")
        return self.head(self.c2(y))


@pytest.mark.parametrize("how", ["spatial", "computed"])
def test_spatial_pad_keeps_channels(how):
    gm = wrap(Pad(how), X)
    assert len(group_of(gm, "c1").units) == 8
    check_invariant(gm, X)


def test_channel_pad_pins():
    gm = wrap(Pad("channels"), X)
    assert_pinned(gm, "c1", "pad of the channel dim")
    check_invariant(gm, X)


def test_cat_with_itself():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(12, 4, 1)
            self.head = Head(4)

        def forward(self, x):
            y = F.relu(self.c1(x))
            return self.head(self.c2(torch.cat([y, y], 1)))

    gm = wrap(M(), X)
    assert len(group_of(gm, "c1").units) == 6
    c1, c2 = vpsurgery.plan(gm).module_axes["c1"]["out"].units, vpsurgery.plan(gm).module_axes["c2"]["in"].units
    assert list(c2) == list(c1) * 2  # both copies of a channel go together
    check_invariant(gm, X)


def test_view_sizes_read_from_other_tensors():
    """Sizes given as another tensor's shape, or computed from channel counts, are rewritten from
    the new shapes (literal where they are channel counts, dynamic where they are the batch)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y, z = F.relu(self.a(x)), F.relu(self.b(x))
            z = z.view(y.shape) + 0
            w = y.reshape(y.size(0), y.size(1) * 2, -1)
            return self.fc(torch.cat([self.c(z).mean((2, 3)), self.d(w.view(z.shape)).mean((2, 3))], 1))

    gm = wrap(M(), X)
    gates = channel_gates(gm)
    gates["a"].set(torch.tensor([0.0, 0, 1, 1, 1, 1, 1, 1]))
    gates["b"].set(torch.tensor([0.0, 0, 0, 0, 0, 1, 1, 1]))
    shrunk = assert_invariant(gm, X, smaller=True)
    with torch.no_grad():
        x5 = torch.randn(5, 3, 8, 8)
        assert rel_err(shrunk(x5), gm(x5)) <= 1e-5
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ op facts
from vpsurgery.passes import rules as _rules  # noqa: E402


def _facts_of(model, x):
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    return {n.name: _rules.facts(n, modules) for n in gm.graph.nodes}


class FactsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.convt, self.lin = nn.Conv2d(3, 3, 1), nn.ConvTranspose2d(3, 3, 1), nn.Linear(3, 3)
        self.bn, self.drop, self.act = nn.BatchNorm2d(3), nn.Dropout(), nn.Softsign()
        self.avg, self.mx, self.attn = nn.AvgPool2d(1), nn.MaxPool2d(1), nn.MultiheadAttention(3, 1)

    def forward(self, x):
        y = self.mx(self.avg(self.act(self.drop(self.bn(self.convt(self.conv(x)))))))
        y = torch.nn.functional.avg_pool2d(y, 1) + torch.sort(y, 1)[0]
        return self.lin(y.permute(0, 2, 3, 1).contiguous().view(-1, 3))


def test_one_table_of_op_facts():
    f = _facts_of(FactsNet(), X)
    assert f["conv"].layer == f["convt"].layer == f["lin"].layer == 1
    assert _rules.MODULE_RULES[nn.MultiheadAttention].layer == 2
    assert all(f[n].linear for n in ("conv", "convt", "lin", "bn", "drop", "avg", "avg_pool2d", "permute",
                                     "contiguous", "view"))
    assert not f["mx"].linear and f["mx"].nonlinear and f["act"].nonlinear and not f["act"].linear
    assert f["drop"].alias and f["drop"].random  # identity (itself) in eval: an alias, but never replayed
    assert f["view"].alias and f["permute"].alias and not f["conv"].alias and not f["add"].alias
    # an op the table does not know: nonlinear, not linear, no layer; a torch op does not alias
    # (every torch view op is listed), a user's may
    assert f["sort"].nonlinear and not f["sort"].linear and f["sort"].layer == 0 and not f["sort"].alias
    assert _rules.UNKNOWN.alias and _rules.UNKNOWN.nonlinear and not _rules.UNKNOWN.linear
    assert _rules.lookup is not None and _rules.MODULE_RULES[nn.MultiheadAttention].analyse is None


def test_subclass_keeps_its_base_layer_count_only():
    class MyConv(nn.Conv2d):
        pass

    from vpsurgery.passes.capture.trace import trace
    gm = trace(nn.Sequential(MyConv(3, 3, 1)), (X,), leaf_modules=(MyConv,))
    modules = dict(gm.named_modules())
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert _rules.facts(node, modules).layer == 1 and _rules.lookup(node, modules) is None
    assert not _rules.facts(node, modules).linear and _rules.facts(node, modules).alias


# ------------------------------------------------------------------------------------------ user rules
class MyAct(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.5 * x)


class MyScale(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class UserOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.act, self.s, self.c2 = nn.Conv2d(3, 8, 3, padding=1), MyAct(), MyScale(8), nn.Conv2d(8, 4, 1)
        self.head = Head(4)

    def forward(self, x):
        return self.head(self.c2(self.s(self.act(self.c1(x)))))


@pytest.fixture
def user_rules():
    yield
    for op in (MyAct, MyScale):
        _rules.MODULE_RULES.pop(op, None)


def test_register_rule_makes_a_user_op_prunable(user_rules):
    leaf = (MyAct, MyScale)
    before = vpsurgery.plan(vpsurgery.wrap(realistic_stats(UserOps()).eval(), (X,), leaf_modules=leaf))
    assert not [g for g in before.groups.values() if "c1" in g.producers]
    assert any("MyAct" in u.reason and "c1" in u.producers for u in before.unprunable), before.unprunable

    vpsurgery.register_rule(MyAct, vpsurgery.rules.elementwise())
    vpsurgery.register_rule(MyScale, vpsurgery.rules.channelwise_module("channels", params=("scale",)))
    torch.manual_seed(0)
    model = realistic_stats(UserOps()).eval()
    gm = vpsurgery.wrap(model, (X,), leaf_modules=leaf)
    assert len(group_of(gm, "c1").units) == 8
    with torch.no_grad():
        assert rel_err(gm.eval()(X), model(X)) <= 1e-6
    check_invariant(gm, X)
    random_hard_gates(gm, p=0.5, seed=3)
    small = vpsurgery.shrink(gm)
    assert small.s.channels == small.s.scale.numel() == small.c1.out_channels < 8


def test_register_rule_refuses_what_it_cannot_register():
    with pytest.raises(TypeError):
        vpsurgery.register_rule(MyAct, "elementwise")
    with pytest.raises(TypeError):
        vpsurgery.register_rule(int, vpsurgery.rules.elementwise())
    with pytest.raises(TypeError):
        vpsurgery.register_rule(3, vpsurgery.rules.elementwise())


# ------------------------------------------------------------------------------------------ scalars
class _ScalarTerms(nn.Module):
    """Ops on 0-dim tensors: a Python number times a mean, a dot product of two channel vectors."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        v = y.mean((0, 2, 3))
        return self.c(torch.relu(self.b(y)) + 0.5 * y.mean() + torch.matmul(v, v))


def test_scalar_tensors_keep_zero_dims_and_stay_exact():
    x = torch.randn(2, 3, 10, 10)
    gm = wrap(_ScalarTerms(), x)
    assert group_of(gm, "b") is not None  # the scalars broadcast over b's channels
    check_invariant(gm, x)


# ------------------------------------------------------------------------------------------ embeddings
class _Embedded(nn.Module):
    """Token and bag embeddings (modules, and a functional lookup of the model's own table) into
    a Linear; optionally an output layer tied to the token table (a language model's head). (The
    ATen op of an EmbeddingBag returns four tensors and has no rule: `bag=False` for export.)"""

    def __init__(self, tied=False, max_norm=None, bag=True):
        super().__init__()
        self.tok = nn.Embedding(30, 16, padding_idx=0, max_norm=max_norm)
        self.bag = nn.EmbeddingBag(30, 16, mode="mean") if bag else None
        self.pos = nn.Parameter(torch.randn(12, 16))
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 30, bias=False) if tied else nn.Linear(16, 5)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, t):
        pos = F.embedding(torch.arange(t.shape[1]), self.pos)
        y = self.tok(t) + pos
        if self.bag is not None:
            y = y + self.bag(t).unsqueeze(1)
        return self.head(torch.relu(self.mix(y)))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("tied", [False, True])
def test_embedding_columns_are_channels_and_shrink_exactly(tied, capture):
    torch.manual_seed(0)
    model = _Embedded(tied=tied, bag=capture == "fx").eval()
    t = torch.randint(0, 30, (3, 12))
    gm = vpsurgery.wrap(model, (t,), capture=capture)
    assert vpsurgery.plan(gm).capture == capture
    with torch.no_grad():
        assert rel_err(gm(t), model(t)) == 0
    lookups = [name for name, m in gm.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    stream = group_of(gm, lookups[0])  # (export names the tied table after the head)
    assert len(lookups) == (3 if capture == "fx" else 2)  # functional lookups became nn.Embedding
    assert stream is not None and set(lookups) <= set(stream.producers)  # a unit per column of each
    for seed in range(3):
        random_hard_gates(gm, p=0.4, seed=seed)
        with torch.no_grad():
            shrunk = assert_invariant(gm, t, smaller=True)
        tables = {name: shrunk.get_submodule(name).weight for name in lookups}
        assert {w.shape[1] for w in tables.values()} == {shrunk.get_submodule("mix").in_features} != {16}
        if tied:  # still one Parameter, its rows (the vocabulary) all there
            heads = [m for m in shrunk.modules() if isinstance(m, nn.Linear) and m.out_features == 30]
            assert len(heads) == 1 and any(heads[0].weight is w for w in tables.values())


def test_embedding_with_max_norm_keeps_its_columns():
    gm = vpsurgery.wrap(_Embedded(max_norm=1.0).eval(), (torch.randint(0, 30, (2, 12)),))
    assert group_of(gm, "tok") is None and group_of(gm, "bag") is None  # one stream with tok's columns
    assert any("max_norm" in u.reason and "tok" in u.where for u in vpsurgery.plan(gm).unprunable)
    assert "max_norm" in vpsurgery.report(gm)


# ------------------------------------------------------------------------------------------ pixel shuffle
class _SubPixel(nn.Module):
    """Space to depth (PixelUnshuffle) into a conv, and a super-resolution tail (conv ->
    PixelShuffle -> conv), as modules or as functions."""

    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Conv2d(8 * 4, 6 * 4, 3, padding=1)
        self.out = nn.Conv2d(6, 3, 3, padding=1)
        self.shuffle, self.unshuffle = nn.PixelShuffle(2), nn.PixelUnshuffle(2)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = F.pixel_unshuffle(y, 2) if self.functional else self.unshuffle(y)
        y = torch.relu(self.up(y))
        return self.out(F.pixel_shuffle(y, 2) if self.functional else self.shuffle(y))


@pytest.mark.parametrize("functional", [False, True])
def test_pixel_shuffle_moves_whole_channel_blocks_and_shrinks_exactly(functional):
    x = torch.randn(2, 3, 8, 8)
    gm = wrap(_SubPixel(functional), x)
    up, stem = group_of(gm, "up"), group_of(gm, "stem")
    assert len(up.units) == 6  # 24 channels of `up`, in blocks of 4 (one output channel each)
    assert len(stem.units) == 8  # each of stem's channels is 4 of up's input channels
    check_invariant(gm, x)
    random_hard_gates(gm, p=0.5, seed=0)
    small = vpsurgery.shrink(gm)
    k, s = small.get_submodule("out").in_channels, small.get_submodule("stem").out_channels
    assert small.get_submodule("up").out_channels == 4 * k and k < 6
    assert small.get_submodule("up").in_channels == 4 * s and s < 8


# ------------------------------------------------------------------------------------------ recurrent layers
class _ConvRecurrent(nn.Module):
    """A CRNN (text recognition): conv features read along the width by a recurrent layer, given an
    initial state or not, batch first or not."""

    def __init__(self, kind, batch_first, with_state):
        super().__init__()
        self.kind, self.batch_first, self.with_state = kind, batch_first, with_state
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.rnn = getattr(nn, kind)(12, 8, num_layers=2, batch_first=batch_first, bidirectional=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean(2)  # (N, C, W)
        f = f.permute(0, 2, 1) if self.batch_first else f.permute(2, 0, 1)
        state = None
        if self.with_state:
            h = torch.zeros(4, x.shape[0], 8)
            state = (h, h) if self.kind == "LSTM" else h
        out = self.rnn(f, state)[0]
        return self.fc(out)


@pytest.mark.parametrize("kind, batch_first, with_state", [
    ("LSTM", True, False), ("GRU", False, True), ("RNN", True, True), ("LSTM", False, True)])
@torch.no_grad()
def test_recurrent_layers_read_channels_that_shrink_exactly(kind, batch_first, with_state):
    x = torch.randn(2, 3, 4, 7)
    gm = wrap(_ConvRecurrent(kind, batch_first, with_state), x)
    assert group_of(gm, "conv") is not None  # the conv's channels are the recurrent layer's inputs
    assert "output of a recurrent layer" in unprunable_reasons(gm)  # its hidden units stay
    check_invariant(gm, x)
    random_hard_gates(gm, p=0.5, seed=0)
    small = vpsurgery.shrink(gm)
    rnn = small.get_submodule("rnn")
    assert rnn.input_size == small.get_submodule("conv").out_channels < 12
    assert rnn.weight_ih_l0.shape[1] == rnn.weight_ih_l0_reverse.shape[1] == rnn.input_size
    assert rnn.weight_ih_l1.shape[1] == 16  # the second layer reads the first: whole
    # a fractional theta is folded into the input weights of both directions
    for gate in vpsurgery.gates(gm).values():
        gate.set(torch.rand(gate.theta.shape, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5)
    assert rel_err(vpsurgery.shrink(gm)(x), gm.eval()(x)) <= 1e-5


# ------------------------------------------------------------------------------------------ parametrizations
class _Reparametrized(nn.Module):
    """weight_norm and spectral_norm (torch.nn.utils.parametrizations) on convs and a linear."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils import parametrizations as P
        self.a = P.weight_norm(nn.Conv2d(3, 12, 3, padding=1))
        self.b = P.spectral_norm(nn.Conv2d(12, 10, 3, padding=1))
        self.c = P.weight_norm(nn.Linear(10, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))
        return self.head(torch.relu(self.c(y)))


def _weight_normed(m: nn.Module) -> bool:
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import _WeightNorm
    return parametrize.is_parametrized(m, "weight") and isinstance(m.parametrizations.weight[0], _WeightNorm)


@torch.no_grad()
def test_weight_and_spectral_norm_layers_shrink_exactly_weight_norm_kept():
    from torch.nn.utils import parametrize
    x = torch.randn(2, 3, 8, 8)
    gm = wrap(_Reparametrized(), x)
    for name in ("a", "b", "c"):
        assert group_of(gm, name) is not None, name  # the parametrized layers' channels go
    check_invariant(gm, x)  # (assert_invariant: the gated model keeps its parametrizations, unchanged)
    random_hard_gates(gm, p=0.5, seed=0)
    with pytest.warns(UserWarning, match="layer 'b' has its weight computed by SpectralNorm; it becomes a plain"):
        small = vpsurgery.shrink(gm)
    a, b, c = (small.get_submodule(n) for n in ("a", "b", "c"))
    assert _weight_normed(a) and _weight_normed(c)  # weight_norm again, over the sliced weight
    assert a.out_channels < 12 and a.parametrizations.weight.original1.shape[0] == a.out_channels
    assert type(b) is nn.Conv2d and not parametrize.is_parametrized(b)  # spectral_norm: baked
    assert all(parametrize.is_parametrized(gm.get_submodule(n)) for n in ("a", "b", "c"))
    # a fractional theta folds into a baked weight (a parametrized consumer)
    for gate in vpsurgery.gates(gm).values():
        gate.set(torch.rand(gate.theta.shape, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.5)
    assert rel_err(vpsurgery.shrink(gm)(x), gm.eval()(x)) <= 1e-5


def test_an_optimizer_goes_on_with_a_baked_weight():
    from vpsurgery.passes.shrink import Decision, shrink_to
    from vpsurgery.train.pruner import carry_optimizer
    x = torch.randn(2, 3, 8, 8)
    gm = wrap(_Reparametrized(), x)
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    gm.train()
    gm(x).sum().backward()
    opt.step()
    a_units = group_of(gm, "a").units
    result = shrink_to(gm, Decision(units=frozenset(int(u) for u in a_units[:3])))
    carry_optimizer(opt, gm, result)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    new_a = result.model.get_submodule("a")
    assert all(id(p) in held and p not in opt.state for p in new_a.parametrizations.weight.parameters())
    assert all(id(p) in held for p in result.model.parameters())
    assert not any(id(p) in held for p in gm.get_submodule("a").parametrizations.weight.parameters())
    originals = ["a.parametrizations.weight.original0", "a.parametrizations.weight.original1"]  # g and v
    assert [result.baked[k] for k in originals] == originals  # new g and v under the old names
    result.model.train()
    result.model(x).sum().backward()
    opt.step()  # trains on: fresh state for the new g and v, the rest carried
    assert new_a.parametrizations.weight.original0.grad is not None


class _HookWeightNorm(nn.Module):
    """The deprecated torch.nn.utils.weight_norm (a forward pre-hook), as much published code has it."""

    def __init__(self):
        super().__init__()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.a = nn.utils.weight_norm(nn.Conv1d(2, 16, 3, padding=1))
            self.b = nn.utils.weight_norm(nn.Conv1d(16, 16, 3, padding=1), dim=None)
        self.c = nn.Conv1d(16, 1, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("inplace", [False, True])
def test_the_deprecated_hook_weight_norm_becomes_a_parametrization_on_the_same_g_and_v(inplace):
    torch.manual_seed(0)
    model = _HookWeightNorm().eval()
    x = torch.randn(2, 2, 20)
    with torch.no_grad():
        want = model(x)
    g = model.a.weight_g
    gm = vpsurgery.wrap(model, (x,), inplace=inplace)  # copying: deepcopy refuses the hook's non-leaf weight
    a = gm.get_submodule("a")
    assert _weight_normed(a) and _weight_normed(gm.get_submodule("b"))
    assert (a.parametrizations.weight.original0 is g) == inplace  # in place: the user's own g and v
    with torch.no_grad():
        assert rel_err(gm(x), want) <= 1e-6
    assert group_of(gm, "a") is not None and group_of(gm, "b") is not None
    random_hard_gates(gm, p=0.5, seed=1)
    with torch.no_grad():
        ref = gm(x)
        small = vpsurgery.shrink(gm)
        assert rel_err(small(x), ref) <= 1e-5
    assert small.get_submodule("a").out_channels < 16 and _weight_normed(small.get_submodule("a"))
    if not inplace:
        assert hasattr(model.a, "weight_g") and model.a.weight_g is g  # the user's model is untouched


class _Flips(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        flipped = {"channels": lambda: torch.flip(y, [1, 3]), "method": lambda: y.flip(-3),
                   "lr": lambda: torch.fliplr(y), "spatial": lambda: y.flip(2)}[self.how]()
        return self.b(y + 0.5 * flipped)


@pytest.mark.parametrize("how", ["channels", "method", "lr", "spatial"])
def test_flip_reverses_channels_with_their_ids(how):
    x = torch.randn(2, 3, 6, 6)
    gm = wrap(_Flips(how), x)
    a = group_of(gm, "a")
    # y + flip(y) over channels ties channel i to channel 7 - i: 4 units; a spatial flip keeps 8
    assert len(a.units) == (8 if how == "spatial" else 4)
    check_invariant(gm, x)


# ------------------------------------------------------------------------------------------ more elementwise and channel moves
class _ChannelOps(nn.Module):
    """Ops between two convs that keep, pair or reorder channels: each has a rule, and its channels go."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d({"glu": 4, "glu-module": 4, "stacked-chunks": 4, "repeat": 16, "tile": 16}.get(how, 8), 4, 3,
                           padding=1)
        self.head = Head(4)
        self.shuffle, self.glu = nn.ChannelShuffle(2), nn.GLU(1)

    def forward(self, x):
        y = self.a(x)
        y = {"where": lambda: torch.where(y > 0, y, 0.1 * y),
             "mask": lambda: y * (y.abs() >= 0.5) + y.gt(1.0).logical_not() * y.clamp(min=torch.zeros_like(y)),
             "cumsum": lambda: torch.cumsum(y, 2) + y.cumprod(-1),
             "glu": lambda: F.glu(y, 1), "glu-module": lambda: self.glu(y),
             "shuffle": lambda: self.shuffle(y), "shuffle-function": lambda: F.channel_shuffle(y, 4),
             "reversed-chunks": lambda: torch.cat(y.chunk(4, 1)[::-1], 1),
             "stacked-chunks": lambda: torch.stack(y.chunk(2, 1)[::-1], 0).sum(0),
             "repeat": lambda: y.repeat(1, 2, 1, 1), "tile": lambda: torch.tile(y, (2, 1, 1)),
             "repeat-spatial": lambda: y.repeat(1, 1, 2, 3)}[self.how]()
        return self.head(self.b(torch.relu(y)))


@pytest.mark.parametrize("how, units", [
    ("where", 8), ("mask", 8), ("cumsum", 8),
    ("glu", 4), ("glu-module", 4),  # channel i and i + 4 make one output channel
    ("shuffle", 4), ("shuffle-function", 2),  # position j of every group: one unit
    ("reversed-chunks", 8), ("stacked-chunks", 4), ("repeat", 8), ("tile", 8), ("repeat-spatial", 8)])  # (a sequence the graph made: chunks[::-1])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_channel_ops_keep_their_channels_prunable_and_exact(how, units, capture):
    torch.manual_seed(0)
    model = realistic_stats(_ChannelOps(how)).eval()
    gm = vpsurgery.wrap(model, (X,), capture=capture)
    assert vpsurgery.plan(gm).capture == capture
    group = group_of(gm, "a")
    assert group is not None and len(group.units) == units, vpsurgery.plan(gm).unprunable
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ elementwise maths
class _Maths(nn.Module):
    """Elementwise maths between two convs, as torch functions, Tensor methods and in place."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.head = Head(4)

    def forward(self, x):
        y = torch.tanh(self.a(x))
        if self.how == "functions":
            y = torch.sin(y) + torch.cos(y) * torch.log1p(y.abs()) + torch.floor(y * 3) + torch.reciprocal(y.exp())
        elif self.how == "methods":
            y = y.sin().atan() + y.sign() * y.expm1() + y.clone().cos_()
        else:  # positional features of a grid, as XCiT and NeRF-style encodings compute them
            grid = torch.arange(y.shape[-1], dtype=y.dtype, device=y.device) / y.shape[-1]
            y = y + torch.sin(grid * 3.14) + torch.cos(grid).view(1, 1, 1, -1)
        return self.head(self.b(y))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("how", ["functions", "methods", "constants"])
def test_elementwise_maths_keeps_channels_where_they_are(how, capture):
    gm = vpsurgery.wrap(_Maths(how).eval(), (X,), capture=capture)
    assert group_of(gm, "a") is not None and len(group_of(gm, "a").units) == 8
    assert not any("no channel rule" in u.reason for u in vpsurgery.plan(gm).unprunable)
    check_invariant(gm, X)


# ------------------------------------------------------------------------------------------ padding modules
class _Padded(nn.Module):
    """A CycleGAN-style generator block (ReflectionPad2d + conv, a residual), a ZeroPad2d before a
    strided conv, and a mask built with `&` and `~`."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 8, 7), nn.InstanceNorm2d(8, affine=True),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(8, 12, 3), nn.ReLU(),
                                   nn.ReplicationPad2d(1), nn.Conv2d(12, 8, 3))
        self.down = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 10, 3, stride=2))
        self.head = Head(10)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.block(y)
        keep = (y > 0) & ~(y > 2)
        return self.head(self.down(torch.where(keep, y, 0.0)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_padding_modules_and_bitwise_masks_keep_channels(capture):
    gm = vpsurgery.wrap(_Padded().eval(), (X,), capture=capture)
    plan = vpsurgery.plan(gm)
    assert not any("no channel rule" in u.reason for u in plan.unprunable), plan.unprunable
    assert plan.sections  # the generator block is a residual section (the pads are affine)
    check_invariant(gm, X)


def test_a_padding_module_over_the_channel_dim_pins_it():
    class PadFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.pad, self.b = nn.Linear(6, 8), nn.ConstantPad1d((0, 2), 0.0), nn.Linear(10, 3)

        def forward(self, x):  # (N, 8): Pad1d takes it as unbatched (C=N, W=8) and pads the features
            return self.b(self.pad(torch.relu(self.a(x))))

    gm = vpsurgery.wrap(PadFeatures().eval(), (torch.randn(4, 6),))
    assert group_of(gm, "a") is None
    assert any("pad of the channel dim" in u.reason for u in vpsurgery.plan(gm).unprunable)


class _TensorSplit(nn.Module):
    """tensor_split: a class token off the tokens (MViT), and the channel dim in two halves."""

    def __init__(self):
        super().__init__()
        self.a, self.cls = nn.Linear(6, 8), nn.Parameter(torch.randn(1, 1, 8))
        self.b, self.c = nn.Linear(4, 5), nn.Linear(4, 5)

    def forward(self, x):  # (N, L, 6)
        y = torch.cat([self.cls.expand(x.shape[0], -1, -1), torch.relu(self.a(x))], dim=1)
        token, rest = torch.tensor_split(y, (1,), dim=1)
        left, right = (rest + token).tensor_split(2, dim=2)
        return (self.b(left) + self.c(right)).mean(1)


def test_tensor_split_along_tokens_and_channels():
    x = torch.randn(2, 7, 6)
    gm = vpsurgery.wrap(_TensorSplit().eval(), (x,))
    assert group_of(gm, "a") is not None and len(group_of(gm, "a").units) == 8
    check_invariant(gm, x)
    small = vpsurgery.shrink(gm)
    assert small.b.in_features < 4 or small.c.in_features < 4  # the halves shrank (explicit sizes now)


class _Cosine(nn.Module):
    """A classifier on L2-normalized embeddings (metric learning heads), and a normalize over the
    channels of a conv map."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = self.b(F.normalize(torch.relu(self.a(x)), dim=1))
        return self.fc(F.normalize(y.mean((2, 3)), p=2, dim=1))


def test_normalize_over_the_channels_is_exact_with_removed_channels_zero_before_it():
    gm = wrap(_Cosine(), X)
    assert len(group_of(gm, "a").units) == 8 and len(group_of(gm, "b").units) == 12
    assert not any("normalize" in u.reason for u in vpsurgery.plan(gm).unprunable)
    check_invariant(gm, X)
    for g in vpsurgery.gates(gm).values():  # fractional theta: kept as a constant scale before it
        g.set(torch.where(g.theta > 0, torch.rand(g.theta.shape) * 0.5 + 0.5, g.theta.detach()))
    with torch.no_grad():
        assert rel_err(vpsurgery.shrink(gm)(X), gm.eval()(X)) <= 1e-5


def test_a_normalize_scale_survives_a_second_round_of_wrap_and_shrink():
    gm = wrap(_Cosine(), X)
    for g in vpsurgery.gates(gm).values():
        g.set(torch.rand(g.theta.shape, generator=torch.Generator().manual_seed(5)) * 0.4 + 0.6)
    small = vpsurgery.shrink(gm)
    again = wrap(small, X)
    for g in vpsurgery.gates(again).values():
        g.set(torch.rand(g.theta.shape, generator=torch.Generator().manual_seed(6)) * 0.4 + 0.6)
    with torch.no_grad():
        assert rel_err(vpsurgery.shrink(again)(X), again.eval()(X)) <= 1e-5
