"""In-place ops, made out-of-place where that keeps the function.

An in-place op in a traced graph (`x.relu_()`, `y += x`, `F.relu(x, inplace=True)`, a module built
with `inplace=True`) overwrites a tensor that autograd may need: harmless in the model as written,
but once surgery rewires the graph (a removed residual block hands one ReLU's output straight to
the next in-place ReLU) backward fails. So wrap emits the out-of-place form of every in-place op
whose effect it can follow: the op computes a new tensor, and every later reader of the mutated
tensor reads that new tensor instead (which is what it saw before). An op is left in place when
its effect cannot be followed that way (it writes through a view whose base or other views are
read later, or it updates a parameter or buffer); the dead-code logic of shrink handles those.
"""
from __future__ import annotations

import copy
import functools
import inspect
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..codegen import recompile
from ..rules import UNKNOWN, facts
from .trace import is_tensor_meta, tensor_meta

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                      operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
                      operator.ior: operator.or_, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
                      operator.irshift: operator.rshift, operator.imatmul: operator.matmul}
_MUTATING_FUNCTIONS = set(_INPLACE_OPERATORS) | {operator.setitem}
_NOT_OUT_OF_PLACE = {"resize_", "resize_as_"}  # Tensor.resize is not resize_ without the write


def _inplace_kwarg(node: fx.Node) -> tuple[str, int | None] | None:
    """('inplace', its positional index or None) when a call passes inplace=True."""
    if node.kwargs.get("inplace", False) is True:
        return "inplace", None
    try:
        i = _inplace_position(node.target)
    except TypeError:  # an unhashable callable
        i = _inplace_position.__wrapped__(node.target)
    if i is not None and i < len(node.args) and node.args[i] is True:
        return "inplace", i
    return None


@functools.lru_cache(maxsize=None)
def _inplace_position(target) -> int | None:
    """The position of `target`'s 'inplace' parameter (None: it has none, or no signature); cached,
    because inspect.signature parses a builtin's text signature on every call."""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def is_inplace(node: fx.Node, modules) -> bool:
    """Does this node overwrite its first argument?"""
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if node.target in _MUTATING_FUNCTIONS:
            return True
        if isinstance(node.target, torch._ops.OpOverload):  # aten.relu_, aten.add_.Tensor (torch.export)
            return node.target._schema.name.endswith("_") and node.target._schema.is_mutable
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and getattr(node.target, "__module__", "") != "_operator":
            return True  # torch.relu_, torch.sigmoid_, ... (not operator.and_, operator.or_)
        return _inplace_kwarg(node) is not None
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    return False


def may_alias(node: fx.Node, modules) -> bool:
    """May this node's result share memory with its first input? (in-place, or the rules' `alias`
    fact: views, casts that may return their input, dropout, ops the table does not know)"""
    if is_inplace(node, modules):
        return True
    if node.op not in ("call_method", "call_function", "call_module"):
        return False
    return facts(node, modules).alias


def _out_of_place_function(f):
    """torch.relu_ -> torch.relu, F.elu_ -> F.elu, ... (None if there is none)."""
    if isinstance(f, torch._ops.OpOverload):  # aten.add_.Tensor -> aten.add.Tensor
        packet = getattr(torch.ops.aten, f._schema.name.split("::")[-1][:-1], None)
        return getattr(packet, f._overloadname, None) if packet is not None else None
    name = getattr(f, "__name__", "")
    for module in (F, torch):
        if getattr(module, name, None) is f and callable(getattr(module, name[:-1], None)):
            return getattr(module, name[:-1])
    return None


def _is_tensor(value) -> bool:
    return is_tensor_meta(tensor_meta(value))


def _torch_module(m: nn.Module) -> bool:
    return type(m).__module__.startswith(("torch.", "torchvision."))


class _Aliases:
    """Which nodes may share memory with which (alias edges: a view or in-place result and its input)."""

    def __init__(self, gm: fx.GraphModule):
        self.modules = dict(gm.named_modules())

    def parents(self, node):
        """The inputs this node's result may be (a view of)."""
        if node.op == "call_module" and not _torch_module(self.modules[node.target]):
            return [a for a in node.all_input_nodes if _is_tensor(a)]  # a user's leaf: it may return its input
        if may_alias(node, self.modules):
            first = node.args[0] if node.args else None
            return [first] if isinstance(first, fx.Node) else []
        return []

    def children(self, node):
        return [u for u in node.users if node in self.parents(u)]

    def family(self, node):
        """The node, the tensors it may be a view of, and every view of those."""
        up, todo = {node}, [node]
        while todo:
            for p in self.parents(todo.pop()):
                if p not in up:
                    up.add(p)
                    todo.append(p)
        family, todo = set(up), list(up)
        while todo:
            for c in self.children(todo.pop()):
                if c not in family:
                    family.add(c)
                    todo.append(c)
        return up, family


