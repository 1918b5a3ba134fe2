"""The one cost model: multiply-accumulates (MACs) per example of each weight-layer call, from the
shapes `trace` recorded on the graph. Group unit costs, section costs, the training objective's
price per weight entry and the kept-MACs figures all read it.

Counted: the calls whose rules declare one weight layer (conv, transposed conv, linear), a MAC per
weight entry per position the weight is applied at:
  conv:            out positions (output numel / out_channels, per example) x weight.numel()
  transposed conv: in positions (input numel / in_channels, per example) x weight.numel()
  linear:          rows (output numel / out_features, per example) x weight.numel()
which is what `torch.utils.flop_counter.FlopCounterMode` counts for these ops (FLOPs = 2 x MACs).
Not counted: biases, norms, activations, pooling, attention's matrix products.

"Per example": dim 0 is the batch when the input is batched (conv: spatial + 2 dims; linear:
2 dims or more); an unbatched call is one example.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from ..capture.trace import is_tensor_meta, tensor_meta
from ..rules import facts


@dataclass(frozen=True)
class LayerCall:
    node: str  # the call_module node
    module: str  # its target
    per_entry: float  # MACs per example per weight entry
    macs: float  # MACs per example of the call (per_entry x weight.numel())


def _per_example(shape, batched: bool) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel // max(int(shape[0]), 1) if batched and len(shape) else numel


def per_weight_entry(node: fx.Node, modules) -> float | None:
    """MACs per example per weight entry of one conv/linear call; None for other nodes (or
    nodes without recorded shapes)."""
    if node.op != "call_module" or facts(node, modules).layer != 1:
        return None
    m = modules[node.target]
    w = getattr(m, "weight", None)
    out = tensor_meta(node)
    if w is None or not is_tensor_meta(out):
        return None
    if isinstance(m, nn.Linear):
        return _per_example(out.shape, len(out.shape) >= 2) / max(m.out_features, 1)
    if isinstance(m, nn.modules.conv._ConvNd):
        spatial = len(m.kernel_size)
        if m.transposed:
            x = node.args[0] if node.args else None
            inp = tensor_meta(x) if isinstance(x, fx.Node) else None
            if not is_tensor_meta(inp):
                return None
            return _per_example(inp.shape, len(inp.shape) == spatial + 2) / max(m.in_channels, 1)
        return _per_example(out.shape, len(out.shape) == spatial + 2) / max(m.out_channels, 1)
    return None  # a layer kind this model does not know the cost of


def call_macs(node: fx.Node, modules) -> float | None:
    """MACs per example of one conv/linear call; None for other nodes."""
    per = per_weight_entry(node, modules)
    return None if per is None else per * modules[node.target].weight.numel()


def layer_calls(gm: fx.GraphModule) -> list[LayerCall]:
    """Every conv/linear call of `gm`, in graph order, with its cost."""
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        per = per_weight_entry(node, modules)
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
    """Conv/linear MACs per example of `gm` (its current weights)."""
    return int(round(sum(c.macs for c in layer_calls(gm))))
