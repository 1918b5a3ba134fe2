"""Residual sections: an add whose one input is a linear path (identity, or a projection such as
1x1 conv + BN) and whose other input is a nonlinear branch used by nothing else. Gating the branch
to 0 turns the add into its linear path and removes the branch's layers (the second paper)."""
from __future__ import annotations

import heapq
import operator
from collections import Counter

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.trace import tensor_meta
from ..codegen import recompile
from ..rules import _same, facts, lookup
from ..plan import Section, Unprunable
from .cost import call_macs, graph_batch

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", torch.ops.aten.add.Tensor}


def graph_of(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def is_linear(node: fx.Node, modules) -> bool:
    """An affine map (rules' `linear` fact): a path made only of these is a linear residual connection."""
    return facts(node, modules).linear


def layer_count(node: fx.Node, modules) -> int:
    """Sequential weight layers in one node (rules' `layer` fact; attention: its two projections)."""
    return facts(node, modules).layer


def is_layer(node: fx.Node, modules) -> bool:
    """A conv/linear layer: one weight layer (attention, with two, is not one)."""
    return layer_count(node, modules) == 1


def find_sections(gm: fx.GraphModule, exclude: frozenset[str] = frozenset()
                  ) -> tuple[dict[str, Section], list[Unprunable]]:
    """Residual sections, except those whose branch holds a module named in `exclude`."""
    modules = dict(gm.named_modules())
    graph = graph_of(gm)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    live = nx.ancestors(graph, output)  # a dead user (`_` of `x, _ = attn(...)`) is no outside use
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    whole = _GraphFacts(gm, modules, order)
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
        only = exclusive_ancestors(a, b, order)
        linear = [all(is_linear(n, modules) for n in side) for side in only]
        if linear[0] == linear[1]:
            why = "both inputs are nonlinear" if not linear[0] else "both inputs are linear"
            skipped.setdefault(f"add is not a residual section: {why}", []).append(add.name)
            continue
        branch_arg = 0 if linear[1] else 1
        nodes = only[branch_arg]
        if any(n.op == "placeholder" for n in nodes) or any(
                u not in nodes and u is not add and u in live for n in nodes for u in n.users):
            skipped.setdefault("residual branch is also used outside the section", []).append(add.name)
            continue
        section = _section(whole, graph, add, branch_arg, nodes)
        if exclude & set(section.modules):
            skipped.setdefault("residual branch holds a module excluded by wrap(exclude=...)", []).append(add.name)
            continue
        sections[section.name] = section
    return sections, [Unprunable(reason, names, []) for reason, names in skipped.items()]


def exclusive_ancestors(a: fx.Node, b: fx.Node, order: dict) -> tuple[set, set]:
    """(a and its ancestors that are not b's, b and its ancestors that are not a's).

    Walks back from both at once, latest node first, marking each node with the inputs it reaches
    (1: a, 2: b; final when it is taken, its users all being later), and stops once every open
    node reaches both: what lies behind those is shared. A residual block costs its own size, not
    two walks to the graph's input (nx.ancestors), which made the sections pass quadratic."""
    reach = {a: 1, b: 2} if a is not b else {a: 3}
    heap = [(-order[n], n.name, n) for n in reach]
    heapq.heapify(heap)
    open_partial = sum(r != 3 for r in reach.values())  # open nodes that reach only one side
    only: tuple[set, set] = (set(), set())
    while open_partial:
        _, _, n = heapq.heappop(heap)
        r = reach[n]
        if r == 3:
            continue
        open_partial -= 1
        only[r - 1].add(n)
        for p in n.all_input_nodes:
            before = reach.get(p)
            if before is None:
                reach[p] = r
                heapq.heappush(heap, (-order[p], p.name, p))
                open_partial += 1
            elif before | r != before:
                reach[p] = 3
                open_partial -= before != 3  # a partial node that is open turns whole
    return only


class _GraphFacts:
    """What every section of one graph reads: node order, how often each module and attribute is
    used, the batch size the costs are divided by."""

    def __init__(self, gm, modules, order):
        self.gm, self.modules, self.order = gm, modules, order
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.reads = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
        self.batch = graph_batch(gm.graph)


def _section(whole: _GraphFacts, graph, add, branch_arg, nodes) -> Section:
    gm, modules = whole.gm, whole.modules
    names = sorted(nodes, key=whole.order.get)
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    own = sorted(t for t, k in calls.items() if k == whole.calls[t])  # modules no node outside calls
    reads = Counter(n.target for n in nodes if n.op == "get_attr")
    attrs = {t for t, k in reads.items() if k == whole.reads[t]}  # e.g. layer scale
    params = sum(p.numel() for m in own for p in modules[m].parameters()) + sum(
        _attr(gm, t).numel() for t in attrs if isinstance(_attr(gm, t), nn.Parameter))
    macs = sum(call_macs(n, modules, whole.batch) or 0 for n in nodes)
    sub = graph.subgraph(nodes)
    depth = _layer_depth(sub, modules)
    return Section(f"sec_{add.name}", add.name, branch_arg, [n.name for n in names], own, params, int(macs), depth)


def _attr(gm, target):
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _layer_depth(graph: nx.DiGraph, modules) -> int:
    """Conv/linear layers on the longest path of a DAG of fx nodes."""
    best: dict = {}
    for n in nx.topological_sort(graph):
        here = layer_count(n, modules)
        best[n] = here + max((best[p] for p in graph.predecessors(n)), default=0)
    return max(best.values(), default=0)


def network_depth(gm: fx.GraphModule) -> int:
    return _layer_depth(graph_of(gm), dict(gm.named_modules()))


# ------------------------------------------------------------------------------ plain networks
def _is_unary_tail(node: fx.Node, modules) -> bool:
    """BN, activations, dropout: ops that follow a layer channel by channel."""

    rule = lookup(node, modules)
    if rule is None:
        return False
    if rule.analyse is _same:
        return True
    return node.op == "call_module" and isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm)


def _is_nonlinear(node: fx.Node, modules) -> bool:
    return facts(node, modules).nonlinear


def add_residuals(gm: fx.GraphModule) -> list[str]:
    """Put an identity shortcut around every shape-preserving layer of a plain network.

    A candidate is a conv/linear layer plus its channel-wise tail (BN, activation, dropout), whose
    output has exactly the shape of its input and which contains a nonlinearity: `y = f(x)` becomes
    `y = x + f(x)`. This changes the function computed (the network must be (re)trained); it is what
    lets the layer be removed later while information still flows. Returns the new add nodes.
    """
    modules = dict(gm.named_modules())
    added = []
    for layer in list(gm.graph.nodes):
        if not is_layer(layer, modules) or not layer.args or not isinstance(layer.args[0], fx.Node):
            continue
        x = layer.args[0]
        end, nonlinear = layer, False
        while len(end.users) == 1 and _is_unary_tail(next(iter(end.users)), modules):
            end = next(iter(end.users))
            nonlinear |= _is_nonlinear(end, modules)
        if not nonlinear or tensor_meta(x) is None or tuple(tensor_meta(x).shape) != tuple(tensor_meta(end).shape):
            continue
        users = list(end.users)
        with gm.graph.inserting_after(end):
            add = gm.graph.call_function(operator.add, (x, end))
        for u in users:
            u.replace_input_with(end, add)
        add.meta["tensor_meta"] = end.meta["tensor_meta"]
        added.append(add.name)
    gm.graph.lint()
    recompile(gm)
    return added
