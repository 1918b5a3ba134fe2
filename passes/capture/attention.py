"""Attention as graph ops whose heads are prunable units.

nn.MultiheadAttention is one opaque call whose inner width is tied to its embedding width, so it
would pin the residual stream it reads. `split_attention` rewrites a self-attention call into
in-projection (nn.Linear) -> chunk into q, k, v -> `AttentionHeads` -> out-projection (nn.Linear),
and a cross-attention call (query other than key or value, or separate kdim/vdim weights) into one
projection per input. Then the streams (projection inputs, out-projection outputs) and the heads
prune independently. A 2-D `attn_mask` and `key_padding_mask` pass to the heads, as do the
attention dropout (in training only, as nn.MultiheadAttention's) and the causal path; a per-head
mask (N*heads, L, S) would have to shrink with the heads, so a call with one stays whole, as does
one with bias_k/bias_v, add_zero_attn, flags computed in the graph or read attention weights.

`AttentionHeads` (ops.py, calling `attention_heads(q, k, v, head_dim)`) splits the channel dim
into heads of `head_dim`, runs scaled dot-product attention per head and joins the heads again. Its rule (rules.py) makes each head one
unit: the head's q, k and v channels and the out-projection columns it feeds go together. Removing a
head removes rows of the in-projection and columns of the out-projection; `head_dim` stays, so the
head count follows from the tensor's width and no argument needs rewriting.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from ..codegen import recompile
from ..ops import AttentionHeads




def _arg(node: fx.Node, i: int, name: str, default=None):
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def _causal(node: fx.Node) -> bool:
    """Does the call take scaled_dot_product_attention's causal path? MultiheadAttention reads
    is_causal as a hint that attn_mask is the causal mask, and drops the mask for it only when it
    need not return weights and has no padding mask; otherwise it applies the mask."""
    return (_arg(node, 7, "is_causal", False) is True and _arg(node, 3, "key_padding_mask") is None
            and _arg(node, 4, "need_weights", True) is False)


def _splittable(node: fx.Node, m: nn.MultiheadAttention) -> bool:
    """Attention without per-head masks, biases on k/v or returned weights: what attention_heads
    computes."""
    mask = None if _causal(node) else _arg(node, 5, "attn_mask")
    mask_meta = mask.meta.get("tensor_meta") if isinstance(mask, fx.Node) else None
    two_d = mask is None or (mask_meta is not None and len(mask_meta.shape) == 2)
    flags = all(isinstance(_arg(node, i, name, d), bool)  # constants, not values computed in the graph
                for i, name, d in ((4, "need_weights", True), (7, "is_causal", False)))
    if not (two_d and flags and m.bias_k is None and not m.add_zero_attn):
        return False
    for user in node.users:  # only the attention output may be read; the weights must go unused
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
            return False
        if user.args[1] == 1 and user.users:
            return False
    return True


def _linear(weight: nn.Parameter, bias) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def split_attention(gm: fx.GraphModule) -> int:
    """Rewrite every splittable nn.MultiheadAttention call of `gm` (in place); returns how many."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if type(m) is not nn.MultiheadAttention or not _splittable(node, m):
            continue
        inputs = [_arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]
        holder = nn.Module()  # takes the attention module's place: the projections and the heads
        holder.out_proj = _linear(m.out_proj.weight, m.out_proj.bias)
        holder.heads = AttentionHeads(m.head_dim, m.dropout, _causal(node))
        names = ("q_proj", "k_proj", "v_proj")
        if inputs[0] is inputs[1] is inputs[2] and m._qkv_same_embed_dim:
            holder.in_proj = _linear(m.in_proj_weight, m.in_proj_bias)
        else:  # one projection per input: its own weight (kdim, vdim), or the in-projection's rows for it
            def rows(t, i):
                return None if t is None else nn.Parameter(t.detach()[i * m.embed_dim:(i + 1) * m.embed_dim].clone())
            own = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
            for i, name in enumerate(names):
                weight = rows(m.in_proj_weight, i) if m._qkv_same_embed_dim else own[i]
                setattr(holder, name, _linear(weight, rows(m.in_proj_bias, i)))
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, holder)
        g = gm.graph
        with g.inserting_before(node):
            if not m.batch_first:  # each distinct input moved once
                moved = {x: g.call_method("transpose", (x, 0, 1)) for x in dict.fromkeys(inputs)}
                inputs = [moved[x] for x in inputs]
            if hasattr(holder, "in_proj"):
                qkv = g.call_module(f"{node.target}.in_proj", (inputs[0],))
                chunks = g.call_method("chunk", (qkv, 3, -1))
                q, k, v = (g.call_function(operator.getitem, (chunks, i)) for i in range(3))
            else:
                q, k, v = (g.call_module(f"{node.target}.{name}", (x,)) for name, x in zip(names, inputs))
            masks = (None if _causal(node) else _arg(node, 5, "attn_mask"), _arg(node, 3, "key_padding_mask"))
            out = g.call_module(f"{node.target}.heads", (q, k, v, *masks))
            out = g.call_module(f"{node.target}.out_proj", (out,))
            if not m.batch_first:
                out = g.call_method("transpose", (out, 0, 1))
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            g.erase_node(user)
        g.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        recompile(gm)
    return done
