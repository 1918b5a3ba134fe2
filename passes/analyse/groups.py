"""Channel analysis: walk the traced graph applying the rule table, then read off the units,
the groups of units that share producers, the mask sites and what could not be pruned and why."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch.nn.utils import parametrize
import torch.fx as fx

from ..channels import ChannelSpace, Layout
from ..capture.trace import is_tensor_meta, tensor_meta
from ..plan import Axis, ChannelGroup, MaskSite, Plan, Unprunable
from ..rules import CallArgs, Unsupported, by_position, lookup, module_rule, size_deps
from .cost import call_macs, graph_batch, product_macs, product_macs_along

MAX_PARAM_IDS = 1 << 18  # a parameter read as a tensor gets one id per element; cap the cost (a ViT-B position table is 151k)


def describe(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module {type(modules[node.target]).__module__}.{type(modules[node.target]).__name__}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
    return f"method Tensor.{node.target}"


class RuleContext(CallArgs):
    """What a rule sees: its node's arguments, their layouts and shapes, and the channel space."""

    def __init__(self, walker: "ChannelWalker", node: fx.Node):
        self.w, self.node, self.space = walker, node, walker.space
        self.module = walker.modules.get(node.target) if node.op == "call_module" else None

    def tensor_args(self):
        values = [a for a in self.node.args if self.is_tensor(a)]
        return values + [v for v in self.node.kwargs.values() if self.is_tensor(v)]

    def is_tensor(self, value) -> bool:
        return is_tensor_meta(tensor_meta(value))

    # layouts and shapes --------------------------------------------------------
    def layout_of(self, value):
        return self.w.layouts.get(value) if isinstance(value, fx.Node) else None

    def shape_of(self, value):
        return tuple(tensor_meta(value).shape)

    @property
    def out_shape(self):
        return tuple(self.node.meta["tensor_meta"].shape)

    @property
    def out_shapes(self):
        return [tuple(m.shape) for m in self.node.meta["tensor_meta"]]

    @property
    def out_is_tensor(self) -> bool:
        return is_tensor_meta(self.node.meta.get("tensor_meta"))

    # effects ---------------------------------------------------------------------
    def pin(self, layout: Layout, reason: str):
        self.space.pin(layout.ids, reason)
        self.w.pin_sites[reason].add(self.node.name)

    def normalize(self, ids, prefer):
        return self.space.normalize(ids, prefer)

    def axis(self, name: str, size: int, producer: bool = False) -> np.ndarray:
        """The ids of one channel axis of this node's module (shared by every call of it)."""
        key = (self.node.target, name)
        if key not in self.w.module_ids:
            self.w.module_ids[key] = self.space.fresh(
                (size,), producer=(self.node.target, name) if producer else None)
        return self.w.module_ids[key]

    def consume(self, arg_index: int, dim: int):
        """This node mixes the channels of input `arg_index` along `dim`: a mask site."""
        self._site(arg_index, dim, "input")

    def normalise_over(self, arg_index: int, dim: int):
        """This node normalises input `arg_index` over `dim` (LayerNorm): in the gated model it takes its
        statistics over the active channels only, so that removing a channel changes nothing else."""
        self._site(arg_index, dim, "norm")

    def _site(self, arg_index: int, dim: int, kind: str):
        from ..rules import along

        self.w.sites.append((self.node.name, arg_index, dim, along(self, self.node.args[arg_index], dim), kind))


