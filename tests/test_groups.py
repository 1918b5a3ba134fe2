"""The walker and the Plan: groups by producer signature, unit order, mask sites and their index,
unit costs, unprunable reports, shared modules, keep_gates, and the plan of the shrunk graph."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vpsurgery

from conftest import (assert_invariant, channel_gates, layer_sizes, random_hard_gates, realistic_stats,
                      rel_err)

X = torch.randn(2, 3, 8, 8)


def wrap(model, x=X, **kw):
    torch.manual_seed(0)
    return vpsurgery.wrap(realistic_stats(model).eval(), (x,), **kw)


def group_of(gm, module):
    found = [g for g in vpsurgery.plan(gm).groups.values() if module in g.producers]
    assert len(found) <= 1
    return found[0] if found else None


class Chain(nn.Module):
    """Three residual adds chain four producers into one group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1))
                               for _ in range(3))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        for b in self.b:
            x = x + b(x)
        return self.fc(F.relu(x).mean((2, 3)))


def test_residual_chain_one_group_many_producers():
    gm = wrap(Chain())
    plan = vpsurgery.plan(gm)
    g = group_of(gm, "stem")
    assert g.producers == ["stem", "b.0.2", "b.1.2", "b.2.2"]  # in graph order
    assert g.name == "stem" and len(g.units) == 8
    for i in range(3):
        assert len(group_of(gm, f"b.{i}.0").units) == 4
        assert group_of(gm, f"b.{i}.0").name == f"b_{i}_0"
    assert len(plan.sections) == 3
    # every group has a gate of its size, every section one scalar gate
    gates = vpsurgery.gates(gm)
    assert {n for n, gt in gates.items() if gt.kind == "channel"} == set(plan.groups)
    assert {n for n, gt in gates.items() if gt.kind == "section"} == set(plan.sections)
    for name, grp in plan.groups.items():
        assert gates[name].theta.shape == (len(grp.units),)
    # units are distinct across groups
    allu = [u for grp in plan.groups.values() for u in grp.units]
    assert len(allu) == len(set(allu))
    for seed in range(3):
        random_hard_gates(gm, 0.5, seed)
        assert_invariant(gm, X, smaller=True)


def test_mask_sites_and_index():
    gm = wrap(Chain())
    plan = vpsurgery.plan(gm)
    owner = plan.unit_group()
    # every conv/linear reading a gated channel has a mask; its index points at the unit's gate slot
    readers = {s.node for s in plan.sites.values()}
    assert readers == {"b_0_0", "b_1_0", "b_2_0", "b_0_2", "b_1_2", "b_2_2", "fc"}
    for site in plan.sites.values():
        mask = gm.get_submodule(f"vps_masks.{site.name}")
        assert mask.dim == site.axis.dim and mask.index.numel() == len(site.axis.units)
        used = sorted({owner[int(u)][0] for u in site.axis.units if int(u) in owner})
        offsets, off = {}, 1
        for name in used:
            offsets[name] = off
            off += len(plan.groups[name].units)
        expect = [offsets[owner[int(u)][0]] + owner[int(u)][1] if int(u) in owner else 0 for u in site.axis.units]
        assert mask.index.tolist() == expect
    # the gated graph: a mask node right before each consumer input
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in ("fc",) + tuple(f"b.{i}.{j}" for i in range(3) for j in (0, 2)):
            assert node.args[0].op == "call_module" and node.args[0].target.startswith("vps_masks.")


def test_unit_costs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3, padding=1)
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(self.c2(F.relu(self.bn(self.c1(x)))).mean((2, 3)))

    gm = wrap(M())
    g1, g2 = group_of(gm, "c1"), group_of(gm, "c2")
    # c1 out: 3*9 weights + bias; bn weight + bias; c2 in: 6*9 weights
    assert g1.params.tolist() == [27 + 1 + 2 + 54] * 8
    assert g2.params.tolist() == [72 + 1 + 5] * 6
    # MACs per example: c1 = 64 positions * 27 per out channel; c2 in share + c2 out share
    assert g1.macs[0] == pytest.approx(64 * 27 + 64 * 6 * 72 / 8)
    assert np.all(g2.macs > 0)


def test_unprunable_reported_with_producers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.c1(x)
            return self.c2(y), torch.sort(y, 1)[0]

    gm = wrap(M())
    plan = vpsurgery.plan(gm)
    assert not plan.groups  # c2 reaches the output, c1 reaches sort
    reasons = {u.reason: u for u in plan.unprunable}
    assert reasons["reaches the model output"].producers == ["c2"]
    norule = next(u for r, u in reasons.items() if "no channel rule" in r)
    assert norule.producers == ["c1"] and norule.where == ["sort"]
    text = vpsurgery.report(gm)
    assert "0 channel groups" in text and "sort" in text and "reaches the model output" in text
    assert plan.prunable_share == 0.0
    assert not channel_gates(gm) and not plan.sites
    with torch.no_grad():  # nothing to prune: shrink is the identity
        shrunk = vpsurgery.shrink(gm)
        assert all(rel_err(a, b) == 0 for a, b in zip(shrunk(X), gm(X)))


def test_prunable_share_and_report():
    gm = wrap(Chain())
    plan = vpsurgery.plan(gm)
    # every conv output is prunable; fc (5 outputs) reaches the model output
    total = 8 + 3 * (4 + 8) + 5
    assert plan.prunable_share == pytest.approx((total - 5) / total)
    text = vpsurgery.report(gm)
    assert f"{len(plan.groups)} channel groups" in text
    assert "group stem: 8 units, producers stem, b.0.2, b.1.2, b.2.2" in text


