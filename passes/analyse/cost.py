"""The one cost model: multiply-accumulates (MACs) per example of each weight-layer call, from the
shapes `trace` recorded on the graph. Group unit costs, section costs, the training objective's
price per weight entry and the kept-MACs figures all read it.

Counted: the calls whose rules declare one weight layer (conv, transposed conv, linear), a MAC per
weight entry per position the weight is applied at:
  conv:            out positions (output numel / out_channels, per example) x weight.numel()
  transposed conv: in positions (input numel / in_channels, per example) x weight.numel()
  linear:          rows (output numel / out_features, per example) x weight.numel()
and the products of two activations (attention's q k^T and weights x v), a MAC per term:
  matmul, bmm:     output numel x the contracted size
  scaled dot-product attention (q: ..., L, E; k: ..., S, E; v: ..., S, Ev): (output numel / Ev) x S x (E + Ev)
  (and attention_heads, nn.MultiheadAttention split by capture: the same, summed over heads)
  einsum of two operands: the product of the sizes of its letters
which is what `torch.utils.flop_counter.FlopCounterMode` counts for these ops (FLOPs = 2 x MACs).
Not counted: biases, norms, activations, pooling, einsums of three or more operands (their cost
depends on the contraction order torch picks).

"Per example": every call's MACs are divided by one batch size, the graph's (`graph_batch`: dim 0
of its first input when its first weight layer runs batched, conv: spatial + 2 dims, linear: 2
dims or more; 1 when that layer runs unbatched). Not each call's own dim 0: windowed attention and heads fold other
dims into dim 0 (Swin's linears and bmm run on B*windows x tokens x C), which would undercount them.

A weight layer's MACs belong to its weight entries (the objective prices each entry); an activation
product's belong to the positions of its output's channel axis (attention heads: a removed head
takes its share of the product with it), or to no unit when that axis is not prunable.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture.trace import is_tensor_meta, tensor_meta
from ..ops import AttentionHeads, attention_heads
from ..rules import facts

aten = torch.ops.aten
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, aten.matmul.default, aten.bmm.default, aten.mm.default, "matmul", "bmm"}
_SDPAS = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_EINSUMS = {torch.einsum, torch.functional.einsum, aten.einsum.default}


@dataclass(frozen=True)
class LayerCall:
    node: str  # the call_module node
    module: str  # its target
    per_entry: float  # MACs per example per weight entry
    macs: float  # MACs per example of the call (per_entry x weight.numel())


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _layer_input_shape(node: fx.Node, m: nn.Module):
    """The shape whose positions the weight is applied at (conv: output; transposed conv: input;
    linear: output rows), or None."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:
        x = node.args[0] if node.args else None
        meta = tensor_meta(x) if isinstance(x, fx.Node) else None
    else:
        meta = tensor_meta(node)
    return tuple(meta.shape) if is_tensor_meta(meta) else None


def _layer(node: fx.Node, modules) -> nn.Module | None:
    if node.op != "call_module" or facts(node, modules).layer != 1:
        return None
    m = modules[node.target]
    if getattr(m, "weight", None) is None or not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        return None
    return m


def _runs_batched(node: fx.Node, m: nn.Module) -> bool | None:
    """Is one weight-layer call batched (conv: spatial + 2 dims; linear: 2 dims or more)? None
    where its shape is not known."""
    shape = _layer_input_shape(node, m)
    if not shape:
        return None
    return len(shape) == len(m.kernel_size) + 2 if isinstance(m, nn.modules.conv._ConvNd) else len(shape) >= 2


def graph_batch(graph: fx.Graph) -> int:
    """The one batch size every cost of a graph is divided by: dim 0 of its first tensor input, when
    the graph is batched (its first weight-layer call is: see _runs_batched; in a graph without
    one, when that input has 2 dims or more), else 1 (an unbatched call is one example). One divisor for every call, not each call's
    own dim 0, keeps calls on tensors that fold other dims into dim 0 (windows, heads, frames) at
    their true cost."""
    first = next((n for n in graph.find_nodes(op="placeholder") if is_tensor_meta(tensor_meta(n))), None)
    if first is None or not len(tensor_meta(first).shape):
        return 1
    size = max(int(tensor_meta(first).shape[0]), 1)
    root = graph.owning_module
    for n in graph.find_nodes(op="call_module") if root is not None else ():
        m = _layer(n, {n.target: root.get_submodule(n.target)})
        batched = _runs_batched(n, m) if m is not None else None
        if batched is not None:
            return size if batched else 1
    return size if len(tensor_meta(first).shape) >= 2 else 1


def per_weight_entry(node: fx.Node, modules, batch: int) -> float | None:
    """MACs per example per weight entry of one conv/linear call; None for other nodes (or
    nodes without recorded shapes). `batch`: graph_batch of its graph (one per graph)."""
    m = _layer(node, modules)
    shape = _layer_input_shape(node, m) if m is not None else None
    if shape is None:
        return None
    channels = m.out_features if isinstance(m, nn.Linear) else m.in_channels if m.transposed else m.out_channels
    return _numel(shape) / batch / max(channels, 1)


