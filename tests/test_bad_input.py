"""Bad and awkward inputs: untraceable models, wrong example inputs, shared modules, in-place ops,
and the promise that neither wrap nor shrink touches what it is given."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import vpsurgery

from conftest import assert_invariant, random_hard_gates, realistic_stats, rel_err

X = torch.randn(2, 3, 8, 8)


# ------------------------------------------------------------------------------------------ tracing
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values: symbolic_trace cannot follow it
            return self.conv(x)
        return -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = DataDependent()
        self.c2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.c2(F.relu(self.block(F.relu(self.stem(x))))).mean((2, 3)))


def test_untraceable_model_raises_trace_error_naming_the_module():
    with pytest.raises(vpsurgery.TraceError) as info:
        vpsurgery.wrap(Untraceable(), (X,))
    msg = str(info.value)
    assert "block" in msg and "DataDependent" in msg  # names the module (path and type)
    assert "leaf_modules" in msg and "concrete_args" in msg
    assert isinstance(info.value, RuntimeError)


def test_untraceable_top_level_model():
    with pytest.raises(vpsurgery.TraceError, match="DataDependent"):
        vpsurgery.wrap(DataDependent(), (torch.randn(2, 8, 4, 4),))


def test_leaf_module_workaround_keeps_invariant():
    model = realistic_stats(Untraceable()).eval()
    gm = vpsurgery.wrap(model, (X,), leaf_modules=[DataDependent])
    with torch.no_grad():
        assert rel_err(gm.eval()(X), model(X)) <= 1e-6
        assert rel_err(gm(-X), model(-X)) <= 1e-6  # the leaf keeps its data-dependent branch
    plan = vpsurgery.plan(gm)
    # an opaque leaf: its input channels (stem's) are pinned and reported; c2 stays prunable
    assert not any("stem" in g.producers for g in plan.groups.values())
    assert any("DataDependent" in u.reason and "stem" in u.producers for u in plan.unprunable)
    assert "DataDependent" in vpsurgery.report(gm)
    assert any("c2" in g.producers for g in plan.groups.values())
    random_hard_gates(gm, 0.5, 0)
    assert_invariant(gm, X, smaller=True)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        vpsurgery.wrap(lambda x: x, (X,))


def test_shrink_of_unwrapped_module():
    with pytest.raises(ValueError, match="wrap"):
        vpsurgery.shrink(fx.symbolic_trace(nn.Conv2d(3, 3, 1)))
    with pytest.raises(ValueError, match="wrap"):
        vpsurgery.plan(fx.symbolic_trace(nn.Conv2d(3, 3, 1)))


# ------------------------------------------------------------------------------------------ example inputs
def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()


@pytest.mark.parametrize("bad", [torch.randn(2, 4, 8, 8), torch.randn(2, 3, 9, 9), torch.randn(3, 8, 8, 2)],
                         ids=["channels", "spatial", "layout"])
def test_wrong_example_shape(bad):
    with pytest.raises(vpsurgery.ExampleInputError) as info:
        vpsurgery.wrap(small(), (bad,))
    msg = str(info.value)
    assert str(tuple(bad.shape)) in msg and "float32" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("model,bad,hint", [
    (lambda: nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 2)), torch.randn(2, 5), "torch.randint(0, 100, (1, 128))"),
    (lambda: nn.Sequential(nn.Conv3d(3, 4, 3), nn.AdaptiveAvgPool3d(1)), torch.randn(2, 3, 8, 8),
     "torch.randn(1, 3, 16, 224, 224)"),
    (lambda: nn.Sequential(nn.Conv1d(2, 4, 3)), torch.randn(2, 3, 8), "torch.randn(1, 2, 224)"),
], ids=["tokens", "clip", "signal"])
def test_a_wrong_example_is_told_an_input_of_the_kind_the_model_reads(model, bad, hint):
    with pytest.raises(vpsurgery.ExampleInputError) as info:
        vpsurgery.wrap(model().eval(), (bad,))
    assert f"e.g. example_inputs=({hint},)" in str(info.value)


def test_wrong_example_dtype():
    with pytest.raises(vpsurgery.ExampleInputError) as info:
        vpsurgery.wrap(small(), (torch.ones(2, 3, 8, 8, dtype=torch.int64),))
    assert "(2, 3, 8, 8)" in str(info.value) and "int64" in str(info.value)


def test_wrong_number_of_example_inputs():
    with pytest.raises(vpsurgery.ExampleInputError, match="1 input"):
        vpsurgery.wrap(small(), (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)))


def test_example_input_as_bare_tensor_and_list():
    for example in (torch.randn(2, 3, 8, 8), [torch.randn(2, 3, 8, 8)]):
        gm = vpsurgery.wrap(small(), example)
        assert vpsurgery.plan(gm).example == [((2, 3, 8, 8), "float32")]


# ------------------------------------------------------------------------------------------ shared / in-place
class SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.block(x)
        x = x + self.block(x)  # the same weights twice
        return self.fc(x.mean((2, 3)))


def test_shared_module_called_twice():
    model = realistic_stats(SharedTwice()).eval()
    gm = vpsurgery.wrap(model, (X,))
    with torch.no_grad():
        assert rel_err(gm.eval()(X), model(X)) <= 1e-6
    plan = vpsurgery.plan(gm)
    assert any(g.producers == ["block.0"] for g in plan.groups.values())
    for seed in range(4):
        random_hard_gates(gm, 0.4, seed, sections=0.5)
        shrunk = assert_invariant(gm, X, smaller=True)
        m = dict(shrunk.named_modules())
        if "block.0" in m:  # both of its sections may have been removed
            assert m["block.0"].out_channels == m["block.1"].num_features == m["block.3"].in_channels


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.se1, self.se2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        x.relu_()
        y = self.act(self.bn(self.a(x)))
        y += x  # in-place residual add
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)), inplace=True)))
        y.mul_(s)
        z = F.relu(self.b(y), inplace=True)
        z.add_(1.0)
        return self.fc(z.mean((2, 3)))


def test_in_place_ops():
    model = realistic_stats(InPlace()).eval()
    gm = vpsurgery.wrap(model, (X.clone(),))
    with torch.no_grad():
        assert rel_err(gm.eval()(X.clone()), model(X.clone())) <= 1e-6
    plan = vpsurgery.plan(gm)
    g = next(g for g in plan.groups.values() if "stem" in g.producers)
    assert sorted(g.producers) == ["a", "se2", "stem"] and len(g.units) == 8
    for seed in range(4):
        random_hard_gates(gm, 0.4, seed)
        assert_invariant(gm, X.clone(), smaller=True)


# ------------------------------------------------------------------------------------------ no side effects
def _structure(model):
    return [(name, type(m), tuple(sorted(m._parameters)), tuple(sorted(m._buffers)),
             len(m._forward_hooks), len(m._forward_pre_hooks), m.training) for name, m in model.named_modules()]


@pytest.mark.parametrize("training", [False, True])
def test_wrap_does_not_modify_the_model(training):
    model = realistic_stats(SharedTwice()).train(training)
    state = copy.deepcopy(model.state_dict())
    structure, text, params = _structure(model), repr(model), [id(p) for p in model.parameters()]
    gm = vpsurgery.wrap(model, (X,))
    assert gm.training == training
    assert _structure(model) == structure and repr(model) == text
    assert [id(p) for p in model.parameters()] == params
    new = model.state_dict()
    assert new.keys() == state.keys() and all(torch.equal(state[k], new[k]) for k in state)
    # the wrapped copy owns its own parameters
    assert not {id(p) for p in gm.parameters()} & set(params)
    with torch.no_grad():
        next(gm.parameters()).add_(1.0)
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in state)


def test_shrink_does_not_modify_the_gated_model():
    model = realistic_stats(SharedTwice()).eval()
    gm = vpsurgery.wrap(model, (X,))
    random_hard_gates(gm, 0.5, 0)
    gm.eval()
    state = copy.deepcopy(gm.state_dict())
    code, structure = gm.code, _structure(gm)
    plan = copy.deepcopy(vpsurgery.plan(gm))
    with torch.no_grad():
        ref = gm.eval()(X)
    for kwargs in ({}, {"keep_gates": True}, {"threshold": 0.9}):
        shrunk = vpsurgery.shrink(gm, **kwargs)
        assert shrunk is not gm
        assert gm.code == code and _structure(gm) == structure
        new = gm.state_dict()
        assert new.keys() == state.keys() and all(torch.equal(state[k], new[k]) for k in state)
        assert vpsurgery.plan(gm).groups.keys() == plan.groups.keys()
        assert [g.units for g in vpsurgery.plan(gm).groups.values()] == [g.units for g in plan.groups.values()]
        with torch.no_grad():
            assert rel_err(gm(X), ref) == 0


def test_wrapped_model_is_in_the_model_mode():
    model = realistic_stats(SharedTwice()).eval()
    gm = vpsurgery.wrap(model, (X,))
    assert all(not m.training for m in gm.modules())
