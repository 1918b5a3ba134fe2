"""Shrink: remove the structures whose gate is below the threshold, for real.

Works on a copy of the gated GraphModule: removed sections turn their add into the linear path and
their layers are dead-code-eliminated; every module, parameter and size argument that carries a
channel axis is sliced to the kept units (the rule table says how); surviving gate values are
folded into the consuming weights (or, with keep_gates, the gates are kept, sliced, for more
training). The result is re-shape-propagated and every node checked against the plan.
"""
from __future__ import annotations

import copy
import inspect
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .groups import is_tensor_meta, tensor_meta
from .insert_gates import GATES, MASKS, mask_index, site_groups
from .plan import Axis, Plan
from .sections import network_depth
from .rules import MODULE_RULES, CallArgs, lookup
from .trace import propagate_shapes

PLAN_KEY = "vpsurgery.plan"
SLICES_KEY = "vpsurgery.slices"  # qualified parameter name -> {dim: kept indices}, for optimizer state


class ShrinkError(RuntimeError):
    """The shrunk graph disagrees with the plan: a bug in a channel rule, never silently ignored."""


def plan_of(gm: fx.GraphModule) -> Plan:
    try:
        return gm.meta[PLAN_KEY]
    except (AttributeError, KeyError):
        raise ValueError("this module was not made by vpsurgery.wrap (it has no surgery plan); "
                         "call vpsurgery.wrap(model) first") from None


def decide(gm: fx.GraphModule, plan: Plan, threshold: float) -> tuple[set[int], set[str]]:
    gates = getattr(gm, GATES)
    removed_sections = {n for n in plan.sections if n in gates and float(gates[n].theta.detach()) < threshold}
    removed_units = set()
    for g in plan.groups.values():
        theta = gates[g.name].theta.detach().cpu().numpy()
        removed_units |= {u for u, t in zip(g.units, theta) if t < threshold}
    return removed_units, removed_sections


def shrink(gated: fx.GraphModule, threshold: float = 0.5, *, keep_gates: bool = False,
           removed_units: set[int] | None = None, removed_sections: set[str] | None = None) -> fx.GraphModule:
    plan = plan_of(gated)
    gm = copy.deepcopy(gated)
    gm.meta[SLICES_KEY] = {}
    if removed_units is None or removed_sections is None:
        removed_units, removed_sections = decide(gm, plan, threshold)
    removed_sections = set(removed_sections) & set(plan.sections)  # earlier shrinks removed the rest
    theta = _unit_theta(gm, plan)

    _remove_sections(gm, plan, removed_sections)
    alive = {n.name for n in gm.graph.nodes}
    decided = set(removed_units)
    removed_units = _keep_tensors_nonempty(plan, alive, removed_units, theta)
    for u in decided - removed_units:  # kept only so no tensor is empty: it still counts as removed,
        theta[u] = 0.0  # so its consumers read it with zero weight (not with its sub-threshold theta)

    _slice_modules(gm, plan, removed_units)
    _slice_params(gm, plan, removed_units)
    _rewrite_calls(gm, plan, removed_units)
    new_plan = plan.restrict(removed_units, removed_sections, set(), set())
    if keep_gates:
        _slice_gates(gm, plan, new_plan, removed_units)
    else:
        _fold_gates(gm, plan, new_plan, removed_units, theta)

    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    alive = {n.name for n in gm.graph.nodes}
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    new_plan = plan.restrict(removed_units, removed_sections,
                             {n for n in plan.node_axes if n not in alive},
                             {m for m in plan.module_axes if m not in modules})
    if not keep_gates:
        new_plan.sites, new_plan.groups, new_plan.sections = {}, {}, {}
    else:
        new_plan.sites = {k: s for k, s in new_plan.sites.items() if k in getattr(gm, MASKS, {})}
        new_plan.groups = {k: g for k, g in new_plan.groups.items() if k in getattr(gm, GATES, {})}
    _check_shapes(gm, plan, removed_units)
    new_plan.depth = network_depth(gm)
    gm.meta[PLAN_KEY] = new_plan
    return gm


def _unit_theta(gm, plan) -> dict[int, float]:
    gates = getattr(gm, GATES, {})
    out = {}
    for g in plan.groups.values():
        if g.name in gates:
            out.update(zip(g.units, gates[g.name].theta.detach().cpu().tolist()))
    return out


