"""Residual sections: an add whose one input is a linear path (identity, or a projection such as
1x1 conv + BN) and whose other input is a nonlinear branch used by nothing else. Gating the branch
to 0 turns the add into its linear path and removes the branch's layers (the second paper)."""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from .groups import tensor_meta
from .plan import Section, Unprunable

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}

# Ops that are linear (affine) maps: a path made only of these is a "linear residual connection".
_LINEAR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                   nn.BatchNorm3d, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten)
_LINEAR_CALLS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                 "unsqueeze", torch.flatten, torch.permute, torch.transpose, torch.reshape,
                 torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d}


def graph_of(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def is_linear(node: fx.Node, modules) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "call_module":
        return type(modules[node.target]) in _LINEAR_MODULES
    if node.op in ("call_function", "call_method"):
        return node.target in _LINEAR_CALLS
    return False


def is_layer(node: fx.Node, modules) -> bool:
    return node.op == "call_module" and isinstance(
        modules[node.target], (nn.modules.conv._ConvNd, nn.Linear))


def find_sections(gm: fx.GraphModule) -> tuple[dict[str, Section], list[Unprunable]]:
    modules = dict(gm.named_modules())
    graph = graph_of(gm)
    sections, skipped = {}, {}
    for add in gm.graph.nodes:
        if add.op not in ("call_function", "call_method") or add.target not in _ADDS:
            continue
        args = [a for a in add.args if isinstance(a, fx.Node) and tensor_meta(a) is not None]
        if len(args) != 2 or len(add.args) != 2 or add.kwargs:
            continue
        a, b = args
        if tuple(tensor_meta(a).shape) != tuple(tensor_meta(b).shape):
            skipped.setdefault("residual add whose inputs only match by broadcasting", []).append(add.name)
            continue
        only = [(nx.ancestors(graph, x) | {x}) - (nx.ancestors(graph, y) | {y}) for x, y in ((a, b), (b, a))]
        linear = [all(is_linear(n, modules) for n in side) for side in only]
        if linear[0] == linear[1]:
            why = "both inputs are nonlinear" if not linear[0] else "both inputs are linear"
            skipped.setdefault(f"add is not a residual section: {why}", []).append(add.name)
            continue
        branch_arg = 0 if linear[1] else 1
        nodes = only[branch_arg]
        if any(n.op == "placeholder" for n in nodes) or any(
                u not in nodes and u is not add for n in nodes for u in n.users):
            skipped.setdefault("residual branch is also used outside the section", []).append(add.name)
            continue
        sections[f"sec_{add.name}"] = _section(gm, modules, graph, add, branch_arg, nodes)
    return sections, [Unprunable(reason, names, []) for reason, names in skipped.items()]


def _section(gm, modules, graph, add, branch_arg, nodes) -> Section:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    names = sorted(nodes, key=order.get)
    layer_modules = {n.target for n in nodes if n.op == "call_module"}
    used_elsewhere = {n.target for n in gm.graph.nodes if n.op == "call_module" and n not in nodes}
    own = sorted(layer_modules - used_elsewhere)
    params = sum(p.numel() for m in own for p in modules[m].parameters())
    macs = 0
    for n in nodes:
        if is_layer(n, modules):
            w = modules[n.target].weight
            shape = tensor_meta(n).shape
            macs += (shape.numel() // max(shape[0], 1)) * w[0].numel() if len(shape) > 1 else w.numel()
    sub = graph.subgraph(nodes)
    depth = _layer_depth(sub, modules)
    return Section(f"sec_{add.name}", add.name, branch_arg, [n.name for n in names], own, params, int(macs), depth)


def _layer_depth(graph: nx.DiGraph, modules) -> int:
    """Conv/linear layers on the longest path of a DAG of fx nodes."""
    best: dict = {}
    for n in nx.topological_sort(graph):
        here = 1 if is_layer(n, modules) else 0
        best[n] = here + max((best[p] for p in graph.predecessors(n)), default=0)
    return max(best.values(), default=0)


def network_depth(gm: fx.GraphModule) -> int:
    return _layer_depth(graph_of(gm), dict(gm.named_modules()))
