"""Inline the calls fx cannot see into: capture each alone with torch.export and splice its ops in.

A function that `torch.fx.wrap` keeps whole (torchvision's `shifted_window_attention`, a user's
wrapped helper) is one opaque node in an fx graph: no rule can say how its channels map, so every
channel it reads is pinned. torch.export records the ATen ops inside it. Exporting just that call,
once per distinct signature (function, input shapes, constant arguments), costs a fraction of
exporting the whole model, and the rest of the fx graph (its modules and their names) stays as
traced. The spliced ops read like the export path's graph (slices as getitem, the batch dim
dynamic), so the same rule table serves them.

A call stays opaque when export cannot capture it, when it takes a size computed in the graph (a
Python number export would freeze), or when export froze a dim that follows the batch.
"""
from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..codegen import recompile
from ..rules import FUNCTION_RULES
from .export import _impure, _quiet, _slices_as_getitem
from .inplace import free_name
from .lift import LIFTS
from .trace import is_tensor_meta, tensor_meta

_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def opaque_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """Calls of plain Python functions outside torch that no rule covers and that read a tensor."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not inspect.isfunction(node.target):
            continue
        module = getattr(node.target, "__module__", "") or ""
        if module == "torch" or module.startswith("torch.") or node.target in FUNCTION_RULES or node.target in LIFTS:
            continue
        if any(is_tensor_meta(tensor_meta(a)) for a in pytree.tree_leaves((node.args, node.kwargs))):
            out.append(node)
    return out


def inline_opaque_calls(gm: fx.GraphModule, calls: list[fx.Node]) -> int:
    """Splice the ATen ops of each of `calls` (opaque_calls of a shape-propagated `gm`) in place;
    returns how many were inlined. The shapes it reads must be at a batch of 2 or more (export
    freezes a dim of size 1); the caller propagates shapes again after."""
    bodies: dict[tuple, _Body | None] = {}
    planned = []  # every body is captured before any splice: the shapes read are the graph's own
    for node in calls:
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)]
        if not all(is_tensor_meta(tensor_meta(leaves[i])) for i in slots):
            continue  # a size or flag computed in the graph: export would freeze it
        key = _signature(node.target, leaves, slots, spec)
        if key not in bodies:
            bodies[key] = _capture(gm, node.target, leaves, slots, spec)
        if bodies[key] is not None:
            planned.append((node, bodies[key], slots))
    inlined = 0
    for node, body, slots in planned:
        leaves = pytree.tree_leaves((node.args, node.kwargs))  # an input may be a spliced call's result now
        inlined += _splice(gm, node, body, [leaves[i] for i in slots])
    if inlined:
        gm.graph.lint()
        recompile(gm)
    return inlined


class _Call(torch.nn.Module):
    """One call of `fn` with its constant arguments fixed and its tensors as the inputs."""

    def __init__(self, fn, leaves, slots, spec):
        super().__init__()
        self.fn, self.leaves, self.slots, self.spec = fn, leaves, slots, spec

    def forward(self, *tensors):
        leaves = list(self.leaves)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.fn(*args, **kwargs)


@dataclass(frozen=True)
class _Body:
    graph: fx.Graph  # the call's ATen ops; placeholders in the order of the call's tensor inputs
    out_spec: object  # how its flat outputs make the function's result
    constants: dict  # get_attr target -> tensor the function made at capture time


def _signature(fn, leaves, slots, spec) -> tuple:
    """Calls with equal signatures have equal bodies: same function, same constants (by value when
    they are plain values, else by identity), same input shapes, dtypes and kinds."""
    constants = tuple(leaf if isinstance(leaf, _SCALARS) or _plain_tuple(leaf) else ("id", id(leaf))
                      for i, leaf in enumerate(leaves) if i not in slots)
    inputs = tuple((tuple(tensor_meta(leaves[i]).shape), tensor_meta(leaves[i]).dtype, leaves[i].op == "get_attr")
                   for i in slots)
    return fn, str(spec), constants, inputs


def _plain_tuple(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, _SCALARS) or _plain_tuple(v) for v in value)


def _attribute(gm, target: str):
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _capture(gm, fn, leaves, slots, spec) -> _Body | None:
    # parameters and buffers go in as they are (their values may matter); activations as zeros,
    # with dim 0 free: in a graph at batch >= 2 it is where the batch may be
    inputs, dynamic = [], []
    for i in slots:
        node = leaves[i]
        if node.op == "get_attr":
            inputs.append(_attribute(gm, node.target))
            dynamic.append(None)
        else:
            meta = tensor_meta(node)
            inputs.append(torch.zeros(meta.shape, dtype=meta.dtype))
            dynamic.append({0: torch.export.Dim.AUTO} if len(meta.shape) else None)
    try:
        with _quiet():
            program = torch.export.export(_Call(fn, leaves, slots, spec), tuple(inputs),
                                          dynamic_shapes=(tuple(dynamic),), strict=False)
    except Exception:
        return None  # it stays opaque: its channels stay pinned, as before
    exported = program.module()
    graph = copy.deepcopy(exported.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, value, dyn in zip(placeholders, inputs, dynamic):
        val = node.meta.get("val")
        if dyn is not None and value.shape[0] > 1 and val is not None and isinstance(val.shape[0], int):
            return None  # export froze dim 0: where it is the batch, the graph would not generalise
    constants = {}
    for node in list(graph.nodes):
        if node.op == "call_module":  # export's guard check: its module is not ours to keep
            graph.erase_node(node)
        elif node.op == "get_attr":  # a tensor the function made at capture time
            constants[node.target] = _attribute(exported, node.target)
    _slices_as_getitem(graph)
    graph.eliminate_dead_code(is_impure_node=_impure)
    for node in graph.nodes:  # fresh shapes come from propagation; export's scope is the wrapper's
        for key in ("val", "tensor_meta", "nn_module_stack", "source_fn_stack", "torch_fn"):
            node.meta.pop(key, None)
    return _Body(graph, program.call_spec.out_spec, constants)


def _splice(gm: fx.GraphModule, node: fx.Node, body: _Body, inputs: list[fx.Node]) -> bool:
    """Replace `node` by a copy of `body` reading `inputs`; False (nothing changed) when the call's
    result is used in a way the copy cannot stand in for."""
    output = next(n for n in body.graph.nodes if n.op == "output")
    flat = list(output.args[0])
    structure = pytree.tree_unflatten(flat, body.out_spec) if body.out_spec is not None else flat
    if not isinstance(structure, fx.Node):
        if not isinstance(structure, (tuple, list)) or not all(
                u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                for u in node.users):
            return False
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, fx.Node] = dict(zip(placeholders, inputs))
    with gm.graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op in ("placeholder", "output"):
                continue
            if inner.op == "get_attr":
                name = free_name(gm, f"{node.name}_{inner.target}".replace(".", "_"))
                gm.register_buffer(name, body.constants[inner.target], persistent=False)  # moves with .to()
                env[inner] = gm.graph.get_attr(name)
                continue
            env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
    result = pytree.tree_map(lambda v: env[v] if isinstance(v, fx.Node) else v, structure)
    if isinstance(result, fx.Node):
        node.replace_all_uses_with(result)
    else:
        for user in list(node.users):
            user.replace_all_uses_with(result[user.args[1]])
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True