def call_macs(node: fx.Node, modules, batch: int) -> float | None:
    """MACs per example of one conv/linear call or activation product; None for other nodes."""
    per = per_weight_entry(node, modules, batch)
    return product_macs(node, batch, modules) if per is None else per * modules[node.target].weight.numel()


def product_macs(node: fx.Node, batch: int, modules=None) -> float | None:
    """MACs per example of a product of two activations (matmul, bmm, scaled dot-product
    attention, two-operand einsum); None for other nodes or where a shape is not known.
    `modules`: the graph module's named_modules, where at hand (else each call is looked up)."""
    if node.op == "call_module" and isinstance(_called(node, modules), AttentionHeads):
        target = attention_heads  # the layer calls it, with q, k and v first as well
    elif node.op in ("call_function", "call_method"):
        target = node.target
    else:
        return None
    out = tensor_meta(node)
    if not is_tensor_meta(out):
        return None
    if target in _MATMULS:
        a = tensor_meta(node.args[0]) if node.args else None
        macs = math.prod(out.shape) * int(a.shape[-1]) if is_tensor_meta(a) and len(a.shape) else None
    elif target in _SDPAS:
        q, k = (tensor_meta(_arg(node, i, name)) for i, name in ((0, "query"), (1, "key")))
        if not (is_tensor_meta(q) and is_tensor_meta(k)) or len(out.shape) < 2:
            return None
        ev = int(out.shape[-1])
        macs = math.prod(out.shape) // max(ev, 1) * int(k.shape[-2]) * (int(q.shape[-1]) + ev)
    elif target is attention_heads:  # (N, L, heads x head_dim) in and out: q k^T and weights x v per head
        q, k, v = (tensor_meta(a) for a in node.args[:3])
        if not all(is_tensor_meta(t) and len(t.shape) == 3 for t in (q, k, v)):
            return None
        macs = int(q.shape[0]) * int(q.shape[1]) * int(k.shape[1]) * (int(q.shape[2]) + int(v.shape[2]))
    elif target in _EINSUMS:
        macs = _einsum_macs(node)
    else:
        return None
    return None if macs is None else macs / batch


def _called(node: fx.Node, modules=None):
    """The module a call_module node calls (None where its graph module is not at hand)."""
    if modules is not None:
        return modules.get(node.target)
    owner = getattr(node.graph, "owning_module", None)
    try:
        return owner.get_submodule(node.target) if owner is not None else None
    except AttributeError:
        return None


def product_macs_along(node: fx.Node, dim: int, total: float, batch: int) -> float:
    """Of a product's MACs per example (`total`, from product_macs), those that go with each
    position of its output's dim `dim`: an equal share of every output element's cost, except
    attention's value dim, which takes only its column of weights x v (q k^T is the same whichever
    value channels stay)."""
    out = tensor_meta(node)
    size = int(out.shape[dim])
    if node.target in _SDPAS and dim % len(out.shape) == len(out.shape) - 1:
        k = tensor_meta(_arg(node, 1, "key"))
        return math.prod(out.shape) // size * int(k.shape[-2]) / batch
    return total / size


def _arg(node, i, name):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _einsum_macs(node) -> int | None:
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or "..." in equation:
        return None
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes = {}
    for letters, x in zip(inputs, operands):
        meta = tensor_meta(x)
        if not is_tensor_meta(meta) or len(meta.shape) != len(letters):
            return None
        sizes.update(zip(letters, (int(d) for d in meta.shape)))
    return math.prod(sizes.values())


@dataclass(frozen=True)
class ProductCall:
    node: str
    macs: float  # MACs per example


def product_calls(gm: fx.GraphModule) -> list[ProductCall]:
    """Every product of two activations in `gm` with a known cost, in graph order."""
    batch = graph_batch(gm.graph)
    return [ProductCall(n.name, m) for n in gm.graph.nodes if (m := product_macs(n, batch))]


def layer_calls(gm: fx.GraphModule) -> list[LayerCall]:
    """Every conv/linear call of `gm`, in graph order, with its cost."""
    modules, batch = dict(gm.named_modules()), graph_batch(gm.graph)
    out = []
    for node in gm.graph.nodes:
        per = per_weight_entry(node, modules, batch)
        if per is not None:
            out.append(LayerCall(node.name, node.target, per, per * modules[node.target].weight.numel()))
    return out


def macs_per_weight_entry(gm: fx.GraphModule) -> dict[str, float]:
    """MACs per example per weight entry of each conv/linear module, summed over its calls."""
    out: dict[str, float] = {}
    for c in layer_calls(gm):
        out[c.module] = out.get(c.module, 0.0) + c.per_entry
    return out


def total_macs(gm: fx.GraphModule) -> int:
    """Conv/linear and activation-product MACs per example of `gm` (its current shapes)."""
    return int(round(sum(c.macs for c in layer_calls(gm)) + sum(c.macs for c in product_calls(gm))))