class ChannelWalker:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.space = ChannelSpace()
        self.layouts: dict[fx.Node, object] = {}
        self.module_ids: dict[tuple[str, str], np.ndarray] = {}
        self.param_ids: dict[str, np.ndarray] = {}
        self.sites: list[tuple[str, int, int, np.ndarray, str]] = []  # (node, arg, dim, ids, kind)
        self.pin_sites: dict[str, set[str]] = defaultdict(set)

    def run(self):
        for node in self.gm.graph.nodes:
            self.layouts[node] = self.visit(node)

    def visit(self, node: fx.Node):
        meta = node.meta.get("tensor_meta")
        if node.op == "placeholder":
            return self.space.background(len(meta.shape), "model input") if is_tensor_meta(meta) else None
        if node.op == "get_attr":
            return self.get_attr(node, meta)
        if node.op == "output":
            for value in _flatten(node.args):
                lay = self.layouts.get(value) if isinstance(value, fx.Node) else None
                for one in (lay if isinstance(lay, tuple) else (lay,)):
                    if isinstance(one, Layout):
                        self.space.pin(one.ids, "reaches the model output")
            return None
        inputs = [self.layouts.get(a) for a in _flatten((node.args, node.kwargs)) if isinstance(a, fx.Node)]
        carries_channels = any(x is not None for x in inputs)
        rule = lookup(node, self.modules)
        ctx = RuleContext(self, node)
        if not carries_channels:
            # Python arithmetic on sizes (`h // p * w`), torch.zeros(...), ...: nothing flows in, so
            # no rule applies (a rule may assume tensor operands, e.g. `*` on two ints).
            return self.fresh_output(meta, "created from sizes or constants")
        try:
            if rule is None:
                raise Unsupported(f"no channel rule for {describe(node, self.modules)}")
            return rule.analyse(ctx)
        except Unsupported as why:
            reason = str(why)
            for lay in inputs:
                for one in (lay if isinstance(lay, tuple) else (lay,)):
                    if isinstance(one, Layout):
                        self.space.pin(one.ids, reason)
            self.pin_sites[reason].add(node.name)
            return self.fresh_output(meta, reason)

    def fresh_output(self, meta, reason):
        """New, pinned channels in the structure of a result: a tensor, or (nested) tuples of them."""
        if is_tensor_meta(meta):
            return self.space.background(len(meta.shape), reason)
        if isinstance(meta, (tuple, list)) and all(is_tensor_meta(m) or isinstance(m, (tuple, list)) for m in meta):
            return tuple(self.fresh_output(m, reason) for m in meta)  # (LSTM's (output, (h, c)))
        return None

    def get_attr(self, node, meta):
        if not is_tensor_meta(meta):
            return None
        if node.target not in self.param_ids:
            shape = tuple(meta.shape)
            if int(np.prod(shape)) > MAX_PARAM_IDS:
                lay = self.space.background(len(shape), f"parameter {node.target} too large to track")
                self.param_ids[node.target] = lay.ids
            else:
                self.param_ids[node.target] = self.space.fresh(shape)
        return Layout(self.param_ids[node.target], None)