# ---------------------------------------------------------------------------------- dead code
# fx's dead-code elimination treats every call_method (and most calls) as pure, so it deletes an
# in-place op whose result is unused (`x.relu_()`, `y.mul_(s)`, `F.relu(x, inplace=True)`) although
# later readers of x see its effect. An in-place op stays unless nothing else reads the tensor it
# mutates (through the views and in-place ops that alias it): then it is dead with that tensor, as in
# a removed residual branch.
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "flatten", "unflatten",
                 "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "contiguous", "t", "detach", "split",
                 "chunk", "unbind", "as_strided", "movedim", "moveaxis", "swapaxes", "select", "diagonal",
                 "unfold", "real", "imag", "view_as_real", "type_as", "to", "float", "double", "half"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.narrow, torch.split, torch.chunk, torch.unbind, torch.movedim,
                   torch.moveaxis, torch.swapaxes, torch.select, torch.detach, torch.t, torch.as_strided,
                   torch.diagonal, torch.unflatten, torch.nn.functional.dropout, torch.nn.functional.dropout1d,
                   torch.nn.functional.dropout2d, torch.nn.functional.dropout3d}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _is_inplace(node: fx.Node, modules) -> bool:
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):  # torch.relu_, torch.sigmoid_, ...
            return True
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return node.kwargs.get("inplace", False) is True
        return bound.arguments.get("inplace", False) is True
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    return False


def _aliases_input(node: fx.Node, modules) -> bool:
    return _is_inplace(node, modules) or (
        (node.op == "call_method" and node.target in _VIEW_METHODS)
        or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
        or (node.op == "call_module" and isinstance(modules.get(node.target), _VIEW_MODULES)))


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())

    def impure(node: fx.Node) -> bool:
        if node.is_impure():
            return True
        if not _is_inplace(node, modules):
            return False
        prev, cur = node, (node.args[0] if node.args else None)
        while isinstance(cur, fx.Node):  # the mutated tensor and every tensor it is a view of
            if any(u is not prev for u in cur.users):
                return True
            if not _aliases_input(cur, modules):
                return False
            prev, cur = cur, (cur.args[0] if cur.args else None)
        return False

    gm.graph.eliminate_dead_code(is_impure_node=impure)


# ---------------------------------------------------------------------------------- sections
def _remove_sections(gm, plan, removed_sections):
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in removed_sections:
        s = plan.sections[name]
        add = nodes[s.add]
        add.replace_all_uses_with(add.args[1 - s.branch_arg])
        gm.graph.erase_node(add)
    eliminate_dead_code(gm)


def _keep_tensors_nonempty(plan, alive, removed, theta) -> set[int]:
    """No tensor may lose all of its channels: keep its most probable unit (its gate, if 0, is
    folded into the consumers as zero weights, so the function is unchanged)."""
    removed = set(removed)
    axes = [a for name, ax in plan.node_axes.items() if name in alive
            for a in (ax if isinstance(ax, tuple) else (ax,)) if a is not None]
    changed = True
    while changed:
        changed = False
        for ax in axes:
            if len(ax.units) and np.isin(ax.units, list(removed)).all():
                best = max(set(ax.units.tolist()), key=lambda u: theta.get(u, 1.0))
                removed.discard(best)
                changed = True
    return removed


# ---------------------------------------------------------------------------------- slicing
def _slice_modules(gm, plan, removed):
    done = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in done or node.target not in plan.module_axes:
            continue
        done.add(node.target)
        axes = plan.module_axes[node.target]
        keep = {name: torch.as_tensor(ax.keep(removed)) for name, ax in axes.items()}
        if all(len(k) == len(axes[n].units) for n, k in keep.items()):
            continue
        module = gm.get_submodule(node.target)
        rule = MODULE_RULES[type(module)]
        _set_submodule(gm, node.target, slice_module(module, rule, keep))
        for pname, dims in (rule.params(module) if rule.params else {}).items():
            if isinstance(getattr(module, pname, None), nn.Parameter):
                gm.meta[SLICES_KEY][f"{node.target}.{pname}"] = {d: keep[a] for d, a in dims.items()}


def slice_module(module: nn.Module, rule, keep: dict[str, torch.Tensor]) -> nn.Module:
    new = copy.deepcopy(module)
    for pname, dims in (rule.params(module) if rule.params else {}).items():
        t = getattr(module, pname, None)
        if t is None:
            continue
        data = t.detach()
        for d, axis in dims.items():
            data = data.index_select(d, keep[axis].to(data.device))
        if isinstance(t, nn.Parameter):
            setattr(new, pname, nn.Parameter(data.clone(), requires_grad=t.requires_grad))
        else:
            setattr(new, pname, data.clone())
    if rule.resize:
        rule.resize(new, {name: len(k) for name, k in keep.items()})
    return new


