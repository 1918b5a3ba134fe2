"""The two capture paths (torch.fx, torch.export) and lifting functional layers into modules."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import vpsurgery
from capture_nets import DataDependent, FunctionalNet, TinyYolo
from conftest import assert_invariant, n_params, random_hard_gates, realistic_stats, rel_err

LIFTED = (F.conv2d, F.batch_norm, F.linear, F.group_norm, F.layer_norm, F.dropout, F.instance_norm)


def _calls(gm, kind):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)]


def test_functional_layers_are_lifted_into_modules_that_share_the_parameters():
    model = realistic_stats(FunctionalNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    gated = vpsurgery.wrap(model, (x,))
    assert vpsurgery.plan(gated).capture == "fx"
    assert not [n for n in gated.graph.nodes if n.op == "call_function" and n.target in LIFTED]
    assert len(_calls(gated, nn.Conv2d)) == 4 and len(_calls(gated, nn.BatchNorm2d)) == 3
    assert len(_calls(gated, nn.Linear)) == 1 and len(_calls(gated, nn.GroupNorm)) == 1
    assert len(_calls(gated, nn.InstanceNorm2d)) == 1 and len(_calls(gated, nn.LayerNorm)) == 1
    # the parameters keep their names (a BatchNorm+act layer becomes a BatchNorm2d holding the act)
    keys = set(gated.state_dict())
    assert {"bn1.weight", "bn1.running_mean", "stem.weight", "conv1.bias"} <= keys
    assert not any(k in keys for k in ("fc_w", "gn_w"))  # moved into the lifted modules, not left behind
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
    plan = vpsurgery.plan(gated)
    producers = {p for g in plan.groups.values() for p in g.producers}
    assert {"stem", "conv1", "conv2", "dw"} <= producers  # functional convs and the layer norm are prunable
    random_hard_gates(gated, 0.4, 0)
    small = assert_invariant(gated, x, smaller=True)
    assert n_params(small) < 0.8 * n_params(model)


def test_lifted_batch_norm_and_dropout_follow_train_and_eval():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    x = torch.randn(8, 3, 16, 16)
    gated = vpsurgery.wrap(model, (x,)).train()
    before = gated.bn1.running_mean.clone()
    gated(x)
    assert not torch.equal(before, gated.bn1.running_mean)  # batch statistics in train mode
    gated.eval()
    with torch.no_grad():
        a, b = gated(x), gated(x)
    assert torch.equal(a, b)  # eval: running statistics, no dropout
    assert model.bn1.running_mean.abs().sum() == 0  # the user's model is untouched


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_export_path_finds_what_fx_finds_and_shrinks_exactly(name):
    torch.manual_seed(0)
    model = realistic_stats(getattr(torchvision.models, name)(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    by_fx = vpsurgery.plan(vpsurgery.wrap(model, (x,), capture="fx"))
    gated = vpsurgery.wrap(model, (x,), capture="export")
    by_export = vpsurgery.plan(gated)
    assert by_export.capture == "export" and "torch.export" in vpsurgery.report(gated)
    assert sorted(len(g.units) for g in by_export.groups.values()) == \
        sorted(len(g.units) for g in by_fx.groups.values())
    assert len(by_export.sections) == len(by_fx.sections)
    assert by_export.prunable_share == pytest.approx(by_fx.prunable_share)
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
        assert gated(torch.randn(5, 3, 32, 32)).shape == (5, 10)  # the batch dim stays dynamic
    random_hard_gates(gated, 0.4, 1, sections=0.5)
    small = assert_invariant(gated, x, smaller=True)
    assert small(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_a_detector_fx_cannot_trace_is_captured_by_export_and_trains():
    torch.manual_seed(0)
    model = realistic_stats(TinyYolo()).eval()
    pristine = copy.deepcopy(model)  # running the model caches its grids: another graph after that
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(vpsurgery.TraceError, match="cannot trace TinyYolo"):
        vpsurgery.wrap(model, (x,), capture="fx")
    gated = vpsurgery.wrap(model, (x,))  # auto: falls back to torch.export
    plan = vpsurgery.plan(gated)
    assert plan.capture == "export" and plan.prunable_share > 0.9 and len(plan.sections) == 3
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
    # it trains: gates get gradients, batch norm uses batch statistics
    gated.train()
    before = gated.get_submodule("layers.0.bn").running_mean.clone()
    gated(x).square().mean().backward()
    assert all(g.theta.grad is not None for g in vpsurgery.gates(gated).values())
    assert not torch.equal(before, gated.get_submodule("layers.0.bn").running_mean)
    gated.zero_grad()
    random_hard_gates(gated, 0.5, 2, sections=0.6)
    small = assert_invariant(gated, x, smaller=True)
    # the kept map replays onto the dense model through the same path
    again = vpsurgery.replay(pristine, vpsurgery.kept_map(small))
    assert vpsurgery.kept_map(again)["modules"] == vpsurgery.kept_map(small)["modules"]
    assert n_params(again) == n_params(small)
    with pytest.raises(ValueError, match="kept map does not fit"):  # the model whose grids are cached
        vpsurgery.replay(model, vpsurgery.kept_map(small))


def test_a_model_neither_path_captures_gets_one_error_naming_the_line():
    with pytest.raises(vpsurgery.TraceError) as info:
        vpsurgery.wrap(DataDependent(), (torch.randn(2, 3, 8, 8),))
    msg = str(info.value)
    assert "torch.fx" in msg and "torch.export" in msg
    assert "capture_nets.py:" in msg and "x.mean() > 0" in msg  # the user's file:line and construct
    assert "leaf_modules" in msg


def test_capture_argument_is_checked():
    with pytest.raises(ValueError, match="capture='jit'"):
        vpsurgery.wrap(FunctionalNet(), (torch.randn(1, 3, 16, 16),), capture="jit")


def test_fit_trains_and_shrinks_an_exported_classifier_to_its_budget():
    from torch.utils.data import DataLoader, TensorDataset
    from capture_nets import TinyYoloClassifier

    torch.manual_seed(0)
    model = TinyYoloClassifier()
    x = torch.randn(2, 3, 16, 16)
    gated = vpsurgery.wrap(model, (x,))
    assert vpsurgery.plan(gated).capture == "export"
    g = torch.Generator().manual_seed(0)
    images = torch.randn(256, 3, 16, 16, generator=g)
    labels = (images[:, 0].mean((1, 2)) > 0).long()  # learnable: the sign of the first channel's mean
    data = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True, generator=g)
    result = vpsurgery.fit(gated, data, epochs=8, target=0.5, per="params", device="cpu", progress=False,
                           log=lambda line: None)
    small = vpsurgery.shrink(result.model).eval()
    kept = n_params(small) / result.dense_params
    assert 0.4 <= kept <= 0.6, kept
    with torch.no_grad():
        assert rel_err(small(images[:8]), result.model.eval()(images[:8])) <= 1e-5


def test_auto_keeps_the_fx_graph_when_export_cannot_capture_what_fx_hid():
    from capture_nets import HiddenBranch

    gated = vpsurgery.wrap(HiddenBranch().eval(), (torch.randn(2, 3, 8, 8),))
    plan = vpsurgery.plan(gated)
    assert plan.capture == "fx" and any("branchy" in u.reason for u in plan.unprunable)


def test_auto_exports_a_call_fx_keeps_whole_alone_and_splices_it_in(monkeypatch):
    """A user's fx-wrapped helper with Python control flow on sizes: fx keeps each call whole (its
    channels pinned); auto exports the call alone, once per signature, and splices its ops in."""
    import vpsurgery.passes.capture.inline as inline
    from capture_nets import WrappedHelperNet

    torch.manual_seed(0)
    model = realistic_stats(WrappedHelperNet()).eval()
    pristine = copy.deepcopy(model)
    x = torch.randn(1, 3, 16, 16)  # batch 1: the calls are exported at batch 2, dim 0 left free
    by_fx = vpsurgery.plan(vpsurgery.wrap(model, (x,), capture="fx"))
    assert by_fx.capture == "fx" and any("windowed_mix" in u.reason for u in by_fx.unprunable)

    captures = []
    real = inline._capture
    monkeypatch.setattr(inline, "_capture", lambda *a: captures.append(a[1]) or real(*a))
    gated = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gated)
    assert len(captures) == 2  # three calls, two signatures
    assert plan.capture == "fx+export" and "calls fx keeps whole" in vpsurgery.report(gated)
    assert plan.prunable_share > by_fx.prunable_share and plan.prunable_share > 0.9, vpsurgery.report(gated)
    assert not any(n.op == "call_function" and getattr(n.target, "__name__", "") == "windowed_mix"
                   for n in gated.graph.nodes)
    assert len(_calls(gated, nn.Conv2d)) == 5  # stem, out and the three functional 1x1 convs, lifted
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
        xs = torch.randn(4, 3, 16, 16)
        assert rel_err(gated(xs), model(xs)) <= 1e-6  # the batch dim stays dynamic
    random_hard_gates(gated, 0.4, 3, sections=0.5)
    small = assert_invariant(gated, x, smaller=True)
    assert small(torch.randn(3, 3, 16, 16)).shape == (3, 10)
    again = vpsurgery.replay(pristine, vpsurgery.kept_map(small))  # the map replays through auto
    assert vpsurgery.kept_map(again)["modules"] == vpsurgery.kept_map(small)["modules"]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_layer_with_a_computed_bias_is_lifted_and_its_bias_parameters_shrink(capture):
    """A bias computed from parameters (scaled; a q/k/v bias with a zero k part) becomes a bias-free
    layer plus an add; the parameters it is made of shrink with the layer's output channels."""
    from capture_nets import ComputedBiasNet

    torch.manual_seed(0)
    model = ComputedBiasNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gated = vpsurgery.wrap(model, (x,), capture=capture)
    plan = vpsurgery.plan(gated)
    assert len(_calls(gated, nn.Conv2d)) == 1 and len(_calls(gated, nn.Linear)) == 2
    # every output channel but fc's (they reach the model output); k's zero bias is zeros_like(v's
    # bias), as long as it at run time, so k and v channel i are one unit: 12 conv + 24 qkv units
    assert plan.prunable_share == pytest.approx(48 / 58), vpsurgery.report(gated)
    assert sorted(len(g.units) for g in plan.groups.values()) == [12, 24]
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6
    random_hard_gates(gated, 0.5, 1)
    small = assert_invariant(gated, x, smaller=True)
    q_bias = next(p for n, p in small.named_parameters() if n.endswith("q_bias"))
    assert len(q_bias) < 12 and small.get_submodule(_calls(small, nn.Conv2d)[0].target).out_channels < 12