def _flatten(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


# Ops whose size arguments shrink rewrites consistently (literal or computed, passes/rules.py).
_aten = torch.ops.aten
_SIZE_CONSUMERS = {"view", "reshape", "expand", "unflatten", "split", "chunk", torch.reshape, torch.unflatten,
                   torch.split, torch.chunk, _aten.view.default, _aten.reshape.default, _aten.expand.default,
                   _aten.unflatten.int, _aten.split.Tensor, _aten.split_with_sizes.default, _aten.chunk.default,
                   _aten._unsafe_view.default, "tensor_split", torch.tensor_split, _aten.tensor_split.sections,
                   _aten.tensor_split.indices}


def _is_size_arithmetic(node: fx.Node) -> bool:
    """A node computing a Python number or size tuple (x.size(1) // 2): followed to its consumers."""
    meta = node.meta.get("tensor_meta")
    if node.op not in ("call_function", "call_method") or node.target is torch._assert:
        return False
    return not is_tensor_meta(meta) and not (isinstance(meta, (tuple, list)) and meta and
                                             all(is_tensor_meta(m) for m in meta))


def _pin_channel_counts(w: ChannelWalker) -> None:
    """A channel count read as a number (`n, c, h, w = x.size()`) changes when channels go. Where
    it only sets the sizes of a view/reshape/expand/split, shrink rewrites them; anywhere else (a
    scale `y / c`, torch.zeros(n, c), an assert) the result would change, so those channels stay."""
    memo: dict = {}
    for node in w.gm.graph.nodes:
        if _is_size_arithmetic(node):
            continue
        sizes_ok = node.target in _SIZE_CONSUMERS and node.op in ("call_function", "call_method")
        for value in node.all_input_nodes:
            if is_tensor_meta(value.meta.get("tensor_meta")) or not _is_size_arithmetic(value):
                continue
            if sizes_ok and (not node.args or value is not node.args[0]):
                continue
            for t, d in size_deps(value, memo):
                lay = w.layouts.get(t)
                if not isinstance(lay, Layout) or lay.dim is None or lay.ids.shape[lay.dim] <= 1:
                    continue
                if d is None or d == lay.dim:
                    reason = f"the channel count of a tensor is used as a number by {describe(node, w.modules)}"
                    w.space.pin(lay.ids, reason)
                    w.pin_sites[reason].add(node.name)


def _couple_tied_parameters(w: ChannelWalker) -> None:
    """A Parameter shared by several modules (`self.b.weight = self.a.weight`) is sliced once, so the
    channels along each of its dims are one unit in every module that holds it. Where that cannot be
    said (a holder without a channel rule, one that reads it as a graph attribute) its holders'
    channels are pinned, and the tie is reported; along a dim that only some holders slice (an
    embedding's rows are a tied output layer's out channels) those channels are pinned, and the
    other dims are one unit still."""
    called = {n.target for n in w.gm.graph.nodes if n.op == "call_module"}
    uses: dict[int, list[tuple[str | None, str]]] = defaultdict(list)  # id -> (module, pname) | (None, attr)
    for mname, m in w.gm.named_modules(remove_duplicate=False):
        if mname in called:
            for pname, p in m.named_parameters(recurse=False):
                uses[id(p)].append((mname, pname))
    for target in {n.target for n in w.gm.graph.nodes if n.op == "get_attr"}:
        owner, _, leaf = target.rpartition(".")
        try:
            t = getattr(w.gm.get_submodule(owner) if owner else w.gm, leaf)
        except AttributeError:
            continue
        if isinstance(t, torch.nn.Parameter):
            uses[id(t)].append((None, target))
    for key, used in uses.items():
        used = sorted(set(used), key=str)
        if len(used) < 2:
            continue
        mapped, pin = [], False
        for m, pname in used:
            module = w.modules.get(m) if m is not None else None
            rule = module_rule(module) if module is not None else None
            dims = (rule.params(module) if rule is not None and rule.params else {}).get(pname)
            if dims is None:
                pin = True  # read where no module axis follows it (a graph attribute, a module without a rule)
                dims = {}
            mapped.append((m, dims))
        all_dims = {d for _, dims in mapped for d in dims}
        if pin:
            names = sorted({m if m is not None else p for m, p in used})
            reason = (f"parameter tied between {', '.join(names)} (weight sharing) that cannot all be "
                      f"sliced alike")
            for m, dims in mapped:
                for axis in dims.values():
                    if (m, axis) in w.module_ids:
                        w.space.pin(w.module_ids[(m, axis)], reason)
            for m, pname in used:
                if m is None and pname in w.param_ids:
                    w.space.pin(w.param_ids[pname], reason)
            w.pin_sites[reason].update(n.name for n in w.gm.graph.nodes
                                       if (n.op == "call_module" and n.target in names)
                                       or (n.op == "get_attr" and n.target in names))
            continue
        for d in sorted(all_dims):
            ids = [w.module_ids[(m, dims[d])] for m, dims in mapped if d in dims and (m, dims[d]) in w.module_ids]
            if any(d not in dims for _, dims in mapped):  # a holder that sees no channels along d
                reason = (f"parameter tied between {', '.join(sorted(m for m, _ in mapped))} (weight sharing), "
                          f"whose dim {d} only some of them slice")  # (an embedding's rows, a head's outputs)
                for one in ids:
                    w.space.pin(one, reason)
                w.pin_sites[reason].update(n.name for n in w.gm.graph.nodes
                                           if n.op == "call_module" and n.target in {m for m, _ in mapped})
                continue
            for other in ids[1:]:
                if len(other) == len(ids[0]):
                    w.space.union(ids[0], other)


# ------------------------------------------------------------------------------ reading off the plan
def analyse_channels(gm: fx.GraphModule, example: list, exclude: frozenset[str] = frozenset()) -> Plan:
    """Run the channel walk over a shape-propagated GraphModule and return its Plan. Modules named
    in `exclude` keep every channel they read or write (the user asked that they stay as they are)."""
    w = ChannelWalker(gm)
    w.run()
    _pin_channel_counts(w)
    _couple_tied_parameters(w)
    space = w.space
    for (module, _axis), ids in w.module_ids.items():
        if module in exclude:
            space.pin(ids, "excluded by wrap(exclude=...)")
            w.pin_sites.setdefault("excluded by wrap(exclude=...)", set()).add(module)

    # A parameter whose channels ended up on more than one dim cannot be sliced to a rectangle.
    for target, ids in w.param_ids.items():
        roots = space.roots(ids)
        varying = [d for d in range(ids.ndim) if ids.shape[d] > 1
                   and not (roots == roots.take([0], axis=d)).all()]
        if len(varying) > 1:
            space.pin(ids, f"parameter {target} has channels on several dims")

    # Every id's unit, resolved once: unit numbers are the roots renumbered 0..U-1 in id order.
    # (A root is an id, so its rank among the roots is a running count: no sort of millions of ids.)
    all_ids = np.arange(space.size, dtype=np.int64)
    root_of_id = space.roots(all_ids)
    is_root = root_of_id == all_ids
    unit_of_id = (np.cumsum(is_root) - 1)[root_of_id]
    pinned_ids, pin_codes = space.pinned()
    pinned_unit = np.zeros(int(is_root.sum()), dtype=bool)
    pinned_unit[unit_of_id[pinned_ids]] = True

    def units(ids: np.ndarray) -> np.ndarray:
        return unit_of_id[ids]

    def axis_of(lay, shape):
        if not isinstance(lay, Layout):
            return None
        if lay.dim is None:  # derived from a parameter alone (a clone of it): it shrinks as the parameter
            # (units vary only where the ids have their own size: not broadcast to the tensor's)
            return varying_axis(units(lay.ids.reshape((1,) * (len(shape) - lay.ids.ndim) + lay.ids.shape)))
        ids = lay.ids
        for d in range(ids.ndim):
            if d != lay.dim:
                ids = ids.take([0], axis=d)
        return Axis(lay.dim, units(np.broadcast_to(ids.reshape(-1), (shape[lay.dim],)).copy()))

    node_axes = {}
    for node, lay in w.layouts.items():
        meta = node.meta.get("tensor_meta")
        if isinstance(lay, tuple) and all(isinstance(l, Layout) for l in lay):
            node_axes[node.name] = tuple(axis_of(l, tuple(m.shape)) for l, m in zip(lay, meta))
        elif isinstance(lay, tuple) and any(axis_of(l, tuple(m.shape)) for l, m in _leaves(lay, meta)):
            # nested, as LSTM's (output, (h, c)): the plan has no form for it, so its rule pins them all
            raise AssertionError(f"a channel rule left channels in the nested result of node '{node.name}'; "
                                 f"please report it")
        elif isinstance(lay, Layout) and is_tensor_meta(meta):
            ax = axis_of(lay, tuple(meta.shape))
            if ax is not None:
                node_axes[node.name] = ax

    module_axes: dict[str, dict[str, Axis]] = defaultdict(dict)
    for (module, name), ids in w.module_ids.items():
        module_axes[module][name] = Axis(0, units(ids))

    param_axes = {}
    for target, ids in w.param_ids.items():
        ax = varying_axis(units(ids))
        if ax is not None:
            param_axes[target] = ax
    # A get_attr node is its parameter: shrinking slices the parameter, so the node's tensor shrinks
    # along the same axis (the shape check and every rewrite reading the node must know it).
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in param_axes:
            node_axes[node.name] = param_axes[node.target]

    # Units that some conv/linear produces and nothing pins are the prunable ones; units with the
    # same producers form a group, groups and their units in the order of their first ids.
    produced, signature, signatures, first_id = _producers_of_units(space, unit_of_id)
    free = ~pinned_unit[produced]
    units_f, sig_f, first_f = produced[free], signature[free], first_id[free]
    order = np.lexsort((first_f, sig_f))
    units_f, sig_f, first_f = units_f[order], sig_f[order], first_f[order]
    starts = np.nonzero(np.r_[True, sig_f[1:] != sig_f[:-1]])[0] if len(sig_f) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(sig_f)]
    params, macs = _unit_costs(gm, w.modules, module_axes, node_axes, len(pinned_unit))
    module_order = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    groups = {}
    for k in np.argsort(first_f[starts], kind="stable").tolist():
        us = units_f[starts[k]:ends[k]]
        producers = sorted(signatures[sig_f[starts[k]]], key=lambda m: module_order.get(m, 0))
        name = _unique(producers[0].replace(".", "_"), groups)
        groups[name] = ChannelGroup(name, us.tolist(), producers, params[us], macs[us])

    unprunable = []
    reasons_producers = _producers_by_reason(space, unit_of_id, pinned_ids, pin_codes, produced, signature,
                                             signatures)
    for reason in sorted(set(w.pin_sites) | set(reasons_producers)):
        unprunable.append(Unprunable(reason, sorted(w.pin_sites.get(reason, ())),
                                     sorted(reasons_producers.get(reason, ()))))

    sites = {}
    gated = {u for g in groups.values() for u in g.units}
    for node, arg, dim, ids, kind in w.sites:
        ax = Axis(dim, units(ids))
        if any(int(u) in gated for u in ax.units):
            sites[_unique(f"{node}_in{arg}", sites)] = MaskSite(f"{node}_in{arg}", node, arg, ax, kind)
    for name, site in sites.items():
        site.name = name

    total = sum(len(ax.units) for m, axes in module_axes.items() for n, ax in axes.items() if n == "out")
    gated_units = np.fromiter(gated, dtype=np.int64, count=len(gated))
    prunable = sum(int(np.isin(ax.units, gated_units).sum())
                   for m, axes in module_axes.items() for n, ax in axes.items() if n == "out")
    return Plan(groups=groups, sections={}, node_axes=node_axes, module_axes=dict(module_axes),
                param_axes=param_axes, sites=sites, unprunable=unprunable, example=example,
                prunable_share=prunable / total if total else 0.0)