def make_out_of_place(gm: fx.GraphModule) -> int:
    """Rewrite (a shape-propagated) `gm` so that in-place ops compute new tensors; returns how many.

    The mutated tensor's later readers are re-pointed to the op's result, so every node computes
    what it computed before. Mutates gm's graph and may replace modules built with inplace=True by
    copies with inplace=False (gm owns its modules: wrap traced a copy of the model).
    """
    graph = gm.graph
    aliases = _Aliases(gm)
    changed = 0
    module_sites: dict[str, list[fx.Node]] = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and is_inplace(node, aliases.modules) \
                and _torch_module(aliases.modules[node.target]):
            module_sites.setdefault(node.target, []).append(node)

    for node in list(graph.nodes):
        if not is_inplace(node, aliases.modules):
            continue
        if node.op == "call_module" and node.target not in module_sites:
            continue  # a user's leaf module: what it does to its input is its own business
        target = node.args[0] if node.args else None
        if node.op == "call_function" and node.target in _INPLACE_OPERATORS and not _is_tensor(target):
            node.target = _INPLACE_OPERATORS[node.target]  # `c += 1` on Python numbers
            changed += 1
            continue
        if not isinstance(target, fx.Node) or not _is_tensor(target):
            continue
        views = _followable(node, target, aliases)
        if views is None or not _rewrite(gm, node, aliases):
            changed += _write_into_a_copy(gm, node, target, aliases)
            continue
        result = node
        if node.op == "call_function" and node.target is operator.setitem:
            result = node.args[0]  # the clone that _rewrite put in front of it
        order = {n: i for i, n in enumerate(graph.nodes)}
        at = order[node]
        new = {target: result}
        last = node
        for view in views:  # views made before the write, read after it: made again from the result
            parent = aliases.parents(view)[0]
            with graph.inserting_after(last):
                last = graph.create_node(view.op, view.target, (new[parent], *view.args[1:]), dict(view.kwargs))
            last.meta = dict(view.meta)
            new[view] = last
        made = set(new.values())
        for old, replacement in new.items():
            for user in list(old.users):
                if user not in made and user is not node and order.get(user, -1) > at:
                    user.replace_input_with(old, replacement)
        changed += 1

    for target, sites in module_sites.items():
        done = [n for n in sites if n.meta.get("vps_out_of_place")]
        if not done:
            continue
        module = copy.copy(aliases.modules[target])
        module.inplace = False
        if len(done) == len(sites):
            _set_submodule(gm, target, module)
        else:  # some calls must keep writing in place: the others call an out-of-place copy
            name = free_name(gm, target.replace(".", "_") + "_out_of_place")
            gm.add_submodule(name, module)
            for n in done:
                n.target = name
    for node in graph.nodes:
        node.meta.pop("vps_out_of_place", None)
    if changed:
        graph.lint()
        recompile(gm)
    return changed


def _replayable(node, modules) -> bool:
    """A view op (a call the rules know as an alias, not random) that can be applied again to the
    new tensor with the same result as on the old one."""
    if is_inplace(node, modules) or node.op not in ("call_method", "call_function"):
        return False
    f = facts(node, modules)
    return f.alias and not f.random and f is not UNKNOWN


def _followable(node, target, aliases) -> list[fx.Node] | None:
    """Can the write into `target` be replaced by a new tensor? Then: the views of `target` made
    before the write and read after it, which must be made again from the new tensor (graph order);
    None when the write must stay (it reaches a parameter or buffer, or a tensor that `target` is a
    view of, or one of its other views, that is read afterwards)."""
    up, family = aliases.family(target)
    if any(n.op == "get_attr" for n in up):
        return None  # a parameter or buffer update (a running statistic, a counter): state, not data
    dtype = tensor_meta(target).dtype
    args = list(node.args[1:]) + list(node.kwargs.values())
    if not all(tensor_meta(a).dtype == dtype for a in args if _is_tensor(a)):
        return None  # an out-of-place op promotes dtypes where the in-place one keeps the target's
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    at = order[node]
    below, todo = set(), [target]  # views of target (through views), made before the write
    while todo:
        for c in aliases.children(todo.pop()):
            if c is not node and c not in below and order[c] < at:
                below.add(c)
                todo.append(c)
    replay = set()
    for other in family:
        if other is target or other is node or order[other] > at:
            continue
        if not any(order[u] > at and u is not node for u in other.users):
            continue
        if other not in below:
            return None  # the tensor target is a view of (or a sibling view) is read afterwards
        while other is not target:  # it, and the views it was made from, are made again
            if not _replayable(other, aliases.modules):
                return None
            replay.add(other)
            other = aliases.parents(other)[0]
    return sorted(replay, key=order.get)


