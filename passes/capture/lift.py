"""Lift functional layer calls into modules: `F.conv2d(x, self.weight, ...)` becomes a call of an
nn.Conv2d that holds that same Parameter.

Why a pass and not a second set of rules: the channel rule of a layer is its module's rule (one rule
per op kind, passes/rules.py). A layer written functionally (a BatchNorm+activation layer that
calls F.batch_norm with its own parameters, a conv that calls F.conv2d(x, self.weight), or any
layer of a torch.export graph, where every call is aten.conv2d(x, weight, ...)) then gets the same
rule, slicing, cost model and depth facts as the module, and a shrunk model holds ordinary modules.

Lifting also gives train/eval back. A graph is captured in eval mode, so `training=self.training`
in a batch_norm or dropout call is baked in as False; the lifted nn.BatchNorm/nn.Dropout follow
model.train()/.eval() again. Eval-mode capture cannot tell that idiom from a literal False; it is
read as the idiom (a literal False dropout is an identity nobody writes).

A call is lifted only when each of its parameter arguments is a graph attribute (get_attr) holding
a tensor of the shape the module holds. A weight computed in the graph (weight standardisation) is
left alone: it has no rule, so its channels stay, and the report says so.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..codegen import recompile
from .trace import is_tensor_meta, tensor_meta

aten = torch.ops.aten


@dataclass(frozen=True)
class Lift:
    names: tuple[str, ...]  # the call's positional parameters, in order
    defaults: dict  # values of parameters the call may leave out
    tensors: tuple[str, ...]  # parameters that must be graph attributes (or None) to lift
    build: Callable[[dict, tuple], nn.Module | None]  # (arguments, input shape) -> module, None: leave it
    # a layer whose bias adds one value per output channel, along this output dim (conv 1, linear -1):
    # a bias computed in the graph (a parameter with part of it zeroed) becomes a bias-free layer + add
    bias_dim: int | None = None


def _pair(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _conv(nd: int):
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]

    def build(a, shape):
        w, g = a["weight"], a["groups"]
        if w.ndim != nd + 2:
            return None
        padding = a["padding"] if isinstance(a["padding"], str) else _pair(a["padding"], nd)
        return cls(w.shape[1] * g, w.shape[0], tuple(w.shape[2:]), stride=_pair(a["stride"], nd), padding=padding,
                   dilation=_pair(a["dilation"], nd), groups=g, bias=a["bias"] is not None)
    return Lift(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}, ("weight", "bias"), build, 1)


def _conv_transpose(nd: int):
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]

    def build(a, shape):
        w, g = a["weight"], a["groups"]
        if w.ndim != nd + 2:
            return None
        return cls(w.shape[0], w.shape[1] * g, tuple(w.shape[2:]), stride=_pair(a["stride"], nd),
                   padding=_pair(a["padding"], nd), output_padding=_pair(a["output_padding"], nd), groups=g,
                   bias=a["bias"] is not None, dilation=_pair(a["dilation"], nd))
    return Lift(("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
                {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1},
                ("weight", "bias"), build, 1)


def _linear(a, shape):
    w = a["weight"]
    return nn.Linear(w.shape[1], w.shape[0], bias=a["bias"] is not None) if w.ndim == 2 else None


def _batch_norm(a, shape):
    affine, stats = a["weight"] is not None, a["running_mean"] is not None
    if affine != (a["bias"] is not None) or stats != (a["running_var"] is not None) or len(shape) < 2:
        return None
    if a["training"] != (not stats):  # eval statistics in eval (baked False), or batch statistics always
        return None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(len(shape))
    if cls is None:
        return None
    return cls(shape[1], eps=a["eps"], momentum=a["momentum"], affine=affine, track_running_stats=stats)


def _layer_norm(a, shape):
    if a["weight"] is None and a["bias"] is not None:
        return None
    return nn.LayerNorm(list(_pair(a["normalized_shape"], 1)), eps=a["eps"], elementwise_affine=a["weight"] is not None,
                        bias=a["bias"] is not None)


def _rms_norm(a, shape):
    return nn.RMSNorm(list(_pair(a["normalized_shape"], 1)), eps=a["eps"], elementwise_affine=a["weight"] is not None)


def _group_norm(a, shape):
    affine = a["weight"] is not None
    if affine != (a["bias"] is not None) or len(shape) < 2:
        return None
    return nn.GroupNorm(a["num_groups"], shape[1], eps=a["eps"], affine=affine)


def _instance_norm(a, shape):
    affine, stats = a["weight"] is not None, a["running_mean"] is not None
    if affine != (a["bias"] is not None) or stats or not a["use_input_stats"]:
        return None  # instance statistics always: what nn.InstanceNorm computes untracked
    cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}.get(len(shape))
    return cls(shape[1], eps=a["eps"], momentum=a["momentum"], affine=affine) if cls is not None else None


def _embedding(a, shape):
    w = a["weight"]
    if w.ndim != 2:
        return None
    return nn.Embedding(w.shape[0], w.shape[1], padding_idx=a["padding_idx"], max_norm=a["max_norm"],
                        norm_type=a["norm_type"], scale_grad_by_freq=a["scale_grad_by_freq"], sparse=a["sparse"])


def _aten_embedding(a, shape):  # aten's padding_idx -1 is "none" (F.embedding has made a negative one positive)
    return _embedding({**a, "padding_idx": None if a["padding_idx"] == -1 else a["padding_idx"],
                       "max_norm": None, "norm_type": 2.0}, shape)


def _prelu(a, shape):
    return nn.PReLU(a["weight"].numel())




_CONV = {nd: _conv(nd) for nd in (1, 2, 3)}
_CONV_T = {nd: _conv_transpose(nd) for nd in (1, 2, 3)}
_LINEAR = Lift(("input", "weight", "bias"), {"bias": None}, ("weight", "bias"), _linear, -1)
_BN_F = Lift(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
             {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
             ("running_mean", "running_var", "weight", "bias"), _batch_norm)
_BN_ATEN = Lift(("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                 "cudnn_enabled"), {}, ("running_mean", "running_var", "weight", "bias"), _batch_norm)
_LN = Lift(("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5},
           ("weight", "bias"), _layer_norm)
_RMS = Lift(("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None}, ("weight",), _rms_norm)
_LN_ATEN = Lift(_LN.names + ("cudnn_enable",), {**_LN.defaults, "cudnn_enable": True}, _LN.tensors, _layer_norm)
_GN = Lift(("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5},
           ("weight", "bias"), _group_norm)
_GN_ATEN = Lift(_GN.names + ("cudnn_enabled",), {**_GN.defaults, "cudnn_enabled": True}, _GN.tensors, _group_norm)
_PRELU = Lift(("input", "weight"), {}, ("weight",), _prelu)
_EMB_F = Lift(("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
              {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False},
              ("weight",), _embedding)
_EMB_ATEN = Lift(("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"),  # indices second
                 {"padding_idx": -1, "scale_grad_by_freq": False, "sparse": False}, ("weight",), _aten_embedding)
_IN_F = Lift(("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
             {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True,
              "momentum": 0.1, "eps": 1e-5}, ("running_mean", "running_var", "weight", "bias"), _instance_norm)
_IN_ATEN = Lift(("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum", "eps",
                 "cudnn_enabled"), {}, _IN_F.tensors, _instance_norm)


def _dropout_lift(cls, train_name="training", inplace=None):
    def build(a, shape):  # a dropout that samples in eval mode too is left as it is
        return cls(a["p"], inplace=bool(a["inplace"])) if a[train_name] is False else None
    names = ("input", "p", train_name) + (("inplace",) if inplace is None else ())
    return Lift(names, {"p": 0.5, train_name: True, "inplace": bool(inplace)}, (), build)


# function (torch or ATen overload) -> how to lift it
LIFTS: dict[Callable, Lift] = {
    F.conv1d: _CONV[1], F.conv2d: _CONV[2], F.conv3d: _CONV[3],
    aten.conv1d.default: _CONV[1], aten.conv2d.default: _CONV[2], aten.conv3d.default: _CONV[3],
    aten.conv1d.padding: _CONV[1], aten.conv2d.padding: _CONV[2], aten.conv3d.padding: _CONV[3],
    F.conv_transpose1d: _CONV_T[1], F.conv_transpose2d: _CONV_T[2], F.conv_transpose3d: _CONV_T[3],
    aten.conv_transpose1d.default: _CONV_T[1], aten.conv_transpose2d.input: _CONV_T[2],
    aten.conv_transpose3d.input: _CONV_T[3],
    F.linear: _LINEAR, aten.linear.default: _LINEAR,
    F.batch_norm: _BN_F, aten.batch_norm.default: _BN_ATEN,
    F.layer_norm: _LN, aten.layer_norm.default: _LN_ATEN,
    F.rms_norm: _RMS, aten.rms_norm.default: _RMS,
    F.group_norm: _GN, aten.group_norm.default: _GN_ATEN,
    F.prelu: _PRELU, aten.prelu.default: _PRELU,
    F.embedding: _EMB_F, aten.embedding.default: _EMB_ATEN,
    F.instance_norm: _IN_F, aten.instance_norm.default: _IN_ATEN,
    F.dropout: _dropout_lift(nn.Dropout), aten.dropout.default: _dropout_lift(nn.Dropout, "train", False),
    aten.dropout_.default: _dropout_lift(nn.Dropout, "train", True),
    F.dropout1d: _dropout_lift(nn.Dropout1d), F.dropout2d: _dropout_lift(nn.Dropout2d),
    F.dropout3d: _dropout_lift(nn.Dropout3d),
}


def _arguments(node: fx.Node, lift: Lift) -> dict | None:
    args = dict(lift.defaults)
    if len(node.args) > len(lift.names) or any(k not in lift.names for k in node.kwargs):
        return None
    args.update(zip(lift.names, node.args))
    args.update(node.kwargs)
    return args if all(n in args for n in lift.names) else None


def _holds_node(value) -> bool:
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, (tuple, list)) and any(_holds_node(v) for v in value)


def _attribute(gm: fx.GraphModule, value):
    """The tensor a get_attr argument names (None for None); False if the argument is anything else."""
    if value is None:
        return None
    if not (isinstance(value, fx.Node) and value.op == "get_attr"):
        return False
    owner, _, leaf = value.target.rpartition(".")
    t = getattr(gm.get_submodule(owner) if owner else gm, leaf, None)
    return t if isinstance(t, torch.Tensor) else False


def _install(module: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Put the user's tensor itself into the new module (shared, not copied)."""
    own = getattr(module, name, None)
    if not isinstance(own, torch.Tensor) or own.shape != tensor.shape:
        return False
    if name in module._parameters:
        if isinstance(tensor, nn.Parameter):
            module._parameters[name] = tensor
        else:  # the user keeps it as a buffer (frozen): so does the lifted module
            del module._parameters[name]
            module.register_buffer(name, tensor)
    else:
        module._buffers[name] = tensor
    return True