def _set_submodule(gm, target, module):
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _slice_params(gm, plan, removed):
    for target, ax in plan.param_axes.items():
        keep = ax.keep(removed)
        if len(keep) == len(ax.units):
            continue
        parent, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        t = getattr(owner, leaf, None)
        if t is None:
            continue
        data = t.detach().index_select(ax.dim, torch.as_tensor(keep, device=t.device)).clone()
        if isinstance(t, nn.Parameter):
            gm.meta[SLICES_KEY][target] = {ax.dim: torch.as_tensor(keep)}
        setattr(owner, leaf, nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data)


# ---------------------------------------------------------------------------------- call rewrites
def _new_shape(plan, name, old_shape, removed, index=None):
    ax = plan.node_axes.get(name)
    if isinstance(ax, tuple):
        ax = ax[index]
    shape = list(old_shape)
    if isinstance(ax, Axis):
        shape[ax.dim] = len(ax.keep(removed))
    return shape


class RewriteContext(CallArgs):
    """What a rule's `rewrite` sees: old and new shapes, kept positions, and edits to its node."""

    def __init__(self, gm, plan, node, removed):
        self.gm, self.plan, self.node, self.removed = gm, plan, node, removed

    def set_varargs(self, start, values):
        rest = self.node.args[start:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)) or not rest:
            if not rest:
                kwargs = dict(self.node.kwargs)
                key = next(k for k in ("shape", "size") if k in kwargs)
                kwargs[key] = tuple(values)
                self.node.kwargs = kwargs
                return
            self.node.args = self.node.args[:start] + (tuple(values),)
        else:
            self.node.args = self.node.args[:start] + tuple(values)

    def set_arg(self, i, name, value):
        if i < len(self.node.args):
            args = list(self.node.args)
            args[i] = value
            self.node.args = tuple(args)
        else:
            self.node.kwargs = {**self.node.kwargs, name: value}

    def replace_call(self, target, args):
        self.node.op, self.node.target, self.node.args, self.node.kwargs = "call_function", target, tuple(args), {}

    def is_tensor(self, value):
        return is_tensor_meta(tensor_meta(value))

    def keep_of(self, value):
        ax = self.plan.node_axes.get(value.name) if isinstance(value, fx.Node) else None
        return ax.keep(self.removed) if isinstance(ax, Axis) else None

    def axis_dim_of(self, value):
        ax = self.plan.node_axes.get(value.name)
        return ax.dim if isinstance(ax, Axis) else None

    @property
    def old_in_shape(self):
        return tuple(tensor_meta(self.node.args[0]).shape)

    @property
    def old_out_shape(self):
        return tuple(self.node.meta["tensor_meta"].shape)

    @property
    def new_out_shape(self):
        return _new_shape(self.plan, self.node.name, self.old_out_shape, self.removed)

    @property
    def old_out_shapes(self):
        return [tuple(m.shape) for m in self.node.meta["tensor_meta"]]

    @property
    def new_out_shapes(self):
        return [_new_shape(self.plan, self.node.name, s, self.removed, i) for i, s in enumerate(self.old_out_shapes)]


def _touched(plan, node, removed) -> bool:
    names = [node.name] + [a.name for a in node.all_input_nodes]
    for n in names:
        ax = plan.node_axes.get(n)
        for a in (ax if isinstance(ax, tuple) else (ax,)):
            if isinstance(a, Axis) and len(a.keep(removed)) != len(a.units):
                return True
    return False


def _rewrite_calls(gm, plan, removed):
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or "tensor_meta" not in node.meta:
            continue
        rule = lookup(node, modules)
        if rule is not None and rule.rewrite is not None and _touched(plan, node, removed):
            rule.rewrite(RewriteContext(gm, plan, node, removed))


