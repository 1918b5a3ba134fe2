"""Shrink: remove the structures whose gate is below the threshold, for real.

Works on a copy of the gated GraphModule (or, in place, on it): removed sections turn their add
into the linear path and their layers are dead-code-eliminated; every module, parameter and size
argument that carries a channel axis is sliced to the kept units (the rule table says how);
surviving gate values are folded into the consuming weights (or, with keep_gates, the gates are
kept, sliced, for more training). The result is re-shape-propagated and every node checked
against the plan.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
import itertools
import numbers
import operator
import warnings

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from ..capture.trace import evaluating, is_tensor_meta, tensor_meta
from ..capture.inplace import free_name, is_inplace, may_alias
from ..gate.insert import GATES, MASKS, mask_index, site_groups
from ..gate.modules import GATED_NORMS, gate_norm, ungate_norm
from ..attach import PLAN_KEY, plan_of, set_plan
from ..plan import Axis, Plan, removed_mask
from ..analyse.batch import propagate_cheaply
from ..analyse.sections import network_depth
from ..rules import CallArgs, lookup, module_rule, size_deps
from ..capture.trace import NodeFailure
from ..copying import copy_module



class ShrinkError(RuntimeError):
    """The shrunk graph disagrees with the plan: a bug in a channel rule, never silently ignored."""


@dataclass(frozen=True)
class Decision:
    """What a shrink removes: unit ids and section names (explicit, so that a trainer decides by
    its own rule and shrink never guesses)."""

    units: frozenset[int] = frozenset()
    sections: frozenset[str] = frozenset()

    @classmethod
    def below(cls, gated: fx.GraphModule, threshold: float, *, inclusive: bool = False,
              new_only: bool = False) -> "Decision":
        """Every structure whose theta is below `threshold` (at or below, with inclusive=True).
        new_only: leave out the units an earlier shrink already had to keep so that no tensor went
        empty (a trainer checking often would otherwise shrink for nothing each time)."""
        plan, gates = plan_of(gated), getattr(gated, GATES, {})
        off = (lambda t: t <= threshold) if inclusive else (lambda t: t < threshold)
        sections = {n for n in plan.sections if n in gates and off(float(gates[n].theta.detach()))}
        units = set()
        for g in plan.groups.values():
            if g.name in gates:
                units |= {int(u) for u, t in zip(g.units, gates[g.name].theta.detach().cpu().tolist()) if off(t)}
        return cls(frozenset(units - plan.kept_anyway if new_only else units), frozenset(sections))

    def __bool__(self) -> bool:
        return bool(self.units or self.sections)


@dataclass
class ShrinkResult:
    model: fx.GraphModule  # the smaller graph; its plan is `plan`
    plan: Plan
    slices: dict[str, dict[int, torch.Tensor]]  # parameter name -> {dim: kept indices}, for optimizer state
    kept_anyway: frozenset[int]  # decided units kept so that no tensor is empty (their weights read 0)
    baked: dict[str, str]  # parametrization original -> the new parameter that took its place (_bake)


def shrink_to(gated: fx.GraphModule, decision: Decision, *, keep_gates: bool = False,
              inplace: bool = False) -> ShrinkResult:
    """Remove exactly what `decision` says. The gated model is not modified, unless `inplace`: then
    it is the model shrunk (no copy made first)."""
    plan = plan_of(gated)
    stage = ["starting on the gated model" if inplace else "copying the gated model"]
    try:
        slices: dict[str, dict[int, torch.Tensor]] = {}  # filled by the slicing steps
        baked: dict[str, str] = {}
        gm = _shrink(gated, plan, keep_gates, set(decision.units), set(decision.sections), slices, stage,
                     inplace, baked)
    except ShrinkError:
        raise
    except Exception as e:
        raise _internal(e, stage[0]) from e
    new_plan = plan_of(gm)
    return ShrinkResult(gm, new_plan, slices, new_plan.kept_anyway - plan.kept_anyway, baked)


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"shrink: threshold must be a number in (0, 1] (structures whose theta is below it "
                         f"are removed; the default is 0.5), got {threshold!r}")
    return float(threshold)


def shrink(gated: fx.GraphModule, threshold: float = 0.5, *, keep_gates: bool = False,
           inplace: bool = False) -> fx.GraphModule:
    """The smaller graph without the structures whose theta < threshold (a number in (0, 1])."""
    decision = Decision.below(gated, check_threshold(threshold))
    return shrink_to(gated, decision, keep_gates=keep_gates, inplace=inplace).model


def _shrink(gated, plan, keep_gates, removed_units, removed_sections, slices, stage, inplace, baked):
    gm = gated if inplace else _copy_sharing_tensors(gated, plan)
    removed_sections = set(removed_sections) & set(plan.sections)  # earlier shrinks removed the rest
    theta = _unit_theta(gm, plan)

    stage[0] = "removing residual sections"
    _remove_sections(gm, plan, removed_sections)
    alive = {n.name for n in gm.graph.nodes}
    decided = set(removed_units)
    removed_units = _keep_tensors_nonempty(plan, alive, removed_units, theta)
    for u in decided - removed_units:  # kept only so no tensor is empty: it still counts as removed,
        theta[u] = 0.0  # so its consumers read it with zero weight (not with its sub-threshold theta)
    gone = removed_mask(removed_units)  # what Axis.keep reads fastest

    renorm: dict[str, list[tuple[str, int]]] = {}  # baked layers that were weight_norm'ed: (weight, dim)
    _slice_modules(gm, plan, gone, slices, stage, baked, renorm)
    stage[0] = "slicing parameters"
    _slice_params(gm, plan, gone, slices)
    if not inplace:
        _unshare_tensors(gm, gated)  # before anything writes into a tensor (folding the gates)
    stage[0] = "rewriting size arguments"
    _rewrite_calls(gm, plan, gone)
    new_plan = plan.restrict(removed_units, removed_sections)
    stage[0] = "slicing the gates" if keep_gates else "folding the gates into the weights"
    if keep_gates:
        _slice_gates(gm, plan, new_plan, removed_units, slices)
    else:
        _fold_gates(gm, plan, new_plan, gone, theta, baked, renorm)
    _weight_norm_again(gm, renorm, baked)

    stage[0] = "removing dead code"
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    alive = {n.name for n in gm.graph.nodes}
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    new_plan = new_plan.forget({n for n in plan.node_axes if n not in alive},
                               {m for m in plan.module_axes if m not in modules})
    if not keep_gates:
        new_plan = replace(new_plan, sites={}, groups={}, sections={})
    else:
        gated_norms = {n.name for n in gm.graph.nodes if n.op == "call_module" and len(n.args) > 1
                       and isinstance(gm.get_submodule(n.target), GATED_NORMS)}
        new_plan = replace(new_plan, sites={k: s for k, s in new_plan.sites.items()
                                            if k in getattr(gm, MASKS, {}) or s.node in gated_norms},
                           groups={k: g for k, g in new_plan.groups.items() if k in getattr(gm, GATES, {})})
    stage[0] = "checking the shrunk graph's shapes"
    _check_shapes(gm, plan, gone)
    set_plan(gm, replace(new_plan, depth=network_depth(gm),
                         kept_anyway=frozenset(plan.kept_anyway | (decided - removed_units))))
    return gm


def _copy_sharing_tensors(gated, plan) -> fx.GraphModule:
    """A deep copy of `gated` that still holds gated's parameters and buffers (and plan): most
    tensors are about to be sliced into new ones, so copying them first would be wasted;
    `_unshare_tensors` copies the others."""
    memo = {id(plan): plan}  # read, and replaced at the end
    for t in itertools.chain(gated.parameters(), gated.buffers()):
        memo[id(t)] = t
    return copy_module(gated, memo)


def _unshare_tensors(gm, gated) -> None:
    """Give `gm` its own copy of every tensor it still shares with `gated` (a tensor held by several
    modules stays one tensor, as a deep copy keeps it)."""
    theirs = {id(t) for t in itertools.chain(gated.parameters(), gated.buffers())}
    copies: dict[int, torch.Tensor] = {}

    def own(t):
        if id(t) not in copies:
            copies[id(t)] = copy.deepcopy(t)
        return copies[id(t)]

    for module in gm.modules():
        for table in (module._parameters, module._buffers, module.__dict__):
            for name, t in list(table.items()):
                if isinstance(t, torch.Tensor) and id(t) in theirs:
                    table[name] = own(t)


def _unit_theta(gm, plan) -> dict[int, float]:
    gates = getattr(gm, GATES, {})
    out = {}
    for g in plan.groups.values():
        if g.name in gates:
            out.update(zip(g.units, gates[g.name].theta.detach().cpu().tolist()))
    return out


# ---------------------------------------------------------------------------------- dead code
# fx's dead-code elimination treats every call_method (and most calls) as pure, so it would delete
# an in-place op whose result is unused although later readers of its input see its effect. Wrap
# makes in-place ops out-of-place where it can (passes/inplace.py); one left in place stays unless
# nothing else reads the tensor it mutates (through the views and in-place ops that alias it): then
# it is dead with that tensor, as in a removed residual branch.
def eliminate_dead_code(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())

    def impure(node: fx.Node) -> bool:
        if node.is_impure():
            return True
        if not is_inplace(node, modules):
            return False
        prev, cur = node, (node.args[0] if node.args else None)
        while isinstance(cur, fx.Node):  # the mutated tensor and every tensor it is a view of
            if any(u is not prev for u in cur.users):
                return True
            if not may_alias(cur, modules):
                return False
            prev, cur = cur, (cur.args[0] if cur.args else None)
        return False

    gm.graph.eliminate_dead_code(is_impure_node=impure)


# ---------------------------------------------------------------------------------- sections
def _remove_sections(gm, plan, removed_sections):
    if not removed_sections:
        return
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
    gone = removed_mask(removed)
    axes = [a for name, ax in plan.node_axes.items() if name in alive
            for a in (ax if isinstance(ax, tuple) else (ax,)) if a is not None]
    changed = True
    while changed:
        changed = False
        for ax in axes:
            if len(ax.units) and not len(ax.keep(gone)):
                best = max(set(ax.units.tolist()), key=lambda u: theta.get(u, 1.0))
                removed.discard(best)
                gone[best] = False
                changed = True
    return removed


# ---------------------------------------------------------------------------------- slicing
def _bake(gm, target: str, baked: dict[str, str], renorm: dict) -> nn.Module:
    """Module `target` of `gm` as a module of its own class holding, as plain parameters, the tensors
    its parametrizations (weight_norm, spectral_norm) compute now (in eval mode: spectral_norm's
    power iteration does not run), under every name it has in `gm`. Slicing a computed weight's
    parts (weight_norm's direction, whose norm runs over every input channel) or scaling one would
    change what it computes; its value can be sliced and scaled exactly. The originals' names map
    to the new parameter's in `baked` (an optimizer carries on with it, without their state); a
    weight that weight_norm alone computed is listed in `renorm`, to be weight_norm'ed again."""
    module = gm.get_submodule(target)
    cls = parametrize.type_before_parametrizations(module)
    plain = cls.__new__(cls)
    plain.__dict__.update(module.__dict__)
    plain._parameters, plain._buffers = dict(module._parameters), dict(module._buffers)
    plain._modules = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    with evaluating(module), torch.no_grad():
        for pname, originals in module.parametrizations.items():
            if len(originals) == 1 and isinstance(originals[0], _WeightNorm):
                renorm.setdefault(target, []).append((pname, originals[0].dim))
            else:
                kinds = ", ".join(type(p).__name__.lstrip("_") for p in originals)
                warnings.warn(f"shrink: layer '{target}' has its {pname} computed by {kinds}; it becomes a plain "
                              f"parameter holding the value computed now (slicing it changes what {kinds} would "
                              f"compute, so the parametrization cannot stay exactly); to train it parametrized, "
                              f"register {kinds} on the shrunk layer again (which changes its output)", stacklevel=2)
            value = getattr(module, pname).detach().clone()  # (a parametrization may return its original)
            grad = any(p.requires_grad for p in originals.parameters())
            plain._parameters[pname] = nn.Parameter(value, requires_grad=grad)
            for oname, _ in originals.named_parameters():
                baked[f"{target}.parametrizations.{pname}.{oname}"] = f"{target}.{pname}"
    for name, m in list(gm.named_modules(remove_duplicate=False)):
        if m is module:
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, plain)
    return plain