def _leaves(lay, meta):
    """(layout, tensor meta) pairs of a nested result."""
    if isinstance(lay, tuple):
        return [pair for l, m in zip(lay, meta) for pair in _leaves(l, m)]
    return [(lay, meta)] if isinstance(lay, Layout) else []


def _unique(name: str, taken) -> str:
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    return out


def _producers_of_units(space, unit_of_id):
    """For the units that some module produces: (those units, ascending; each one's code for its set
    of producing modules; the sets by code, as tuples of names; each one's first produced id)."""
    ids, producers, which = space.producer_ids()
    if not len(ids):
        empty = np.zeros(0, np.int64)
        return empty, empty, [], empty
    names = sorted({m for m, _axis in producers})
    code = {m: i for i, m in enumerate(names)}
    module_of = np.array([code[m] for m, _axis in producers], dtype=np.int64)
    units = unit_of_id[ids]
    n = len(names)
    pairs = np.unique(units * n + module_of[which])  # (unit, module) once each, by unit
    pair_unit, pair_module = pairs // n, pairs % n
    starts = np.nonzero(np.r_[True, pair_unit[1:] != pair_unit[:-1]])[0]
    counts = np.diff(np.r_[starts, len(pairs)])
    signature = pair_module[starts].copy()  # a unit of one producer: that module's code
    signatures = [(m,) for m in names]
    multi = np.nonzero(counts > 1)[0]
    if len(multi):  # units of several producers (a depthwise conv's and its input's): a row each,
        row_of = np.full(len(starts), -1, dtype=np.int64)  # padded with -1; equal rows, one code
        row_of[multi] = np.arange(len(multi))
        of_pair = np.repeat(np.arange(len(starts)), counts)
        column = np.arange(len(pairs)) - starts[of_pair]
        rows = np.full((len(multi), int(counts.max())), -1, dtype=np.int64)
        mine = row_of[of_pair] >= 0
        rows[row_of[of_pair[mine]], column[mine]] = pair_module[mine]
        if int(counts.max()) * np.log2(n + 1) < 62:  # a row as one integer: a faster unique
            key = ((rows + 1) * (n + 1) ** np.arange(rows.shape[1], dtype=np.int64)).sum(axis=1)
            _, first, code_of_row = np.unique(key, return_index=True, return_inverse=True)
            distinct = rows[first]
        else:
            distinct, code_of_row = np.unique(rows, axis=0, return_inverse=True)
        signature[multi] = n + code_of_row.reshape(-1)
        signatures += [tuple(names[i] for i in row if i >= 0) for row in distinct.tolist()]
    _, first = np.unique(units, return_index=True)  # ids ascend: the first is the smallest
    return pair_unit[starts], signature, signatures, ids[first]