def _owner(targets: list[str]) -> str | None:
    owners = {t.rpartition(".")[0] for t in targets}
    return owners.pop() if len(owners) == 1 else None


def _place(gm: fx.GraphModule, module: nn.Module, targets: list[str], called: set[str], op_name: str) -> str:
    """Where the lifted module lives. It takes its owner's place when the owner is a bare container
    of exactly these tensors (what fx and torch.export make of a module they traced through), so the
    parameters keep their names; else it becomes a child of the owner."""
    owner = _owner(targets)
    if owner:
        holder = gm.get_submodule(owner)
        own = set(holder._parameters) | set(holder._buffers)
        leaves = {t.rpartition(".")[2] for t in targets} | {"num_batches_tracked"}
        if type(holder) is nn.Module and own <= leaves and owner not in called:
            for child_name, child in holder.named_children():
                module.add_module(child_name, child)
            if "num_batches_tracked" in holder._buffers and "num_batches_tracked" in module._buffers:
                module._buffers["num_batches_tracked"] = holder._buffers["num_batches_tracked"]
            parent, _, leaf = owner.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
            return owner
    base = owner or ""
    holder = gm.get_submodule(base) if base else gm
    leaf, i = op_name, 1
    while hasattr(holder, leaf):
        i += 1
        leaf = f"{op_name}_{i}"
    holder.add_module(leaf, module)
    return f"{base}.{leaf}" if base else leaf