def _weight_norm_again(gm, renorm: dict, baked: dict[str, str]) -> None:
    """weight_norm each layer `_bake` took it from again, over its sliced (and scaled) weight: g is
    that weight's norm and v the weight, so the layer computes it (to rounding) and trains on
    reparametrized. (spectral_norm is not restored: the sliced weight's spectral norm differs, so
    it would compute another weight.) New g and v start without optimizer state."""
    for target, norms in renorm.items():
        module = gm.get_submodule(target)
        for pname, dim in norms:
            frozen = not getattr(module, pname).requires_grad
            parametrizations.weight_norm(module, pname, dim=dim)
            for oname, p in module.parametrizations[pname].named_parameters():
                p.requires_grad_(not frozen)
                baked[f"{target}.parametrizations.{pname}.{oname}"] = f"{target}.parametrizations.{pname}.{oname}"


def _slice_modules(gm, plan, removed, slices, stage, baked, renorm):
    """Slice, in place, the modules of `gm` whose channels go (gm's own: a copy that still shares
    gated's tensors, or gated itself when shrinking in place); their tensors are replaced, never
    written into (a copying shrink's gated model still holds them)."""
    done = set()
    shared: dict[int, tuple] = {}  # a parameter tied between modules is sliced once, and stays tied
    modules = dict(gm.named_modules(remove_duplicate=False))
    sliced: dict[int, dict] = {}  # one module under several names is sliced once
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in done or node.target not in plan.module_axes:
            continue
        done.add(node.target)
        stage[0] = f"slicing module '{node.target}' (node '{node.name}')"
        axes = plan.module_axes[node.target]
        keep = {name: torch.as_tensor(ax.keep(removed)) for name, ax in axes.items()}
        if all(len(k) == len(axes[n].units) for n, k in keep.items()):
            continue
        module = modules[node.target]
        if id(module) in sliced:
            if any(not torch.equal(k, sliced[id(module)][n]) for n, k in keep.items()):
                raise ShrinkError(f"module '{node.target}' is one module under several names whose calls "
                                  f"would keep different channels; please report it")
            continue
        if parametrize.is_parametrized(module):
            module = _bake(gm, node.target, baked, renorm)
            modules = dict(gm.named_modules(remove_duplicate=False))
        sliced[id(module)] = keep
        rule = module_rule(module)
        for pname, dims in (rule.params(module) if rule.params else {}).items():
            if isinstance(getattr(module, pname, None), nn.Parameter):
                slices[f"{node.target}.{pname}"] = {d: keep[a] for d, a in dims.items()}
        slice_module(module, rule, keep, shared)