def test_a_batch_of_one_graph_keeps_its_wrapped_calls_whole_and_still_wraps():
    from capture_nets import BatchOfOneHelperNet

    torch.manual_seed(0)
    model = BatchOfOneHelperNet().eval()
    x = torch.randn(1, 3, 6, 6)
    gated = vpsurgery.wrap(model, (x,))
    plan = vpsurgery.plan(gated)
    assert plan.capture == "fx" and any("windowed_mix" in u.reason for u in plan.unprunable)
    with torch.no_grad():
        assert rel_err(gated(x), model(x)) <= 1e-6


class _SizedAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.conv(x).flatten(2).transpose(1, 2)
        return self.attn(y, y, y)[0] + x.size(1)


def test_complete_shapes_records_new_nodes_on_meta_without_running_the_model():
    from vpsurgery.passes.capture.attention import split_attention
    from vpsurgery.passes.capture.trace import complete_shapes, propagate_shapes, trace
    x = torch.randn(2, 3, 8, 8)
    gm = trace(_SizedAdd().eval(), (x,))
    assert split_attention(gm) == 1
    new = [n for n in gm.graph.nodes if n.op != "output" and n.op != "get_attr" and "type" not in n.meta]
    assert new
    conv_runs = []
    gm.conv.register_forward_hook(lambda *a: conv_runs.append(1))
    complete_shapes(gm, (x,))
    assert not conv_runs  # the nodes that had shapes were not run again
    got = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}
    propagate_shapes(gm, (x,))
    assert conv_runs  # (the hook does fire when the graph runs)
    assert got == {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}