def _path_from_root(node, aliases) -> list[fx.Node] | None:
    """[root, ..., node] through alias parents; None if an op on the way cannot be made again."""
    path = [node]
    while aliases.parents(path[-1]):
        if not _replayable(path[-1], aliases.modules):
            return None
        path.append(aliases.parents(path[-1])[0])
    return path[::-1]


def _write_into_a_copy(gm, node, target, aliases) -> int:
    """An in-place write that cannot become a new tensor (through a view of a tensor read later, or
    an op without an out-of-place form: `x[:, :2].mul_(s)`, `x.zero_()`): it writes into a copy of
    the tensor that target is a view of, made just before it, and every later reader of that
    tensor or of its views reads the copy (views made again from it). Nothing autograd saved is
    overwritten, and every node computes what it computed before. Returns 1 if done, else 0."""
    graph = gm.graph
    up, family = aliases.family(target)
    if any(n.op == "get_attr" for n in up):
        return 0
    chain = _path_from_root(target, aliases)
    if chain is None:
        return 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    at = order[node]
    read_later = [m for m in family if m is not node and order[m] < at
                  and any(order[u] > at and u is not node for u in m.users)]
    paths = {}
    for m in read_later:
        path = _path_from_root(m, aliases)
        if path is None or path[0] is not chain[0]:
            return 0
        paths[m] = path
    root = chain[0]
    with graph.inserting_before(node):
        copy_ = graph.call_method("clone", (root,))
    copy_.meta = dict(root.meta)
    new = {root: copy_}
    last = copy_
    for view in chain[1:]:  # target again, as a view of the copy
        with graph.inserting_after(last):
            last = graph.create_node(view.op, view.target, (new[aliases.parents(view)[0]], *view.args[1:]),
                                     dict(view.kwargs))
        last.meta = dict(view.meta)
        new[view] = last
    node.args = (new[target], *node.args[1:])
    after = {root: copy_}
    last = node
    for view in sorted({v for path in paths.values() for v in path[1:]}, key=order.get):
        with graph.inserting_after(last):
            last = graph.create_node(view.op, view.target, (after[aliases.parents(view)[0]], *view.args[1:]),
                                     dict(view.kwargs))
        last.meta = dict(view.meta)
        after[view] = last
    made = set(new.values()) | set(after.values())
    order = {n: i for i, n in enumerate(graph.nodes)}
    at = order[node]
    for old, replacement in after.items():
        for user in list(old.users):
            if user not in made and user is not node and order[user] > at:
                user.replace_input_with(old, replacement)
    return 1


def _rewrite(gm, node, aliases) -> bool:
    if node.op == "call_method":
        if node.target in _NOT_OUT_OF_PLACE or not callable(getattr(torch.Tensor, node.target[:-1], None)):
            return False
        node.target = node.target[:-1]
    elif node.op == "call_module":
        node.meta["vps_out_of_place"] = True
    elif node.target in _INPLACE_OPERATORS:
        node.target = _INPLACE_OPERATORS[node.target]
    elif node.target is operator.setitem:
        with gm.graph.inserting_before(node):
            clone = gm.graph.call_method("clone", (node.args[0],))
        clone.meta = dict(node.args[0].meta)
        node.args = (clone, *node.args[1:])
    else:
        flag = _inplace_kwarg(node)
        if flag is not None:
            _, i = flag
            if i is None:
                node.kwargs = {**node.kwargs, "inplace": False}
            else:
                node.args = node.args[:i] + (False,) + node.args[i + 1:]
        else:
            f = _out_of_place_function(node.target)
            if f is None:
                return False
            node.target = f
    return True


def _set_submodule(gm, target, module):
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def free_name(gm, name):
    """`name`, or `name_2`, `name_3`, ...: the first that `gm` has no attribute of."""
    out, i = name, 1
    while hasattr(gm, out):
        i += 1
        out = f"{name}_{i}"
    return out