def slice_module(module: nn.Module, rule, keep: dict[str, torch.Tensor], shared: dict | None = None) -> nn.Module:
    """`module` with its parameters replaced by their slices along the kept channels, and its sizes
    (out_channels, ...) updated; in place: pass a copy to keep the original."""
    sliced_params = rule.params(module) if rule.params else {}
    shared = {} if shared is None else shared
    for pname, dims in sliced_params.items():
        t = getattr(module, pname, None)
        if t is None:
            continue
        kept = tuple((d, tuple(keep[axis].tolist())) for d, axis in sorted(dims.items())
                     if len(keep[axis]) < t.shape[d])  # what is cut (a tied holder may not map every dim)
        if id(t) in shared:
            old, was_kept, sliced = shared[id(t)]
            if was_kept != kept:
                raise ShrinkError(f"parameter {pname} of a module is tied to another module's but the two "
                                  f"would keep different channels; please report it")
            setattr(module, pname, sliced)
            continue
        data = gather(t.detach(), {d: keep[axis].to(t.device) for d, axis in dims.items()})
        if isinstance(t, nn.Parameter):
            sliced = nn.Parameter(data, requires_grad=t.requires_grad)
        else:
            sliced = data
        setattr(module, pname, sliced)
        shared[id(t)] = (t, kept, sliced)  # `t` kept alive so that its id is not reused
    if rule.resize:
        rule.resize(module, {name: len(k) for name, k in keep.items()})
    return module