def test_complete_shapes_runs_the_graph_when_a_new_node_reads_an_unrecorded_value():
    from vpsurgery.passes.capture.trace import complete_shapes, propagate_shapes, trace
    x = torch.randn(2, 3, 8, 8)
    gm = trace(_SizedAdd().eval(), (x,))
    size = next(n for n in gm.graph.nodes if n.target == "size")
    assert "tensor_meta" not in size.meta  # an int: ShapeProp keeps its type only
    with gm.graph.inserting_after(size):
        twice = gm.graph.call_function(operator.mul, (size, 2))
    with gm.graph.inserting_after(twice):
        ones = gm.graph.call_function(torch.ones, (twice,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], ones),)
    gm.recompile()
    complete_shapes(gm, (x,))
    assert tuple(ones.meta["tensor_meta"].shape) == (6,) and twice.meta["type"] is int
    got = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}
    propagate_shapes(gm, (x,))
    assert got == {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}


class _MadeInForward(nn.Module):
    """Makes a CPU tensor inside forward: it cannot meet a meta tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.arange(y.shape[-1], dtype=y.dtype)


def _records(gm):
    def record(meta):
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):
            return tuple(record(m) for m in meta)
        return (tuple(meta.shape), meta.dtype) if hasattr(meta, "shape") else meta
    return {n.name: record(n.meta["tensor_meta"]) if "tensor_meta" in n.meta else n.meta.get("type")
            for n in gm.graph.nodes}


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "vit_b_16"])
def test_a_slow_propagation_finishes_on_the_meta_device_with_the_same_shapes(name, monkeypatch):
    import importlib
    trace_mod = importlib.import_module("vpsurgery.passes.capture.trace")
    torch.manual_seed(0)
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    model = torchvision.models.get_model(name, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = trace_mod.trace(model, (x,))
    real = _records(gm)
    monkeypatch.setattr(trace_mod, "SWITCH_AFTER_S", 0.0)  # every run is "slow" from its first node
    monkeypatch.setattr(trace_mod, "SLOW_NODE_S", 0.0)
    layers = [m for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ran = []
    for m in layers:
        m.register_forward_hook(lambda mod, i, o: ran.append(o.device.type))
    trace_mod.propagate_shapes(gm, (x,))
    assert ran and set(ran) == {"meta"}  # nothing ran for real
    assert _records(gm) == real
    assert all(p.device.type == "cpu" for p in gm.parameters())  # the weights are back


def test_a_graph_the_meta_device_cannot_finish_is_run_for_real(monkeypatch):
    import importlib
    trace_mod = importlib.import_module("vpsurgery.passes.capture.trace")
    x = torch.randn(2, 3, 8, 8)
    gm = trace_mod.trace(_MadeInForward(), (x,))
    real = _records(gm)
    monkeypatch.setattr(trace_mod, "SWITCH_AFTER_S", 0.0)
    monkeypatch.setattr(trace_mod, "SLOW_NODE_S", 0.0)
    ran = []
    gm.conv.register_forward_hook(lambda mod, i, o: ran.append(o.device.type))
    trace_mod.propagate_shapes(gm, (x,))
    assert ran == ["meta", "cpu"]  # tried on meta, then run for real
    assert _records(gm) == real


def test_later_propagations_go_to_meta_only_where_the_first_real_one_was_slow(monkeypatch):
    import importlib
    trace_mod = importlib.import_module("vpsurgery.passes.capture.trace")
    batch_mod = importlib.import_module("vpsurgery.passes.analyse.batch")
    x = torch.randn(2, 3, 16, 16)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    for slow in (False, True):
        if slow:  # every run is "slow" from its first node
            monkeypatch.setattr(trace_mod, "SWITCH_AFTER_S", 0.0)
            monkeypatch.setattr(trace_mod, "SLOW_NODE_S", 0.0)
        gm = trace_mod.trace(model, (x,))
        assert trace_mod.slow_to_run(gm) is slow
        ran = []
        gm.get_submodule("0").register_forward_hook(lambda mod, i, o: ran.append(o.device.type))
        nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
        assert batch_mod.batch_leads(gm, nodes, (x,))
        batch_mod.propagate_cheaply(gm, [x])
        assert ran == (["meta", "meta"] if slow else ["cpu", "cpu"])
        assert trace_mod.slow_to_run(gm) is slow  # a meta run does not overwrite what the real one measured
        assert tuple(nodes[-1].meta["tensor_meta"].shape) == (2, 4, 12, 12)


class _InplaceFunctional(torch.nn.Module):
    """In-place ReLUs (made out of place by wrap) and a functional conv (lifted): two rewrites."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.w = torch.nn.Parameter(torch.randn(4, 8, 1, 1))
        self.act = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        return torch.nn.functional.conv2d(self.act(self.conv(x)), self.w).relu_().mean((2, 3))


