"""A gated GraphModule carries its Plan (in `gm.meta`), through deepcopy, copy.copy, pickle and
torch.save of the whole module: `set_plan` attaches it, `plan_of` reads it back (restoring it after
unpickling) or says how to save instead."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .capture.trace import propagate_shapes
from .gate.insert import GATES, MASKS
from .plan import Plan

PLAN_KEY = "vpsurgery.plan"
# GraphModule pickles its __dict__ but rebuilds itself with an empty `meta` (torch.save, pickle and
# copy.copy of a whole module): an attribute that is the same dict as `meta` comes back, and restores it.
SAVED_META = "_vpsurgery_meta"
NODES_KEY = "vpsurgery.nodes"  # node names in graph order, checked against the graph rebuilt on load


def set_plan(gm: fx.GraphModule, plan: Plan) -> None:
    gm.meta[PLAN_KEY] = plan
    gm.meta[NODES_KEY] = [(n.name, n.op) for n in gm.graph.nodes]
    _keep_meta(gm)


def _keep_meta(gm: fx.GraphModule) -> None:
    gm.__dict__[SAVED_META] = gm.meta
    hooks = gm.__dict__.get("_deepcopy_hooks")
    if isinstance(hooks, list) and _keep_meta not in hooks:
        hooks.append(_keep_meta)  # deepcopy builds a fresh module: alias its (copied) meta again


def _containers_as_dicts(gm: fx.GraphModule) -> None:
    """copy.copy of a GraphModule rebuilds the gate and mask containers as plain Modules: make them
    ModuleDicts again (same children)."""
    for name in (GATES, MASKS):
        container = gm._modules.get(name)
        if container is not None and not isinstance(container, nn.ModuleDict):
            gm._modules[name] = nn.ModuleDict(dict(container.named_children()))


_HOW_TO_SAVE = ("torch.save(gated.state_dict()), then vpsurgery.wrap(model) on the original model again and "
                "load_state_dict; for a shrunk model, save vpsurgery.kept_map(small) too and rebuild it with "
                "vpsurgery.replay(model, kept_map) before load_state_dict")


def _rename_nodes(gm: fx.GraphModule, names: list[str]) -> None:
    """The same graph with the given node names (in order): rebuilt, since fx never frees a name."""
    graph, env = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls), {}
    for node, name in zip(gm.graph.nodes, names):
        env[node] = graph.create_node(node.op, node.target, fx.map_arg(node.args, env.__getitem__),
                                      fx.map_arg(node.kwargs, env.__getitem__), name=name, type_expr=node.type)
        env[node].meta = dict(node.meta)
    gm.graph = graph  # the setter regenerates the code


def plan_of(gm: fx.GraphModule) -> Plan:
    meta = getattr(gm, "meta", None) if isinstance(gm, fx.GraphModule) else None
    if isinstance(meta, dict) and PLAN_KEY in meta:
        if gm.__dict__.get(SAVED_META) is not meta:
            _keep_meta(gm)
        _containers_as_dicts(gm)
        return meta[PLAN_KEY]
    saved = gm.__dict__.get(SAVED_META) if isinstance(gm, fx.GraphModule) else None
    if isinstance(saved, dict) and PLAN_KEY in saved:
        return _restore(gm, saved)
    if isinstance(gm, nn.Module) and GATES in gm._modules:
        raise ValueError("this module has vpsurgery gates but lost its surgery plan (a whole gated model saved "
                         "by another tool or an older vpsurgery?): save and restore it instead as "
                         + _HOW_TO_SAVE) from None
    raise ValueError("this module was not made by vpsurgery.wrap (it has no surgery plan); "
                     "call vpsurgery.wrap(model) first") from None


def _restore(gm: fx.GraphModule, saved: dict) -> Plan:
    """After unpickling: put the plan back, check the rebuilt graph has the same nodes, and
    re-propagate the shapes (node metadata does not survive pickling)."""
    nodes = [(n.name, n.op) for n in gm.graph.nodes]
    want = [tuple(x) for x in saved.get(NODES_KEY, nodes)]
    if want != nodes and [op for _, op in want] == [op for _, op in nodes]:
        _rename_nodes(gm, [name for name, _ in want])  # the rebuilt graph numbers its nodes afresh
        nodes = [(n.name, n.op) for n in gm.graph.nodes]
    if want != nodes:
        raise ValueError("this module was saved as a whole and its graph came back different from the one "
                         "its surgery plan describes; save and restore it instead as " + _HOW_TO_SAVE)
    for k, v in gm.meta.items():
        saved.setdefault(k, v)
    gm.meta = saved
    _keep_meta(gm)
    plan = saved[PLAN_KEY]
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        propagate_shapes(gm, [torch.zeros(s, dtype=getattr(torch, d), device=device) for s, d in plan.example])
    return plan
