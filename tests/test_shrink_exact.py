"""THE INVARIANT on real networks: for a random hard 0/1 gate assignment, in eval mode, the shrunk
model computes what the gated model computes, is physically smaller and has no gates left; with
every theta = 1 the gated model is the original model; fractional theta fold into the weights."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn as nn
import torchvision

import vpsurgery
from vpsurgery.models import get_model

from conftest import (assert_invariant, assert_no_gates, channel_gates, layer_sizes, n_params,
                      random_hard_gates, realistic_stats, rel_err, section_gates)

TV = ["resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
      "densenet121", "googlenet", "shufflenet_v2_x0_5", "convnext_tiny", "regnet_x_400mf", "squeezenet1_0",
      "vgg11_bn", "alexnet"]
OURS = ["lenet300_100", "lenet5", "vgg16", "resnet56"]
SLOW = {"vit_b_16", "swin_t"}  # vit_b_16 ~20 s; swin_t's wrap takes minutes (see report)


def build(name: str):
    """(model in eval mode with realistic norm statistics, example batch of 2, input shape)."""
    torch.manual_seed(0)
    if name in OURS:
        model = get_model(name, num_classes=10)
        shape = {"lenet300_100": (784,), "lenet5": (1, 28, 28)}.get(name, (3, 32, 32))
    elif name == "small_vit":
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10)
        shape = (3, 32, 32)
    elif name == "vit_b_16":
        model = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=10)
        shape = (3, 32, 32)
    elif name == "swin_t":
        model = torchvision.models.swin_t(weights=None, num_classes=10)
        shape = (3, 64, 64)
    else:
        kwargs = dict(weights=None, num_classes=10)
        if name == "googlenet":
            kwargs.update(aux_logits=False, init_weights=True)
        model = getattr(torchvision.models, name)(**kwargs)
        shape = (3, 64, 64)
    model = realistic_stats(model).eval()
    return model, torch.randn(2, *shape), shape


def params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("name", params(TV + ["small_vit", "vit_b_16", "swin_t"] + OURS))
@torch.no_grad()
def test_invariant_hard_gates(name):
    model, x, shape = build(name)
    reference = copy.deepcopy(model.state_dict())
    gm = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gm)
    assert plan.groups, vpsurgery.report(gm)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.items())  # wrap copies

    # theta = 1 (the default): the gated model is the model
    assert rel_err(gm.eval()(x), model(x)) <= 1e-6

    zeroed, total = random_hard_gates(gm, p=0.4, seed=1, sections=0.5)
    assert zeroed >= 0.3 * total
    ref = gm(x)
    shrunk = assert_invariant(gm, x, smaller=True)
    assert n_params(shrunk) < n_params(model)
    assert sum(layer_sizes(shrunk).values()) < sum(layer_sizes(model).values())
    assert_no_gates(shrunk)
    assert not any(isinstance(m, (vpsurgery.Gate, vpsurgery.ChannelMask)) for m in shrunk.modules())

    # the units that went are (almost) all the zeroed ones; each producer lost exactly its share
    new_plan = vpsurgery.plan(shrunk)
    removed = new_plan.removed_units
    theta_of = {u: float(t) for g in plan.groups.values()
                for u, t in zip(g.units, channel_gates(gm)[g.name].theta)}
    assert all(theta_of[u] == 0.0 for u in removed)
    assert len(removed) >= 0.8 * zeroed, (len(removed), zeroed)
    modules = dict(shrunk.named_modules())
    for g in plan.groups.values():
        gone = sum(u in removed for u in g.units)
        for producer in g.producers:
            if producer not in modules:  # a removed section took it
                continue
            axis = plan.module_axes[producer]["out"]
            m = modules[producer]
            out = m.out_channels if hasattr(m, "out_channels") else m.out_features
            assert out == len(axis.keep(removed)), (producer, out)
            if gone:
                assert out < len(axis.units), producer

    # a different batch size: shape right and values equal
    x3 = torch.randn(3, *shape)
    out3 = shrunk(x3)
    assert out3.shape == gm(x3).shape == (3, 10)
    assert rel_err(out3, gm(x3)) <= 1e-4
    del ref


FRACTIONAL = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "googlenet", "shufflenet_v2_x0_5",
              "regnet_x_400mf", "squeezenet1_0", "small_vit", "lenet300_100", "lenet5", "vgg16", "resnet56"]


@pytest.mark.parametrize("name", FRACTIONAL)
@torch.no_grad()
def test_fractional_theta_folds_into_weights(name):
    model, x, _ = build(name)
    gm = vpsurgery.wrap(model, (x,)).eval()
    g = torch.Generator().manual_seed(3)
    for gate in vpsurgery.gates(gm).values():
        gate.set(torch.rand(gate.theta.shape, generator=g) * 0.9 + 0.05)
    # the reference: the gated eval model with every sub-threshold unit / section set to 0
    ref_model = copy.deepcopy(gm)
    for gate in vpsurgery.gates(ref_model).values():
        gate.set(torch.where(gate.theta < 0.5, 0.0, gate.theta))
    ref = ref_model(x)
    shrunk = vpsurgery.shrink(gm, threshold=0.5).eval()
    assert_no_gates(shrunk)
    assert rel_err(shrunk(x), ref) <= 1e-4
    assert n_params(shrunk) < n_params(model)
    # a threshold below every theta (all >= 0.05): nothing is removed, every theta is folded in
    full = vpsurgery.shrink(gm, threshold=0.01).eval()
    assert rel_err(full(x), gm(x)) <= 1e-4
    assert n_params(full) == n_params(model)  # nothing removed (layers may be split: compare parameters)


@torch.no_grad()
def test_all_gates_zero_still_runs():
    """Every unit at 0: each tensor keeps one (zero-weighted) unit, the function is unchanged."""
    model, x, _ = build("resnet56")
    gm = vpsurgery.wrap(model, (x,))
    for gate in vpsurgery.gates(gm).values():
        gate.set(0.0)
    shrunk = assert_invariant(gm, x, smaller=True)
    assert n_params(shrunk) < 0.05 * n_params(model)


@torch.no_grad()
def test_sections_only_and_channels_only():
    model, x, _ = build("resnet18")
    for kwargs in (dict(channels=False), dict(sections=False)):
        gm = vpsurgery.wrap(model, (x,), **kwargs)
        if kwargs.get("channels") is False:
            assert not channel_gates(gm) and section_gates(gm)
        else:
            assert channel_gates(gm) and not section_gates(gm)
        random_hard_gates(gm, p=0.5, seed=2, sections=1.0)
        assert_invariant(gm, x, smaller=True)
