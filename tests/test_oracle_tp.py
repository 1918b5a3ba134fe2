"""Torch-Pruning as an oracle for channel coupling.

Torch-Pruning's DependencyGraph groups the output channels that must be pruned together. Every
coupling it reports between conv/linear output channels must also be a coupling in our plan:
if TP says channel i of module A goes with channel r of its group's root R, then A.out[i] and
R.out[r] are the same vpsurgery unit (ours may be coarser, e.g. whole conv groups, never finer).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import vpsurgery

tp = pytest.importorskip("torch_pruning")

# shufflenet_v2 is left out: Torch-Pruning 1.6.1's build_dependency raises ZeroDivisionError on its
# channel shuffle (update_reshape_index_mapping).
CASES = {
    "resnet18": lambda m: m.fc,
    "mobilenet_v2": lambda m: m.classifier[-1],
    "densenet121": lambda m: m.classifier,
    "regnet_x_400mf": lambda m: m.fc,
    "googlenet": lambda m: m.fc,
}
NO_CROSS_COUPLING = {"densenet121", "googlenet"}  # concatenations only: every TP group has one producer


def _model(name):
    torch.manual_seed(0)
    kwargs = dict(weights=None, num_classes=10)
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    return getattr(torchvision.models, name)(**kwargs).eval()


def tp_couplings(model, x, classifier):
    """[(module name, out channel, root module name, root channel)] for every conv/linear output
    channel Torch-Pruning couples to a root layer."""
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    out = []
    n_groups = 0
    for group in DG.get_all_groups(ignored_layers=[classifier]):
        n_groups += 1
        root_dep, _ = group[0]
        root = DG._module2name[root_dep.target.module]
        for item in group.items:
            dep = item.dep
            module = dep.target.module
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            if not DG.is_out_channel_pruning_fn(dep.handler):
                continue
            name = DG._module2name[module]
            for idx, root_idx in zip(item.idxs, item.root_idxs):
                out.append((name, int(idx), root, int(root_idx)))
    return out, n_groups


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "densenet121" else n
                                  for n in CASES])
def test_tp_couplings_are_ours(name):
    model = _model(name)
    x = torch.randn(1, 3, 64, 64)
    tp_model = copy.deepcopy(model)
    couplings, n_groups = tp_couplings(tp_model, x, CASES[name](tp_model))
    assert n_groups > 5 and couplings

    gm = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gm)
    unit = {m: ax["out"].units for m, ax in plan.module_axes.items() if "out" in ax}
    cross_module = 0
    for module, idx, root, ridx in couplings:
        assert module in unit and root in unit, (module, root)
        assert unit[module][idx] == unit[root][ridx], \
            f"TP couples {module}[{idx}] with {root}[{ridx}], vpsurgery does not"
        cross_module += module != root
    # the check must bite where TP couples layers (residual adds, depthwise convs)
    assert (cross_module > 0) == (name not in NO_CROSS_COUPLING)

    # every TP group with several producers is one vpsurgery group where ours gates it
    groups_of = {}
    owner = plan.unit_group()
    for module, idx, root, ridx in couplings:
        u = int(unit[module][idx])
        if u in owner:
            groups_of.setdefault(root, set()).add(owner[u][0])
    for root, names in groups_of.items():
        assert len(names) == 1, (root, names)


def test_tp_oracle_small_vit_style_channels_last():
    """A conv -> permute -> Linear pipeline (channels-last): TP and we agree the conv's channels
    feed the linear."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.lin = nn.Linear(8, 6)
            self.fc = nn.Linear(6, 10)

        def forward(self, x):
            y = self.c1(x)
            y = torch.relu(self.c2(torch.relu(y))) + y
            y = self.lin(y.permute(0, 2, 3, 1))
            return self.fc(torch.relu(y).mean((1, 2)))

    torch.manual_seed(0)
    model = M().eval()
    x = torch.randn(1, 3, 8, 8)
    tp_model = copy.deepcopy(model)
    couplings, _ = tp_couplings(tp_model, x, tp_model.fc)
    gm = vpsurgery.wrap(model, (x,))
    unit = {m: ax["out"].units for m, ax in vpsurgery.plan(gm).module_axes.items() if "out" in ax}
    assert any(m != r for m, _, r, _ in couplings)
    for module, idx, root, ridx in couplings:
        assert unit[module][idx] == unit[root][ridx], (module, idx, root, ridx)