def gather(t: torch.Tensor, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """A new tensor: `t` at the kept positions (index tensors by dim). Slicing one dim after another
    writes every intermediate result too; where the sliced dims lead (a weight's out and in
    channels) one indexing gathers straight into the result (vit_h_14: its slicing went from 5.3 to
    2.3 s on a VM where fresh memory is slow to write)."""
    kept = {d: k for d, k in kept.items() if len(k) < t.shape[d]}  # a dim kept whole is not copied
    dims = sorted(kept)
    if len(dims) > 1 and dims == list(range(len(dims))):
        return t[tuple(kept[d].view(-1, *[1] * (len(dims) - 1 - d)) for d in dims)]
    if not dims:
        return t.clone()
    for d in sorted(dims, key=lambda d: len(kept[d]) / t.shape[d]):  # the smallest intermediate first
        t = t.index_select(d, kept[d])
    return t


def _slice_params(gm, plan, removed, slices):
    for target, ax in plan.param_axes.items():
        keep = ax.keep(removed)
        if len(keep) == len(ax.units):
            continue
        parent, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        t = getattr(owner, leaf, None)
        if t is None:
            continue
        data = t.detach().index_select(ax.dim, torch.as_tensor(keep, device=t.device))  # a new tensor
        if isinstance(t, nn.Parameter):
            slices[target] = {ax.dim: torch.as_tensor(keep)}
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

    def __init__(self, gm, plan, node, removed, memo=None):
        self.gm, self.plan, self.node, self.removed = gm, plan, node, removed
        self._memo = {} if memo is None else memo

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

    def new_shape_of(self, value):
        return _new_shape(self.plan, value.name, tuple(tensor_meta(value).shape), self.removed)

    def size_change(self, value) -> tuple[bool, bool]:
        """(does this computed size change with the shrink, may it vary at run time): from the
        tensor sizes it is computed from. A size that does not change reads the batch, spatial or
        pinned sizes (dynamic); one that reads channel counts only is a constant of the new graph."""
        changed = dynamic = False
        for t, d in size_deps(value, self._memo):
            old = tuple(tensor_meta(t).shape)
            new = tuple(self.new_shape_of(t))
            if d is None:
                changed, dynamic = changed or old != new, True
            elif old[d] != new[d]:
                changed = True
            else:
                dynamic = True
        return changed, dynamic

    def consistent_sizes(self, sizes, old, new, keep_dim=None):
        """Size arguments for the new shape: a literal is the new length (-1 stays); a computed size
        stays when its value does not change, becomes the new length when it is a constant of the new
        graph, and is left to the op (-1) when it both changes and varies at run time (at most one)."""
        fixed, infer = [], []
        for i, (s, o, n) in enumerate(zip(sizes, old, new)):
            if isinstance(s, bool) or not isinstance(s, (int, fx.Node)):
                fixed.append(s)
            elif isinstance(s, int):
                fixed.append(s if s == -1 else n)
            else:
                changed, dynamic = self.size_change(s)
                if not changed and (o == n or not dynamic):
                    fixed.append(s if o == n else n)
                elif not dynamic:
                    fixed.append(n)
                else:
                    fixed.append(-1)
                    infer.append(i)
        if keep_dim is not None:  # expand: -1 keeps the input's length
            bad = [i for i in infer if not keep_dim[i]]
        else:
            bad = infer if sum(1 for s in fixed if isinstance(s, int) and s == -1) > 1 else []
        if bad:
            raise ShrinkError(
                f"cannot rewrite the size arguments of node '{self.node.name}' ({self.node.op} {self.node.target}): "
                f"size(s) at position(s) {bad} are computed from sizes that both change with the shrink and "
                f"vary at run time; please report it")
        return fixed

    def unpack_sizes(self, shape_node, ndim):
        """`x.view(y.shape)`: per-dim getitem nodes on the shape, so that each dim can be rewritten."""
        with self.gm.graph.inserting_before(self.node):
            return [self.gm.graph.call_function(operator.getitem, (shape_node, i)) for i in range(ndim)]

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


_SIZE_REWRITES = ("view", "reshape", "expand", "unflatten", torch.reshape, torch.unflatten)


def _rewrite_calls(gm, plan, removed):
    modules = dict(gm.named_modules())
    memo = {}
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or "tensor_meta" not in node.meta:
            continue
        rule = lookup(node, modules)
        if rule is None or rule.rewrite is None:
            continue
        # size arguments may be computed from the sizes of other tensors than the node's input
        if _touched(plan, node, removed) or node.target in _SIZE_REWRITES:
            try:
                rule.rewrite(RewriteContext(gm, plan, node, removed, memo))
            except ShrinkError:
                raise
            except Exception as e:
                raise _internal(e, f"rewriting the arguments of node '{node.name}' ({node.op} {node.target})") from e


def _internal(e: Exception, doing: str) -> "ShrinkError":
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ShrinkError(f"shrink failed while {doing}: {type(e).__name__}: {first}. This is a bug in vpsurgery, "
                       f"not in your model or input; please report it")


# ---------------------------------------------------------------------------------- gates
def _fold_gates(gm, plan, new_plan, removed, theta, baked, renorm):
    """Drop gates and masks, folding each kept unit's theta into the weights that read it."""
    nodes = {n.name: n for n in gm.graph.nodes}
    mask_nodes = _nodes_calling(gm, MASKS)
    folded, weights = set(), {}  # weights: id -> scale folded in (a weight tied between modules: once)
    for name, site in plan.sites.items():
        if site.kind == "norm" and site.node in nodes:  # a plain norm again, over the kept channels
            ungate_norm(gm.get_submodule(nodes[site.node].target))
            nodes[site.node].args = nodes[site.node].args[:1]
            continue
        mask = mask_nodes.get(name)
        if mask is None:
            continue
        consumer = nodes[site.node]
        if consumer.op != "call_module" or consumer.target not in folded:
            kept = site.axis.restrict(removed).units
            scale = torch.tensor([theta.get(int(u), 1.0) for u in kept])
        if consumer.op != "call_module":  # a function (F.normalize): no weight to fold into, so a
            if not torch.all(scale == 1):  # fractional theta stays as a constant scale
                _scale_input(gm, consumer, site, mask, scale)
        elif consumer.target not in folded:
            folded.add(consumer.target)
            module = gm.get_submodule(consumer.target)
            if parametrize.is_parametrized(module) and not torch.all(scale == 1):
                module = _bake(gm, consumer.target, baked, renorm)  # a computed weight cannot be scaled in place
            weight = getattr(module, "weight", None)
            key = id(weight) if weight is not None else id(module)  # (an LSTM has no `weight`)
            if key in weights:
                if not torch.equal(weights[key][1], scale):
                    raise ShrinkError(f"module '{consumer.target}' shares its weight with another module that "
                                      f"reads its channels with different gate values; please report it")
            elif not torch.all(scale == 1):
                module_rule(module).fold_input(module, scale)
            weights.setdefault(key, (weight, scale))
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


def _scale_input(gm, consumer: fx.Node, site, mask: fx.Node, scale: torch.Tensor) -> None:
    """consumer(x * scale) for the mask's input x, scale (the kept units' theta) along the site's dim:
    what the mask computed at those theta, as a buffer of the shrunk model."""
    shape = [1] * len(tensor_meta(mask.args[0]).shape)
    shape[site.axis.dim] = -1
    name = free_name(gm, f"vps_scale_{consumer.name}")  # a model shrunk, wrapped and shrunk again holds one
    device = gm.get_submodule(mask.target).index.device  # where the model is
    gm.register_buffer(name, scale.view(shape).to(device, tensor_meta(mask.args[0]).dtype))
    with gm.graph.inserting_before(consumer):
        scaled = gm.graph.call_function(operator.mul, (mask.args[0], gm.graph.get_attr(name)))
    mask.args = (scaled, *mask.args[1:])  # the mask is replaced by its input below


def _nodes_calling(gm, container: str) -> dict[str, fx.Node]:
    """The call nodes of the gate or mask container, by gate/mask name."""
    return {n.target.split(".", 1)[1]: n for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith(container + ".")}


def _slice_gates(gm, plan, new_plan, removed, slices):
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
            slices[f"{GATES}.{g.name}.theta"] = {0: torch.as_tensor(keep)}
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, site in plan.sites.items():
        if site.kind == "norm" and site.node in nodes:
            norm = gm.get_submodule(nodes[site.node].target)
            units = site.axis.restrict(removed).units
            used = site_groups(new_plan, units)
            ungate_norm(norm)
            if used:
                gate_norm(norm, mask_index(new_plan, units, used))
            nodes[site.node].args = (nodes[site.node].args[0], *[gate_node[g] for g in used])
            continue
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
    try:
        propagate_cheaply(gm, [e.to(device) for e in example], internal=True)  # on meta if gated ran slowly
    except NodeFailure as e:
        node = next(n for n in gm.graph.nodes if n.name == e.node)
        want = f"; the plan expects shape {expected[e.node]} there" if e.node in expected else ""
        raise ShrinkError(f"the shrunk graph fails at node '{e.node}' ({node.op} {node.target}): {e.first}{want}. "
                          f"This is a bug in vpsurgery (a channel rule for that op), not in your model or "
                          f"input; please report it") from e.cause
    for node in gm.graph.nodes:
        if node.name not in expected:
            continue
        meta = node.meta.get("tensor_meta")
        got = list(meta.shape) if is_tensor_meta(meta) else [list(m.shape) for m in meta]
        if got != expected[node.name]:
            raise ShrinkError(f"shrinking produced shape {got} at node '{node.name}' where the plan "
                              f"expects {expected[node.name]}: a channel rule is wrong for this op "
                              f"({node.op} {node.target}). This is a bug in vpsurgery, not in your model "
                              f"or input; please report it")