def test_wrap_generates_the_gated_code_once_and_it_is_current(monkeypatch):
    import torch.fx as fx
    calls = []
    real = fx.GraphModule.recompile
    monkeypatch.setattr(fx.GraphModule, "recompile", lambda self: (calls.append(self), real(self))[1])
    x = torch.randn(2, 3, 8, 8)
    model = _InplaceFunctional().eval()
    gated = vpsurgery.wrap(model, (x,))
    # the trace's GraphModule makes its code when built; the rewrites after it share one recompile
    assert len(calls) == 2 and calls[-1] is gated
    assert gated.code == fx.GraphModule(gated, gated.graph).code  # not stale
    assert ".relu_(" not in gated.code and "self.conv2d(" in gated.code  # both rewrites are in the code
    with torch.no_grad():
        assert torch.allclose(gated(x), model(x))


def test_one_recompile_defers_to_the_end_of_the_block_even_when_it_raises():
    import torch.fx as fx
    from vpsurgery.passes.codegen import one_recompile, recompile
    gm = fx.symbolic_trace(torch.nn.ReLU())
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    with pytest.raises(RuntimeError):
        with one_recompile():
            node.target = torch.sigmoid
            recompile(gm)
            with one_recompile():  # nested: still the outer block's
                recompile(gm)
            assert "sigmoid" not in gm.code  # deferred
            raise RuntimeError("a pass failed")
    assert "sigmoid" in gm.code
    node.target = torch.tanh
    recompile(gm)  # outside a block: at once
    assert "tanh" in gm.code


def test_a_wrapped_helper_that_mutates_its_list_arguments_runs_in_every_shape_pass():
    from capture_nets import MutatingHelperNet
    x = torch.randn(2, 3, 6, 5)
    gated = vpsurgery.wrap(MutatingHelperNet().eval(), (x,))  # was: 'immutable_list' does not support mutation
    assert vpsurgery.plan(gated).per_example  # the batch check ran it too
    random_hard_gates(gated, 0.5, 0)
    assert_invariant(gated, x)  # and shrink's shape check