def _producers_by_reason(space, unit_of_id, pinned_ids, pin_codes, produced, signature,
                         signatures) -> dict[str, set[str]]:
    """Every pin reason -> the modules whose output channels it pinned (a unit is pinned for the
    reasons of all of its ids)."""
    used = np.nonzero(np.bincount(pin_codes, minlength=len(space.reasons)))[0]
    out: dict[str, set[str]] = {space.reasons[c]: set() for c in used.tolist()}
    units = unit_of_id[pinned_ids]
    at = np.minimum(np.searchsorted(produced, units), max(len(produced) - 1, 0))
    mine = (produced[at] == units) if len(produced) else np.zeros(len(units), dtype=bool)
    n = max(len(signatures), 1)
    pairs = np.unique(pin_codes[mine] * n + signature[at[mine]])  # (reason, producer set) pairs, once each
    for c, sig in zip((pairs // n).tolist(), (pairs % n).tolist()):
        out[space.reasons[c]].update(signatures[sig])
    return out


class _Sums:
    """Per-unit sums of (units, amount) contributions, added in the order given (as a dict of
    running float sums would: the same float results)."""

    def __init__(self):
        self.units, self.amounts = [], []

    def add(self, units: np.ndarray, amount: float) -> None:
        self.units.append(np.asarray(units, dtype=np.int64))
        self.amounts.append(np.full(len(units), amount, dtype=np.float64))

    def result(self, n_units: int) -> np.ndarray:
        """The sum for each unit 0..n_units-1 (0 where nothing was added)."""
        if not self.units:
            return np.zeros(n_units)
        return np.bincount(np.concatenate(self.units), weights=np.concatenate(self.amounts), minlength=n_units)


def varying_axis(u: np.ndarray) -> Axis | None:
    """The axis along which a tensor's units vary (the first, if several), or None."""
    varying = [d for d in range(u.ndim) if u.shape[d] > 1 and not (u == u.take([0], axis=d)).all()]
    if not varying:
        return None
    line = u
    for e in range(u.ndim):
        if e != varying[0]:
            line = line.take([0], axis=e)
    return Axis(varying[0], line.reshape(-1))


def _unit_costs(gm, modules, module_axes, node_axes, n_units):
    """Parameters and MACs removed with each unit (first order: a weight entry whose in and out
    channel both go is counted twice, as in every L0-style size penalty)."""
    params, macs = _Sums(), _Sums()
    batch = graph_batch(gm.graph)
    seen = set()  # a parameter tied between modules is counted once
    for name, axes in module_axes.items():
        m = modules[name]
        rule = module_rule(m)
        if rule is None or rule.params is None:
            continue
        for pname, dims in rule.params(m).items():
            t = getattr(m, pname, None)  # (a weight_norm'ed weight is computed: it counts as the parameter)
            if not (isinstance(t, torch.nn.Parameter) or parametrize.is_parametrized(m, pname)) or id(t) in seen:
                continue
            seen.add(id(t))
            for d, axis_name in dims.items():
                params.add(axes[axis_name].units, t.numel() // t.shape[d])
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in module_axes:
            continue
        m = modules[node.target]
        total = call_macs(node, modules, batch)  # MACs of this call, per example
        if total is None:
            continue
        for axis_name in ("in", "out"):
            ax = module_axes[node.target].get(axis_name)
            if ax is None or (axis_name == "in" and getattr(m, "groups", 1) > 1 and not by_position(m)):
                continue
            macs.add(ax.units, total / len(ax.units))
    for node in gm.graph.nodes:  # attention's products: a head takes its share with it
        ax = node_axes.get(node.name)
        total = product_macs(node, batch, modules) if isinstance(ax, Axis) and len(ax.units) else None
        if total:
            macs.add(ax.units, product_macs_along(node, ax.dim, total, batch))
    return params.result(n_units), macs.result(n_units)