def lift_layers(gm: fx.GraphModule) -> int:
    """Lift every liftable functional layer call of a shape-propagated `gm` (in place). Returns how
    many calls were lifted; the caller re-propagates shapes when any were."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        try:
            lift = LIFTS.get(node.target)
        except TypeError:  # an unhashable callable
            continue
        args = _arguments(node, lift) if lift is not None else None
        if args is None or not isinstance(args["input"], fx.Node):
            continue
        meta = args["input"].meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            continue
        if "normalized_shape" in args:  # it must equal the input's trailing dims: read it from there
            ndim = len(args["normalized_shape"]) if isinstance(args["normalized_shape"], (tuple, list)) else 1
            args["normalized_shape"] = tuple(meta.shape[len(meta.shape) - ndim:])
        if any(_holds_node(v) for k, v in args.items() if k != "input" and k not in lift.tensors):
            continue  # a size or flag computed at run time: not a fixed layer
        tensors = {name: _attribute(gm, args[name]) for name in lift.tensors}
        bias = None  # a computed bias (a tensor node): added after a bias-free layer
        if lift.bias_dim is not None and tensors.get("bias") is False and is_tensor_meta(tensor_meta(args["bias"])):
            bias, tensors["bias"], args = args["bias"], None, {**args, "bias": None}
        if any(t is False for t in tensors.values()):
            continue  # a computed weight: not a plain layer
        module = lift.build({**args, **tensors}, tuple(meta.shape))
        if module is None or not all(_install(module, n, t) for n, t in tensors.items() if t is not None):
            continue
        targets = [args[n].target for n in lift.tensors if tensors[n] is not None]
        op_name = getattr(node.target, "__name__", "layer").split(".")[0]
        path = _place(gm, module, targets, called, op_name)
        called.add(path)
        with gm.graph.inserting_before(node):
            call = result = gm.graph.call_module(path, (args["input"],))
            if bias is not None:
                if lift.bias_dim != -1:  # one value per channel of dim 1: broadcast over the rest
                    bias = gm.graph.call_method("reshape", (bias, (-1,) + (1,) * (len(meta.shape) - 1 - lift.bias_dim)))
                result = gm.graph.call_function(operator.add, (call, bias))
        for made in {call, result}:  # the layer (and the add after it) compute the call's shape
            made.meta = dict(node.meta)
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        lifted += 1
    if lifted:
        _drop_unused_attributes(gm)
        gm.graph.lint()
        recompile(gm)
    return lifted


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """get_attr nodes left without users go; so do their tensors where a lifted module took them over
    (an attribute still read elsewhere, or owned by a module the graph calls, stays)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    held = {id(t) for m in gm.modules() if type(m) is not nn.Module
            for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None}
    for name, holder in list(gm.named_modules()):
        if type(holder) is not nn.Module and holder is not gm:  # bare containers and the graph's root
            continue
        for store in (holder._parameters, holder._buffers):
            for leaf, t in list(store.items()):
                path = f"{name}.{leaf}" if name else leaf
                if path not in read and t is not None and id(t) in held:
                    del store[leaf]