class SharedTwice(nn.Module):
    """One conv applied to two different tensors: its input axis couples both tensors' channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        a, b = F.relu(self.c1(x)), torch.tanh(self.c2(x))
        return self.head((self.shared(a) * self.shared(b)).mean((2, 3)))


def test_shared_module_couples_its_inputs():
    gm = wrap(SharedTwice())
    plan = vpsurgery.plan(gm)
    g = group_of(gm, "c1")
    assert g is group_of(gm, "c2") and len(g.units) == 8
    assert len(group_of(gm, "shared").units) == 6
    assert sorted(s.node for s in plan.sites.values()) == ["head", "shared", "shared_1"]
    for seed in range(4):
        random_hard_gates(gm, 0.4, seed)
        shrunk = assert_invariant(gm, X, smaller=True)
        assert shrunk.shared.in_channels == 8 - 3


class RecurrentConv(nn.Module):
    """A conv applied twice in sequence: its in and out channels become the same units."""

    def __init__(self):
        super().__init__()
        self.c1, self.rec = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.c1(x)
        y = self.rec(F.relu(y))
        y = self.rec(F.relu(y))
        return self.fc(y.mean((2, 3)))


def test_shared_module_in_sequence():
    gm = wrap(RecurrentConv())
    g = group_of(gm, "c1")
    assert g is group_of(gm, "rec") and len(g.units) == 8
    for seed in range(3):
        random_hard_gates(gm, 0.4, seed)
        assert_invariant(gm, X, smaller=True)


def test_plan_pickles_and_copies():
    gm = wrap(Chain())
    plan = vpsurgery.plan(gm)
    again = pickle.loads(pickle.dumps(plan))
    assert list(again.groups) == list(plan.groups)
    assert [g.units for g in again.groups.values()] == [g.units for g in plan.groups.values()]
    gm2 = copy.deepcopy(gm)
    random_hard_gates(gm2, 0.5, 0)
    assert_invariant(gm2, X, smaller=True)
    assert all(float(t.detach().min()) == 1.0 for t in (g.theta for g in vpsurgery.gates(gm).values()))


def test_shrunk_plan_matches_modules():
    gm = wrap(Chain())
    random_hard_gates(gm, 0.5, 1, sections=0.0)
    shrunk = vpsurgery.shrink(gm)
    new = vpsurgery.plan(shrunk)
    for module, axes in new.module_axes.items():
        m = shrunk.get_submodule(module)
        sizes = {"in": getattr(m, "in_channels", getattr(m, "in_features", None)),
                 "out": getattr(m, "out_channels", getattr(m, "out_features", None)),
                 "ch": getattr(m, "num_features", None)}
        for name, ax in axes.items():
            assert len(ax.units) == sizes[name], (module, name)
    assert not new.groups and not new.sites  # gates folded: nothing left to gate
    assert new.removed_units and all(u not in new.removed_units
                                     for ax in new.module_axes.values() for a in ax.values() for u in a.units)


def test_keep_gates_then_shrink_again():
    gm = wrap(Chain())
    random_hard_gates(gm, 0.25, 3, sections=0.0)
    gm.eval()
    with torch.no_grad():
        ref = gm(X)
        kept = vpsurgery.shrink(gm, keep_gates=True).eval()
        assert rel_err(kept(X), ref) <= 1e-4
        # the surviving gates are all 1 (the removed units went with their gates)
        for gate in vpsurgery.gates(kept).values():
            assert bool((gate.theta == 1).all())
        # zero some more and shrink again
        random_hard_gates(kept, 0.25, 4, sections=0.0)
        ref2 = kept(X)
        twice = vpsurgery.shrink(kept).eval()
        assert rel_err(twice(X), ref2) <= 1e-4
    assert sum(layer_sizes(twice).values()) < sum(layer_sizes(kept).values()) < sum(layer_sizes(gm).values())


def test_model_input_channels_never_gated():
    gm = wrap(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(128, 3)))
    plan = vpsurgery.plan(gm)
    assert [g.producers for g in plan.groups.values()] == [["0"], ["2"]]
    owner = plan.unit_group()
    assert all(int(u) not in owner for u in plan.module_axes["0"]["in"].units)


def test_exclude_pins_modules_by_name_and_type_and_reports_them():
    import torchvision
    x = torch.randn(2, 3, 32, 32)
    model = torchvision.models.resnet18(num_classes=10)
    free = vpsurgery.plan(vpsurgery.wrap(model, x))
    gm = vpsurgery.wrap(model, x, exclude=["layer1.0", torch.nn.Linear])
    p = vpsurgery.plan(gm)
    pinned = {m for u in p.unprunable if "exclude" in u.reason for m in u.producers + u.where}
    assert "layer1.0.conv1" in pinned
    assert all(not set(g.producers) & {"layer1.0.conv1", "layer1.0.conv2"} for g in p.groups.values())
    assert "sec_add" in free.sections and "sec_add" not in p.sections  # layer1.0's block stays
    assert "excluded by wrap(exclude=...)" in vpsurgery.report(gm)
    for gate in vpsurgery.gates(gm).values():  # everything else still prunes exactly
        gate.set((torch.rand(gate.theta.shape) > 0.4).float())
    small = vpsurgery.shrink(gm)
    assert small.get_submodule("layer1.0.conv1").weight.shape == model.layer1[0].conv1.weight.shape
    assert small.get_submodule("fc").weight.shape[1] == 512
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        vpsurgery.wrap(model, x, exclude=["layer9"])