# ---------------------------------------------------------------------------------- gates
def _fold_gates(gm, plan, new_plan, removed, theta):
    """Drop gates and masks, folding each kept unit's theta into the weights that read it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    mask_nodes = _nodes_calling(gm, MASKS)
    folded = set()
    for name, site in plan.sites.items():
        mask = mask_nodes.get(name)
        if mask is None:
            continue
        consumer = nodes[site.node]
        if consumer.target not in folded:
            folded.add(consumer.target)
            kept = site.axis.restrict(removed).units
            scale = torch.tensor([theta.get(int(u), 1.0) for u in kept])
            if not torch.all(scale == 1):
                module = gm.get_submodule(consumer.target)
                MODULE_RULES[type(module)].fold_input(module, scale)
        mask.replace_all_uses_with(mask.args[0])
        gm.graph.erase_node(mask)
    gates = getattr(gm, GATES)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith(GATES + "."):
            name = node.target.split(".", 1)[1]
            for user in list(node.users):  # section gates: x * z
                t = float(gates[name].theta.detach())
                if t == 1.0:
                    user.replace_all_uses_with(user.args[0])
                    gm.graph.erase_node(user)
                else:
                    user.update_arg(1, t)
            gm.graph.erase_node(node)
    gm.delete_submodule(GATES)
    gm.delete_submodule(MASKS)


def _nodes_calling(gm, container: str) -> dict[str, fx.Node]:
    """The call nodes of the gate or mask container, by gate/mask name."""
    return {n.target.split(".", 1)[1]: n for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith(container + ".")}


def _slice_gates(gm, plan, new_plan, removed):
    """Keep training: gates keep the theta of their surviving units; masks are re-indexed."""
    gates, masks = getattr(gm, GATES), getattr(gm, MASKS)
    gate_node, mask_nodes = _nodes_calling(gm, GATES), _nodes_calling(gm, MASKS)
    for g in plan.groups.values():
        keep = [i for i, u in enumerate(g.units) if u not in removed]
        if len(keep) == len(g.units):
            continue
        old = gates[g.name]
        if keep:
            old.theta = nn.Parameter(old.theta.detach()[keep].clone())
            gm.meta[SLICES_KEY][f"{GATES}.{g.name}.theta"] = {0: torch.as_tensor(keep)}
    for name, site in plan.sites.items():
        mask = mask_nodes.get(name)
        if mask is None:
            continue
        units = site.axis.restrict(removed).units
        used = site_groups(new_plan, units)
        if not used:
            mask.replace_all_uses_with(mask.args[0])
            gm.graph.erase_node(mask)
            del masks[name]
            continue
        masks[name] = type(masks[name])(mask_index(new_plan, units, used).to(masks[name].index.device),
                                        site.axis.dim)
        mask.args = (mask.args[0], *[gate_node[g] for g in used])
    gone = [g for g in plan.groups if g not in new_plan.groups] + [
        s for s in plan.sections if s not in new_plan.sections]
    for name in gone:
        if name not in gates:
            continue
        node = gate_node.get(name)  # removed sections' gate calls may already be dead-code-eliminated
        if node is not None and not node.users:
            gm.graph.erase_node(node)
        del gates[name]


# ---------------------------------------------------------------------------------- check
def _is_gating(node) -> bool:
    """Gate calls, masks and section-gate products: inserted by wrap, their shapes follow the gates."""
    def gate(n):
        return isinstance(n, fx.Node) and n.op == "call_module" and n.target.startswith((GATES + ".", MASKS + "."))
    return gate(node) or any(gate(a) for a in node.all_input_nodes if a.op == "call_module"
                             and a.target.startswith(GATES + "."))


def _check_shapes(gm, plan, removed):
    expected = {}
    for node in gm.graph.nodes:
        if _is_gating(node):
            continue
        meta = node.meta.get("tensor_meta")
        if is_tensor_meta(meta):
            expected[node.name] = _new_shape(plan, node.name, meta.shape, removed)
        elif isinstance(meta, (tuple, list)) and meta and all(is_tensor_meta(m) for m in meta):
            expected[node.name] = [_new_shape(plan, node.name, m.shape, removed, i) for i, m in enumerate(meta)]
    example = [torch.zeros(s, dtype=getattr(torch, d)) for s, d in plan.example]
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    propagate_shapes(gm, [e.to(device) for e in example])
    for node in gm.graph.nodes:
        if node.name not in expected:
            continue
        meta = node.meta.get("tensor_meta")
        got = list(meta.shape) if is_tensor_meta(meta) else [list(m.shape) for m in meta]
        if got != expected[node.name]:
            raise ShrinkError(f"shrinking produced shape {got} at node '{node.name}' where the plan "
                              f"expects {expected[node.name]}: a channel rule is wrong for this op "
                              f"({node.op} {node.target}); please report it")
