"""The one table of per-op channel rules.

For every op kind (module type, function, method name) a `Rule` answers:
  1. coupling (`analyse`): given the channel layouts of the inputs, which positions are the same
     channel, and where do the channels sit in the output;
  2. slicing: for modules, which parameter dims belong to which channel axis (`params`) and how to
     rebuild the module at its new size (`resize`); for calls with literal sizes in their arguments
     (view, split, getitem), how to rewrite those arguments (`rewrite`).

  3. op facts, the same for every pass that asks (`facts`): is the op an affine map of its tensor
     input (`linear`: a path of such ops is a linear residual connection), an activation
     (`nonlinear`), how many sequential weight layers it holds (`layer`: conv/linear 1, attention 2;
     network depth and the cost model read it), may its output share memory with its input
     (`alias`: views, casts that may return the input, dropout), is it random (`random`: a view
     that must not be replayed).

Decisions made once here: average pooling (and adaptive average pooling) is linear, max/LP pooling
is not; BatchNorm is linear (an affine map in eval, which is what sections are judged by);
dropout and stochastic depth are linear (identity in eval, a fixed per-position scale when
sampled) and may alias (in eval they return their input itself), but are random, so never
replayed as views. Ops with facts but no channel rule (MultiheadAttention, narrow, select, ...)
carry `analyse=None`: `lookup` does not return them and the walker pins them like unknown ops.

An op absent from this table is never guessed at: the walker in `groups.py` pins every channel that
reaches it (it stays) and reports the op; its facts (`UNKNOWN`) are the conservative ones
(nonlinear, not linear, not a layer, may alias). One exception, by construction of the table: a
torch op that is not listed does not alias, since every torch view op is listed here.

Users add rules for their own ops with `register_rule` (public as `vpsurgery.register_rule`).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
import torchvision

from .channels import Layout
from .ops import AttentionHeads, attention_heads

aten = torch.ops.aten


class Unsupported(Exception):
    """Raised by a rule for a use of its op it cannot handle exactly; the walker pins and reports."""


@dataclass(frozen=True)
class Rule:
    # channel analysis (None: facts only; the walker treats the op as unknown)
    analyse: Callable[[Any], Any] | None
    # module rules: parameter/buffer name -> {dim: channel axis name}, as a function of the module
    params: Callable[[nn.Module], dict[str, dict[int, str]]] | None = None
    # module rules: set the module's size hyperparameters from the kept size of each axis
    resize: Callable[[nn.Module, dict[str, int]], None] | None = None
    # call rules: fix literal size arguments after shrinking
    rewrite: Callable[[Any], None] | None = None
    # module rules for mixing consumers: scale input channels (folds a gate value into weights)
    fold_input: Callable[[nn.Module, torch.Tensor], None] | None = None
    # ---- op facts (module docstring, item 3)
    linear: bool = False  # an affine map of its tensor input (linear residual paths)
    nonlinear: bool = False  # an activation (add_residuals' tail must hold one)
    layer: int = 0  # sequential weight layers in the op (conv/linear 1, attention 2)
    alias: bool = False  # the output may share memory with (or be) the first input
    random: bool = False  # sampled (dropout): its result cannot be made again


def _facts(rule: Rule, **facts) -> Rule:
    return replace(rule, **facts)


class CallArgs:
    """A call node's arguments as its op's signature names them: what both a rule's analysis
    context and its rewrite context read."""

    node = None  # the fx.Node, set by the subclass

    def arg(self, i: int, name: str | None = None, default=None):
        if i < len(self.node.args):
            return self.node.args[i]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def varargs(self, start: int, name: str):
        """Sizes/dims given either as *args or as one tuple (x.view(a, b) vs x.view((a, b)))."""
        rest = self.node.args[start:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            return list(rest[0])
        if not rest and name in self.node.kwargs:
            return list(self.node.kwargs[name])
        return list(rest)


# --------------------------------------------------------------------------- sizes read as numbers
def _meta_is_tensor(value) -> bool:
    meta = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
    return meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype")


def whole_shape_of(node) -> fx.Node | None:
    """The tensor whose whole shape `node` is (`x.size()`, `x.shape`), else None."""
    if not isinstance(node, fx.Node) or not node.args or not _meta_is_tensor(node.args[0]):
        return None
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1 and "dim" not in node.kwargs:
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "shape":
        return node.args[0]
    return None


ALL_DIMS = None  # in a size dependency: the tensor's whole shape (or its values)


def size_deps(value, memo: dict | None = None) -> frozenset:
    """Which sizes of which tensors a Python number (or size tuple) computed in the graph depends on:
    a set of (tensor node, dim), dim ALL_DIMS when it reads the whole shape or the tensor's values."""
    if not isinstance(value, fx.Node):
        if isinstance(value, (tuple, list)):
            return frozenset().union(*(size_deps(v, memo) for v in value)) if value else frozenset()
        if isinstance(value, slice):
            return size_deps((value.start, value.stop, value.step), memo)
        return frozenset()
    memo = {} if memo is None else memo
    if value in memo:
        return memo[value]
    node, out = value, None
    if _meta_is_tensor(node):
        out = frozenset({(node, ALL_DIMS)})
    elif whole_shape_of(node) is not None:
        out = frozenset({(whole_shape_of(node), ALL_DIMS)})
    elif node.op == "call_function" and node.target is operator.getitem and whole_shape_of(node.args[0]) is not None:
        t, index = whole_shape_of(node.args[0]), node.args[1]
        ndim = len(t.meta["tensor_meta"].shape)
        if isinstance(index, int):
            out = frozenset({(t, index % ndim)})
        elif isinstance(index, slice) and all(isinstance(v, (int, type(None))) for v in (index.start, index.stop, index.step)):
            out = frozenset((t, d) for d in range(ndim)[index])
    elif node.op == "call_method" and node.target == "size" and node.args and _meta_is_tensor(node.args[0]):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dim, int):
            out = frozenset({(node.args[0], dim % len(node.args[0].meta["tensor_meta"].shape))})
    elif (node.op == "call_method" and node.target in ("dim", "ndimension")) or (
            node.op == "call_function" and node.target is getattr and node.args[1] in ("ndim", "dtype", "device",
                                                                                        "is_cuda", "layout")):
        out = frozenset()
    elif node.op == "call_function" and node.target is aten.sym_size.int and _meta_is_tensor(node.args[0]):
        out = frozenset({(node.args[0], node.args[1] % len(node.args[0].meta["tensor_meta"].shape))})
    elif node.op == "call_function" and node.target is len and node.args and _meta_is_tensor(node.args[0]):
        out = frozenset({(node.args[0], 0)})
    elif node.op == "call_function" and node.target is len and whole_shape_of(node.args[0]) is not None:
        out = frozenset()  # the number of dims
    if out is None:
        out = frozenset().union(*(size_deps(a, memo) for a in node.all_input_nodes)) if node.all_input_nodes \
            else frozenset()
    memo[value] = out
    return out


MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Callable, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def module_rule(module: nn.Module) -> Rule | None:
    """The rule of a module's exact type (a subclass may change forward), or, for a module whose
    tensors torch.nn.utils.parametrize computes (weight_norm, spectral_norm), its own class's: the
    class parametrize makes only turns those tensors into properties."""
    rule = MODULE_RULES.get(type(module))
    if rule is None and parametrize.is_parametrized(module):
        rule = MODULE_RULES.get(parametrize.type_before_parametrizations(module))
    return rule


def _registered(node, modules) -> Rule | None:
    if node.op == "call_module":
        return module_rule(modules[node.target])
    if node.op == "call_function":
        try:
            return FUNCTION_RULES.get(node.target)
        except TypeError:  # an unhashable callable
            return None
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None


def lookup(node, modules) -> Rule | None:
    """The channel rule of `node`'s op, or None (the walker pins what reaches it)."""
    rule = _registered(node, modules)
    return rule if rule is not None and rule.analyse is not None else None


# Facts of an op the table does not know: it may compute anything (nonlinear, not linear, no
# layer it declares) and may return its input or a view of it.
UNKNOWN = Rule(analyse=None, linear=False, nonlinear=True, layer=0, alias=True)
# A torch op not in the table: as unknown, but not an alias (every torch view op is listed).
_UNLISTED_TORCH = replace(UNKNOWN, alias=False)
# Graph inputs and parameters.
_PLACEHOLDER = Rule(analyse=None, linear=False, nonlinear=False, alias=False)
_GET_ATTR = Rule(analyse=None, linear=True, nonlinear=False, alias=False)  # a constant: affine


def _from_torch(node, modules) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]).__module__.startswith(("torch.", "torchvision."))
    if node.op == "call_method":
        return True  # a Tensor method
    module = getattr(node.target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "torchvision", "_operator", "operator", "builtins", "math")


def facts(node, modules) -> Rule:
    """The op facts of `node` (its Rule, or `UNKNOWN`): what sections, depth, the cost model, the
    in-place pass and shrink's dead-code elimination read. A subclass of a registered module keeps
    its base's `layer` (its weights are the base's) and nothing else: its forward may differ."""
    rule = _registered(node, modules)
    if rule is not None:
        return rule
    if node.op == "placeholder":
        return _PLACEHOLDER
    if node.op == "get_attr":
        return _GET_ATTR
    if node.op == "call_module":
        for base in type(modules[node.target]).__mro__[1:]:
            if base in MODULE_RULES:
                return replace(UNKNOWN, layer=MODULE_RULES[base].layer)
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        # an ATen op says itself whether it returns a view of (or writes into) its input
        return replace(_UNLISTED_TORCH, alias=bool(node.target.is_view or node.target._schema.is_mutable))
    if node.op in ("call_module", "call_function", "call_method") and _from_torch(node, modules):
        return _UNLISTED_TORCH
    return UNKNOWN


def register_rule(op, rule: Rule) -> None:
    """Register `rule` for `op`: a module class (exact type), a function, or a Tensor method name.
    Replaces the rule `op` had. Rules are read when a model is wrapped (graphs wrapped before keep
    their plan). Build rules with `elementwise()` or `channelwise_module(...)`, or a `Rule`."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule: expected a Rule, got {type(rule).__name__}")
    if isinstance(op, str):
        METHOD_RULES[op] = rule
    elif isinstance(op, type):
        if not issubclass(op, nn.Module):
            raise TypeError(f"register_rule: {op.__name__} is a class but not an nn.Module")
        MODULE_RULES[op] = rule
    elif callable(op):
        FUNCTION_RULES[op] = rule
    else:
        raise TypeError(f"register_rule: op must be a module class, a function or a method name, got {op!r}")


def _register(table, keys, rule):
    for k in keys:
        table[k] = rule


# --------------------------------------------------------------------------- shared helpers
def _nd(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def along(ctx, value, dim: int) -> np.ndarray:
    """The 1-D channel ids of `value` along `dim` (full length). Channels that sit elsewhere are
    pinned: a consumer reading `dim` cannot remove part of a channel that lives on another dim."""
    lay, shape = ctx.layout_of(value), ctx.shape_of(value)
    if lay.dim is not None and lay.dim != dim and lay.ids.shape[lay.dim] > 1:
        ctx.pin(lay, f"channels on dim {lay.dim} are read along dim {dim}")
    ids = lay.ids
    for d in range(ids.ndim):
        if d != dim:
            ids = ids.take([0], axis=d)
    return np.broadcast_to(ids.reshape(-1), (shape[dim],)).copy()


def channel_layout(ids_1d: np.ndarray, ndim: int, dim: int) -> Layout:
    shape = [1] * ndim
    shape[dim] = len(ids_1d)
    return Layout(ids_1d.reshape(shape), dim)


def _same(ctx):
    """Elementwise unary op: channels stay where they are."""
    return ctx.layout_of(ctx.arg(0, "input"))


def _metadata(ctx):
    """Reads only shape/dtype facts of its inputs; no channel values flow through it."""
    if ctx.out_is_tensor:  # e.g. `x == y` on tensors compares values: not metadata
        raise Unsupported("comparison or arithmetic on tensor values")
    if ctx.node.target is getattr and ctx.arg(1) not in METADATA_ATTRS:
        raise Unsupported(f"attribute .{ctx.arg(1)} of a tensor")
    return None


# --------------------------------------------------------------------------- conv / linear
def _conv_analyse(ctx, spatial: int):
    m, x = ctx.module, ctx.arg(0, "input")
    shape = ctx.shape_of(x)
    cdim = len(shape) - spatial - 1
    inp = ctx.axis("in", m.in_channels)
    out = ctx.axis("out", m.out_channels, producer=True)
    ctx.space.union(along(ctx, x, cdim), inp)
    g = m.groups
    if g > 1 and by_position(m):
        # Position k of every group is one unit, on each side: the conv keeps its g groups, each
        # narrower. The weight's per-group dim holds one group's positions: its in side ("group_in"),
        # a transposed conv's out side ("group_out").
        cin, cout = m.in_channels // g, m.out_channels // g
        ctx.space.union_rows(inp.reshape(g, cin).T)
        ctx.space.union_rows(out.reshape(g, cout).T)
        if m.transposed:
            ctx.space.union(ctx.axis("group_out", cout), out[:cout])
        else:
            ctx.space.union(ctx.axis("group_in", cin), inp[:cin])
        ctx.consume(0, cdim)
    elif g > 1:
        # Whole groups go, or the conv would become invalid: each group's in and out channels form
        # one unit.
        cin, cout = m.in_channels // g, m.out_channels // g
        ctx.space.union_rows(np.concatenate([inp.reshape(g, cin), out.reshape(g, cout)], axis=1))  # row j: group j
    else:
        ctx.consume(0, cdim)
    return channel_layout(out, len(ctx.out_shape), cdim)


def by_position(m) -> bool:
    """Do a grouped conv's units run across its groups (position k of every group) rather than
    being whole groups? Whichever gives more units: both keep the conv valid and are exact, and
    the finer one lets more go (a split-attention conv of 2 wide groups whose halves are summed
    later, a RegNet stage of few groups; a depthwise or ResNeXt conv keeps whole groups)."""
    return m.groups > 1 and m.out_channels // m.groups > m.groups


def _conv_params(m):
    if m.groups > 1:
        return {"weight": {0: "out", 1: "group_in"} if by_position(m) else {0: "out"}, "bias": {0: "out"}}
    return {"weight": {0: "out", 1: "in"}, "bias": {0: "out"}}


def _convT_params(m):
    # ConvTranspose weight is (in, out/groups, k...)
    if m.groups > 1:
        return {"weight": {0: "in", 1: "group_out"} if by_position(m) else {0: "in"}, "bias": {0: "out"}}
    return {"weight": {0: "in", 1: "out"}, "bias": {0: "out"}}


def _conv_resize(m, sizes):
    if m.groups > 1 and not by_position(m):  # whole groups went
        m.groups = sizes["in"] // (m.in_channels // m.groups)
    m.in_channels, m.out_channels = sizes["in"], sizes["out"]


def _fold_weight_dim(d):
    def fold(m, scale):
        if d == 1 and getattr(m, "groups", 1) > 1:  # a grouped conv's dim 1 holds one group's positions,
            scale = scale.view(m.groups, -1)[0]  # each one unit with the same position in every group
        shape = [1] * m.weight.ndim
        shape[d] = -1
        with torch.no_grad():
            m.weight.mul_(scale.to(m.weight.dtype).view(shape))
    return fold


for spatial, classes in ((1, (nn.Conv1d,)), (2, (nn.Conv2d,)), (3, (nn.Conv3d,))):
    _register(MODULE_RULES, classes, Rule(
        analyse=lambda ctx, s=spatial: _conv_analyse(ctx, s),
        params=_conv_params, resize=_conv_resize, fold_input=_fold_weight_dim(1), linear=True, layer=1))
for spatial, classes in ((1, (nn.ConvTranspose1d,)), (2, (nn.ConvTranspose2d,)), (3, (nn.ConvTranspose3d,))):
    _register(MODULE_RULES, classes, Rule(
        analyse=lambda ctx, s=spatial: _conv_analyse(ctx, s),
        params=_convT_params, resize=_conv_resize, fold_input=_fold_weight_dim(0), linear=True, layer=1))


def _linear_analyse(ctx):
    m, x = ctx.module, ctx.arg(0, "input")
    cdim = len(ctx.shape_of(x)) - 1
    ctx.space.union(along(ctx, x, cdim), ctx.axis("in", m.in_features))
    ctx.consume(0, cdim)
    return channel_layout(ctx.axis("out", m.out_features, producer=True), len(ctx.out_shape), cdim)


def _linear_resize(m, sizes):
    m.in_features, m.out_features = sizes["in"], sizes["out"]


MODULE_RULES[nn.Linear] = Rule(
    analyse=_linear_analyse,
    params=lambda m: {"weight": {0: "out", 1: "in"}, "bias": {0: "out"}},
    resize=_linear_resize, fold_input=_fold_weight_dim(1), linear=True, layer=1)


def _embedding_analyse(ctx):
    """A lookup of weight rows: the output's last dim holds the weight's columns (its channels), the
    other dims are the indices' positions. With max_norm each looked-up row is rescaled by its norm
    over all of its columns (and the weight renormalised in place), so no column can go alone."""
    m = ctx.module
    if m.max_norm is not None:
        raise Unsupported(f"{type(m).__name__} with max_norm renormalises each row over all of its channels")
    for value in ctx.tensor_args():  # indices (and EmbeddingBag's offsets, weights): values, not channels
        lay = ctx.layout_of(value)
        if isinstance(lay, Layout):
            ctx.pin(lay, "indices of an embedding")
    nd = len(ctx.out_shape)
    return channel_layout(ctx.axis("out", m.embedding_dim, producer=True), nd, nd - 1)


def _embedding_resize(m, sizes):
    m.embedding_dim = sizes["out"]


_register(MODULE_RULES, (nn.Embedding, nn.EmbeddingBag), Rule(
    analyse=_embedding_analyse, params=lambda m: {"weight": {1: "out"}}, resize=_embedding_resize))


# --------------------------------------------------------------------------- normalisation
_NORM_STATE = ("weight", "bias", "running_mean", "running_var")


def _per_channel_analyse(ctx, spatial: int | None, size: int, group: int = 1):
    """Norms and other modules with one parameter per channel on dim 1 (dim 0 if unbatched)."""
    x = ctx.arg(0, "input")
    ndim = len(ctx.shape_of(x))
    cdim = 1 if spatial is None else (ndim - spatial - 1)
    ch = ctx.axis("ch", size)
    ctx.space.union(along(ctx, x, cdim), ch)
    if group > 1 and size % group == 0:  # GroupNorm: a group's statistics need all of its channels
        ctx.space.union_rows(ch.reshape(-1, group))
    elif group > 1:
        for j in range(0, size, group):
            ctx.space.union_all(ch[j:j + group])
    return ctx.normalize(ctx.layout_of(x).ids, cdim)


def _bn_resize(m, sizes):
    m.num_features = sizes["ch"]


_bn_params = lambda m: {k: {0: "ch"} for k in _NORM_STATE}
_register(MODULE_RULES, (nn.BatchNorm1d, nn.SyncBatchNorm), Rule(
    analyse=lambda ctx: _per_channel_analyse(ctx, None, ctx.module.num_features),
    params=_bn_params, resize=_bn_resize, linear=True))
for spatial, classes in ((2, (nn.BatchNorm2d,)), (3, (nn.BatchNorm3d,)),
                         (1, (nn.InstanceNorm1d,)), (2, (nn.InstanceNorm2d,)), (3, (nn.InstanceNorm3d,))):
    _register(MODULE_RULES, classes, Rule(
        analyse=lambda ctx, s=spatial: _per_channel_analyse(ctx, s, ctx.module.num_features),
        params=_bn_params, resize=_bn_resize,
        linear=issubclass(classes[0], nn.modules.batchnorm._BatchNorm)))  # instance statistics: not affine


def _gn_resize(m, sizes):
    per_group = m.num_channels // m.num_groups
    m.num_channels, m.num_groups = sizes["ch"], sizes["ch"] // per_group


MODULE_RULES[nn.GroupNorm] = Rule(
    analyse=lambda ctx: _per_channel_analyse(
        ctx, None, ctx.module.num_channels, ctx.module.num_channels // ctx.module.num_groups),
    params=lambda m: {"weight": {0: "ch"}, "bias": {0: "ch"}}, resize=_gn_resize)


def _layer_norm_analyse(ctx):
    """LayerNorm/RMSNorm over the last dim. Over the channel dim, removing a channel would change the
    statistics every other channel is normalised by; so in the gated model the norm takes them over
    the active channels only (a "norm" site, passes/gate/modules.py): then removing a channel gives
    exactly the same network, and the norm is per-channel for its weight and bias."""
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    normalized = len(ctx.module.normalized_shape)
    if lay.dim is None or lay.dim < ndim - normalized:
        return lay  # channels on a dim it does not normalise: per-position statistics, untouched
    if normalized > 1:
        ctx.pin(lay, "LayerNorm normalises over the channel dim and other dims together")
        return lay
    ch = ctx.axis("ch", ctx.module.normalized_shape[0])
    ctx.space.union(along(ctx, x, ndim - 1), ch)
    ctx.normalise_over(0, ndim - 1)
    return ctx.normalize(lay.ids, ndim - 1)


def _layer_norm_resize(m, sizes):
    m.normalized_shape = (sizes["ch"],)


_norm_rule = Rule(analyse=_layer_norm_analyse, resize=_layer_norm_resize,
                  params=lambda m: {p: {0: "ch"} for p in ("weight", "bias") if getattr(m, p, None) is not None})
MODULE_RULES[nn.LayerNorm] = _norm_rule
MODULE_RULES[nn.RMSNorm] = _norm_rule


def _layer_norm_fn(ctx):
    """An F.layer_norm that capture could not lift into a module (its weight is computed in the graph)."""
    x, shape = ctx.arg(0, "input"), ctx.arg(1, "normalized_shape")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    if lay.dim is not None and lay.dim >= ndim - (len(shape) if isinstance(shape, (tuple, list)) else 1):
        ctx.pin(lay, "layer_norm with computed weights normalises over the channel dim")
    return lay


FUNCTION_RULES[F.layer_norm] = Rule(analyse=_layer_norm_fn)


def _prelu_analyse(ctx):
    if ctx.module.num_parameters == 1:
        return _same(ctx)
    return _per_channel_analyse(ctx, None, ctx.module.num_parameters)


def _prelu_resize(m, sizes):
    m.num_parameters = sizes["ch"]


MODULE_RULES[nn.PReLU] = Rule(analyse=_prelu_analyse, resize=_prelu_resize,
                              params=lambda m: {"weight": {0: "ch"}} if m.num_parameters > 1 else {}, nonlinear=True)


# --------------------------------------------------------------------------- elementwise
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardsigmoid, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold,
)
_DROPOUT_MODULES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    torchvision.ops.StochasticDepth,  # multiplies whole samples by one scalar: channel-separable
)
_ACTIVATION_FUNCTIONS = (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardsigmoid,
    F.hardswish, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.sigmoid, F.tanh, torch.relu,
    torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.sqrt, torch.rsqrt, torch.square,
    torch.clamp, torch.clip, torch.erf,
)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      torchvision.ops.stochastic_depth)
_ACTIVATION_METHODS = ("relu", "sigmoid", "tanh", "exp", "log", "abs", "sqrt", "rsqrt", "square", "clamp", "clip",
                       "erf")
# elementwise maths: each output element from its own input element (values, not channels, change)
_MATH_UNARY = ("sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "expm1",
               "log1p", "log2", "log10", "exp2", "reciprocal", "sign", "sgn", "floor", "ceil", "round", "trunc",
               "frac", "erfc", "erfinv", "lgamma", "digamma", "logit", "sinc", "nan_to_num", "deg2rad", "rad2deg")
_CAST_METHODS = ("contiguous", "detach", "float", "half", "bfloat16", "double", "to", "type_as")  # may return self

_activation = Rule(analyse=_same, nonlinear=True)
_dropout = Rule(analyse=_same, linear=True, alias=True, random=True)  # identity (itself) in eval
_register(MODULE_RULES, _ACTIVATION_MODULES, _activation)
MODULE_RULES[nn.Identity] = Rule(analyse=_same, linear=True, alias=True)
_register(MODULE_RULES, _DROPOUT_MODULES, _dropout)
_register(FUNCTION_RULES, _ACTIVATION_FUNCTIONS, _activation)
_register(FUNCTION_RULES, [getattr(torch, name) for name in _MATH_UNARY if hasattr(torch, name)], _activation)
_register(METHOD_RULES, _MATH_UNARY + tuple(m + "_" for m in _MATH_UNARY), _activation)
_register(FUNCTION_RULES, _DROPOUT_FUNCTIONS, _dropout)
_register(FUNCTION_RULES, (torch.neg, operator.neg, operator.pos), Rule(analyse=_same, linear=True))
_register(METHOD_RULES, _ACTIVATION_METHODS + tuple(m + "_" for m in _ACTIVATION_METHODS), _activation)
_register(METHOD_RULES, ("neg", "neg_"), Rule(analyse=_same, linear=True))
_register(METHOD_RULES, _CAST_METHODS, Rule(analyse=_same, linear=True, alias=True))
METHOD_RULES["clone"] = Rule(analyse=_same, linear=True)


def _owned(ids: np.ndarray) -> np.ndarray:
    """A C-ordered copy of an id array that keeps its dims (np.ascontiguousarray makes a 0-dim
    array, the ids of a scalar tensor, 1-dim)."""
    return np.array(ids, order="C")


def _elementwise(ctx):
    """Broadcasting binary op: positions that meet are one channel. An operand broadcast along a
    dim where another operand's channels vary (a per-sample scalar, an (N,1,H,W) map) is not
    coupled to them; its own channels are pinned, since a size-1 dim cannot shrink."""
    out_shape = ctx.out_shape
    nd = len(out_shape)
    operands = []
    for value in ctx.tensor_args():
        lay, shape = ctx.layout_of(value), ctx.shape_of(value)
        pad = nd - len(shape)
        ids = lay.ids.reshape((1,) * pad + lay.ids.shape)
        dim = None if lay.dim is None else lay.dim + pad
        full_shape = (1,) * pad + tuple(shape)
        operands.append((ids, dim, full_shape, lay))
    coupled = []
    for i, (ids, dim, shape, lay) in enumerate(operands):
        broadcast = {d for d in range(nd) if shape[d] == 1 and out_shape[d] > 1}
        others_vary = {d for j, (o, *_rest) in enumerate(operands) if j != i
                       for d in range(nd) if o.shape[d] > 1}
        if broadcast & others_vary:
            ctx.pin(lay, "broadcast across channels")
        else:
            coupled.append((ids, dim))
    if not coupled:
        ids, dim = operands[0][0], operands[0][1]
        return Layout(ids, dim)
    arrays = np.broadcast_arrays(*[ids for ids, _ in coupled])
    for other in arrays[1:]:
        ctx.space.union(arrays[0], other)
    prefer = next((d for _, d in coupled if d is not None), None)
    return ctx.normalize(_owned(arrays[0]), prefer)


_BINARY_FUNCTIONS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                     operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
                     torch.div, torch.maximum, torch.minimum, torch.pow, operator.pow)
_BINARY_METHODS = ("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "pow", "maximum", "minimum")
_register(FUNCTION_RULES, _BINARY_FUNCTIONS, Rule(analyse=_elementwise))
_register(METHOD_RULES, _BINARY_METHODS, Rule(analyse=_elementwise))


# --------------------------------------------------------------------------- pooling, reductions
def _spatial_only(ctx, spatial: int, what: str):
    """Ops that mix positions along the last `spatial` dims only (pooling, resizing)."""
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    if lay.dim is not None and lay.dim >= ndim - spatial:
        ctx.pin(lay, f"{what} mixes the channel dim")
    if len(ctx.out_shape) != ndim:
        raise Unsupported(f"{what} changed the number of dims")
    return lay


for spatial, mods, fns in (
        (1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
         (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, torch.avg_pool1d)),
        (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
             nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
         (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
          torch._C._nn.avg_pool2d)),
        (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
         (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d))):
    rule = Rule(analyse=lambda ctx, s=spatial: _spatial_only(ctx, s, "pooling"))
    for op in mods + fns:  # average pooling is an affine map; max and LP pooling are not
        average = "avg" in getattr(op, "__name__", "").lower()
        (MODULE_RULES if isinstance(op, type) else FUNCTION_RULES)[op] = replace(
            rule, linear=average, nonlinear=not average and "Upsampl" not in op.__name__)


def _interpolate(ctx):
    return _spatial_only(ctx, len(ctx.shape_of(ctx.arg(0, "input"))) - 2, "interpolation")


FUNCTION_RULES[F.interpolate] = Rule(analyse=_interpolate)


def _pad(ctx):
    """F.pad and the padding modules (ZeroPad2d, ReflectionPad2d, ...; `padding` pads the last dims
    as F.pad's `pad` does, whatever the mode): channels pass through dims it does not pad; padding
    the channel dim adds positions that belong to no channel, so those channels stay."""
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    pad = ctx.module.padding if ctx.module is not None else ctx.arg(1, "pad")
    if not isinstance(pad, (tuple, list)) or len(ctx.out_shape) != ndim:
        raise Unsupported("pad with computed pad sizes")
    for i in range(len(pad) // 2):
        d = ndim - 1 - i
        amounts = pad[2 * i:2 * i + 2]
        if (d == lay.dim or lay.ids.shape[d] > 1) and any(not isinstance(a, int) or a != 0 for a in amounts):
            raise Unsupported("pad of the channel dim")  # its channels stay; the output is new
    return lay


_PAD_RULE = Rule(analyse=_pad, linear=True)  # constant, reflected or repeated positions: affine
FUNCTION_RULES[F.pad] = _PAD_RULE
_register(MODULE_RULES, [getattr(nn, f"{kind}Pad{d}d") for kind in ("Zero", "Constant", "Reflection",
                                                                     "Replication", "Circular")
                         for d in (1, 2, 3) if hasattr(nn, f"{kind}Pad{d}d")], _PAD_RULE)


def _reduction(ctx, at: int = 1):
    """A reduction over `dim` (argument `at`, keepdim after it); over the channel dim it pins."""
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    dims = ctx.arg(at, "dim", None)
    keepdim = ctx.arg(at + 1, "keepdim", False)
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):  # none or empty: every dim
        dims = tuple(range(ndim))
    dims = {_nd(d, ndim) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if lay.dim in dims:
        ctx.pin(lay, "reduction over the channel dim")
    ids = lay.ids
    if keepdim:  # the reduced dims stay, with size 1: no channel identity along them any more
        for d in dims:
            ids = ids.take([0], axis=d)
        return Layout(ids, None if lay.dim in dims else lay.dim)
    for d in sorted(dims, reverse=True):
        ids = ids.take(0, axis=d)
    dim = None if (lay.dim is None or lay.dim in dims) else lay.dim - sum(d < lay.dim for d in dims)
    return Layout(ids, dim)


_register(FUNCTION_RULES, (torch.mean, torch.sum, torch.amax, torch.amin), Rule(analyse=_reduction))
_register(METHOD_RULES, ("mean", "sum", "amax", "amin"), Rule(analyse=_reduction))
# (input, ord, dim, keepdim): a norm over some dims is a reduction, and not linear
_register(FUNCTION_RULES, (torch.linalg.vector_norm,), Rule(analyse=lambda ctx: _reduction(ctx, 2), nonlinear=True))


def _normalize(ctx):
    """F.normalize(x, p, dim): x over its p-norm along `dim`. Over the channel dim the norm spans
    every channel, so its input is a mask site: in the gated model a removed channel is 0 there,
    adds nothing to the norm (p > 0), and the others come out as in the shrunk model."""
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    if lay.dim is not None and lay.dim == _nd(ctx.arg(2, "dim", 1), ndim):
        p = ctx.arg(1, "p", 2.0)
        if not ctx.node.args or not isinstance(p, (int, float)) or p <= 0:
            ctx.pin(lay, "normalize over the channel dim (input by keyword, or p <= 0)")
        else:
            ctx.consume(0, lay.dim)
    return lay


_register(FUNCTION_RULES, (F.normalize,), Rule(analyse=_normalize, nonlinear=True))


def _softmax(ctx):
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    if dim is None or lay.dim == _nd(dim, ndim):
        ctx.pin(lay, "softmax over the channel dim")
    return lay


_softmax_rule = Rule(analyse=_softmax, nonlinear=True)
_register(MODULE_RULES, (nn.Softmax, nn.LogSoftmax), _softmax_rule)
_register(FUNCTION_RULES, (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax), _softmax_rule)
_register(METHOD_RULES, ("softmax", "log_softmax"), _softmax_rule)


# --------------------------------------------------------------------------- layout ops
def _permute(ctx):
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    if ctx.node.target in (torch.transpose, torch.swapaxes, "transpose", "swapaxes", aten.transpose.int):
        a, b = _nd(ctx.arg(1, "dim0"), ndim), _nd(ctx.arg(2, "dim1"), ndim)
        order = list(range(ndim))
        order[a], order[b] = order[b], order[a]
    else:
        order = ctx.varargs(1, "dims")
        order = [_nd(d, ndim) for d in order]
    dim = None if lay.dim is None else order.index(lay.dim)
    return Layout(np.transpose(lay.ids, order), dim)


_register(FUNCTION_RULES, (torch.permute, torch.transpose, torch.swapaxes), Rule(analyse=_permute, linear=True, alias=True))
_register(METHOD_RULES, ("permute", "transpose", "swapaxes"), Rule(analyse=_permute, linear=True, alias=True))


def _reshape(ctx):
    """Any reshape (view, flatten, unflatten, squeeze, unsqueeze): apply it to the ids."""
    x = ctx.arg(0, "input")
    lay, in_shape, out_shape = ctx.layout_of(x), tuple(ctx.shape_of(x)), tuple(ctx.out_shape)
    ids = reshape_ids(lay.ids, in_shape, out_shape)
    return ctx.normalize(ids, _head_dim(ctx, ids))


def reshape_ids(ids: np.ndarray, in_shape: tuple, out_shape: tuple) -> np.ndarray:
    """`ids` (broadcastable to in_shape) reshaped to out_shape. The dims pair up into groups whose
    sizes multiply alike (the batch, (T, H, W) -> tokens, C -> (heads, head_dim)); a group along
    which the ids do not vary stays size 1 (it carries no channel identity), the others are
    materialised and reshaped. A video transformer's 25k tokens so never become 25k copies of
    every channel id."""
    groups = _dim_groups(in_shape, out_shape)
    if groups is None:  # sizes that do not pair up (a 0-size dim): all of it
        return np.broadcast_to(ids, in_shape).reshape(out_shape)
    source, target = list(ids.shape), []
    for ins, outs in groups:
        if all(ids.shape[d] == 1 for d in ins):
            target += [1] * len(outs)
        else:
            for d in ins:
                source[d] = in_shape[d]
            target += [out_shape[d] for d in outs]
    return np.broadcast_to(ids, source).reshape(target)


def _dim_groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """The shortest runs of dims of `a` and `b` with equal products, in order (size-1 dims join the
    run before them, or the first); None where a size is 0."""
    if 0 in a or 0 in b:
        return None
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ins.append(i)
                pa *= a[i]
                i += 1
            else:
                outs.append(j)
                pb *= b[j]
                j += 1
        groups.append((ins, outs))
    rest_a, rest_b = list(range(i, len(a))), list(range(j, len(b)))  # trailing size-1 dims
    if groups:
        groups[-1] = (groups[-1][0] + rest_a, groups[-1][1] + rest_b)
    elif rest_a or rest_b:
        groups = [(rest_a, rest_b)]
    return groups


_ATTENTION_OPS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", F.scaled_dot_product_attention,
                  torch.einsum, torch.functional.einsum, aten.einsum.default,
                  aten.matmul.default, aten.bmm.default, aten.scaled_dot_product_attention.default}


def _head_dim(ctx, ids) -> int | None:
    """A reshape that splits the channel dim into (..., heads, head_size) for attention keeps the heads
    as the units (each head goes whole); any other split keeps the innermost dim (finest units).
    Only granularity depends on this choice: normalize couples the other dims, so either is exact."""
    if sum(size > 1 for size in ids.shape) < 2:  # the common case (flatten, view to one channel dim)
        return None
    roots = ctx.space.roots(ids)
    varying = [d for d in range(ids.ndim) if ids.shape[d] > 1 and not (roots == roots.take([0], axis=d)).all()]
    if len(varying) < 2:
        return None
    frontier, seen = [ctx.node], set()
    for _ in range(8):  # q.permute(...).unbind(0) -> [q_norm] -> q * scale -> q @ k.T: a few hops
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
        if any(u.target in _ATTENTION_OPS for u in frontier if u.op in ("call_function", "call_method")):
            return varying[-2]
        frontier = [u for u in frontier if u.op != "output"]
    return None


def _rewrite_sizes(ctx):
    """view/reshape/expand: the size arguments, literal or computed, made consistent with the new shape."""
    expand = ctx.node.target in ("expand", aten.expand.default)
    sizes = ctx.varargs(1, "size" if expand else "shape")
    old, new = ctx.old_out_shape, ctx.new_out_shape
    if len(sizes) == 1 and isinstance(sizes[0], fx.Node) and len(old) != 1:
        if old == tuple(new) and not ctx.size_change(sizes[0])[0]:
            return
        sizes = ctx.unpack_sizes(sizes[0], len(old))  # x.view(y.shape): one entry per dim
        if sizes is None:
            return
    if len(sizes) != len(old):
        return
    keep_dim = None
    if expand:  # -1 keeps the input's size; usable where the input is not broadcast along that dim
        in_new = ctx.new_shape_of(ctx.arg(0))
        pad = len(new) - len(in_new)
        keep_dim = [i >= pad and in_new[i - pad] == new[i] for i in range(len(new))]
    fixed = ctx.consistent_sizes(sizes, old, new, keep_dim)
    if fixed != sizes:
        ctx.set_varargs(1, fixed)


_reshape_rule = Rule(analyse=_reshape, rewrite=_rewrite_sizes, linear=True, alias=True)
_register(METHOD_RULES, ("view", "reshape"), _reshape_rule)
FUNCTION_RULES[torch.reshape] = _reshape_rule
_plain_reshape = Rule(analyse=_reshape, linear=True, alias=True)
_register(FUNCTION_RULES, (torch.flatten, torch.squeeze, torch.unsqueeze), _plain_reshape)
_register(METHOD_RULES, ("flatten", "squeeze", "unsqueeze"), _plain_reshape)
MODULE_RULES[nn.Flatten] = _plain_reshape


def _unflatten_rewrite(ctx):
    dim = _nd(ctx.arg(1, "dim"), len(ctx.old_in_shape))
    sizes = list(ctx.arg(2, "sizes"))
    new = ctx.new_out_shape[dim:dim + len(sizes)]
    old = ctx.old_out_shape[dim:dim + len(sizes)]
    fixed = ctx.consistent_sizes(sizes, old, new)
    if fixed != sizes:
        ctx.set_arg(2, "sizes", tuple(fixed))


_register(METHOD_RULES, ("unflatten",), Rule(analyse=_reshape, rewrite=_unflatten_rewrite, linear=True, alias=True))
FUNCTION_RULES[torch.unflatten] = Rule(analyse=_reshape, rewrite=_unflatten_rewrite, linear=True, alias=True)


def _expand(ctx):
    x = ctx.arg(0, "input")
    lay = ctx.layout_of(x)
    pad = len(ctx.out_shape) - lay.ids.ndim
    in_shape = ctx.shape_of(x)
    if lay.dim is not None and in_shape[lay.dim] == 1 and ctx.out_shape[lay.dim + pad] > 1:
        ctx.pin(lay, "expand across the channel dim")
    ids = lay.ids.reshape((1,) * pad + lay.ids.shape)
    if lay.dim is None:  # a parameter (a class token): its channels are where its ids vary
        return ctx.normalize(ids, None)
    return Layout(ids, lay.dim + pad)


METHOD_RULES["expand"] = Rule(analyse=_expand, rewrite=_rewrite_sizes, linear=True, alias=True)
METHOD_RULES["expand_as"] = Rule(analyse=lambda ctx: _elementwise(ctx), linear=True, alias=True)  # takes the other's size: couples with it


def _sequence(ctx, tensors) -> list[tuple[Layout, tuple]]:
    """(layout, shape) of each tensor cat/stack joins: a list of nodes, or one node whose value is a
    tuple of tensors (`torch.cat(x.chunk(4, 1)[::-1], 1)`)."""
    if isinstance(tensors, fx.Node):
        lays, metas = ctx.layout_of(tensors), tensors.meta.get("tensor_meta")
        if not (isinstance(lays, tuple) and isinstance(metas, (tuple, list)) and len(lays) == len(metas)
                and all(isinstance(lay, Layout) for lay in lays)):
            raise Unsupported("a sequence of tensors made in the graph whose channels are not known")
        return [(lay, tuple(m.shape)) for lay, m in zip(lays, metas)]
    return [(ctx.layout_of(t), ctx.shape_of(t)) for t in tensors]


def _cat(ctx):
    parts = _sequence(ctx, ctx.arg(0, "tensors"))
    ndim = len(ctx.out_shape)
    dim = _nd(ctx.arg(1, "dim", 0), ndim)
    prefer = next((lay.dim for lay, _ in parts if lay.dim is not None), None)
    parts = [ctx.space.materialize(lay, shape, dims=[dim]) for lay, shape in parts]
    target = [max(p.shape[d] for p in parts) for d in range(ndim)]
    parts = [np.broadcast_to(p, target[:dim] + [p.shape[dim]] + target[dim + 1:]) for p in parts]
    return ctx.normalize(np.concatenate(parts, axis=dim), prefer)


_register(FUNCTION_RULES, (torch.cat, torch.concat, torch.concatenate), Rule(analyse=_cat))


def _stack(ctx):
    """stack: the inputs side by side along a new dim; where they meet they are one channel."""
    layouts = [lay for lay, _ in _sequence(ctx, ctx.arg(0, "tensors"))]
    ndim = len(ctx.out_shape)
    dim = _nd(ctx.arg(1, "dim", 0), ndim)
    parts = [np.expand_dims(lay.ids, dim) for lay in layouts]
    arrays = np.broadcast_arrays(*parts)
    for other in arrays[1:]:  # a stack then a sum (split attention) must take the same channels
        ctx.space.union(arrays[0], other)
    prefer = next((lay.dim for lay in layouts if lay.dim is not None), None)
    return ctx.normalize(_owned(arrays[0]), None if prefer is None else prefer + (prefer >= dim))


_register(FUNCTION_RULES, (torch.stack,), Rule(analyse=_stack))


def _split(ctx):
    x = ctx.arg(0, "input")
    ndim = len(ctx.shape_of(x))
    dim = _nd(ctx.arg(2, "dim", 0), ndim)
    sizes = [s[dim] for s in ctx.out_shapes]
    ids = ctx.space.materialize(ctx.layout_of(x), ctx.shape_of(x), dims=[dim])
    pieces = np.split(ids, np.cumsum(sizes)[:-1], axis=dim)
    return tuple(ctx.normalize(p, ctx.layout_of(x).dim) for p in pieces)


def _split_rewrite(ctx):
    """split/chunk along the channel dim: explicit new sizes (chunk's equal split may no longer hold)."""
    dim = _nd(ctx.arg(2, "dim", 0), len(ctx.old_in_shape))
    new_sizes = [s[dim] for s in ctx.new_out_shapes]
    old_sizes = [s[dim] for s in ctx.old_out_shapes]
    if new_sizes != old_sizes:
        ctx.replace_call(torch.split, (ctx.arg(0, "input"), new_sizes, dim))


_split_rule = Rule(analyse=_split, rewrite=_split_rewrite, alias=True)
_register(FUNCTION_RULES, (torch.split, torch.chunk, torch.tensor_split), _split_rule)  # (pieces from the shapes)
_register(METHOD_RULES, ("split", "chunk", "tensor_split"), _split_rule)


def _index_dims(index, ndim):
    """For a basic index tuple: list of (input dim or None, output dim or None, entry)."""
    index = list(index)
    if any(e is Ellipsis for e in index):
        i = index.index(Ellipsis)
        used = sum(1 for e in index if e is not None and e is not Ellipsis)
        index[i:i + 1] = [slice(None)] * (ndim - used)
    index += [slice(None)] * (ndim - sum(1 for e in index if e is not None))
    out, din, dout = [], 0, 0
    for e in index:
        if e is None:
            out.append((None, dout, e)); dout += 1
        elif isinstance(e, int):
            out.append((din, None, e)); din += 1
        elif isinstance(e, slice):
            out.append((din, dout, e)); din += 1; dout += 1
        else:
            raise Unsupported("indexing with tensors or lists")
    return out, index


def _getitem(ctx):
    src, index = ctx.arg(0), ctx.arg(1)
    lay = ctx.layout_of(src)
    if isinstance(lay, tuple):  # an output of split/chunk
        return lay[index]
    if not ctx.is_tensor(src):
        return None
    gathered = _tensor_index(ctx, index)
    if gathered is not None:  # table[idx], table[:, idx]: positions gathered by a tensor along one dim
        return _gather_rows(ctx, table=src, index=gathered[1], dim=gathered[0])
    shape = ctx.shape_of(src)
    index = index if isinstance(index, tuple) else (index,)
    mapping, full_index = _index_dims(index, len(shape))

    def carries(d):  # does dim d of the source hold channel identity?
        return d == lay.dim or lay.ids.shape[d] > 1

    def static(e):
        return not isinstance(e, slice) or all(isinstance(v, (int, type(None))) for v in (e.start, e.stop, e.step))

    if any(din is not None and carries(din) and not static(e) for din, _, e in mapping):
        raise Unsupported("slice bounds computed at run time")
    # Dims without channel identity (size-1 ids) are indexed as a whole: their bounds may be runtime
    # values (x[:, :, :h]) and the ids stay size 1 along them.
    id_index = [e if (din is None or carries(din)) else (0 if isinstance(e, int) else slice(None))
                for din, _, e in mapping]
    touched = [din for din, _, e in mapping if din is not None and e != slice(None) and carries(din)]
    ids = ctx.space.materialize(lay, shape, dims=touched)
    new_dim = None
    for din, dout, e in mapping:
        if din is not None and din == lay.dim:
            if isinstance(e, int):
                ctx.pin(Layout(ids.take([e], axis=din), None), "a single channel is selected by index")
            elif e.step not in (None, 1):
                ctx.pin(lay, "strided slice of the channel dim")
            else:
                new_dim = dout
    return ctx.normalize(ids[tuple(id_index)], new_dim)


def _getitem_rewrite(ctx):
    """A slice or index along the channel dim selects from the kept positions only."""
    src, index = ctx.arg(0), ctx.arg(1)
    keep = ctx.keep_of(src)
    if keep is None or not ctx.is_tensor(src) or _tensor_index(ctx, index) is not None:
        return  # rows gathered by a tensor index: the channels on the other dims were sliced at the source
    dim = ctx.axis_dim_of(src)
    single = not isinstance(index, tuple)
    mapping, full_index = _index_dims(index if not single else (index,), len(ctx.old_in_shape))
    for pos, (din, _, e) in enumerate(mapping):
        if din != dim:
            continue
        rank = {int(p): r for r, p in enumerate(keep)}
        if isinstance(e, int):
            full_index[pos] = rank[e % ctx.old_in_shape[dim]]
        else:
            chosen = [p for p in range(*e.indices(ctx.old_in_shape[dim])) if p in rank]
            full_index[pos] = slice(rank[chosen[0]], rank[chosen[-1]] + 1) if chosen else slice(0, 0)
        ctx.set_arg(1, "index", tuple(full_index))


FUNCTION_RULES[operator.getitem] = Rule(analyse=_getitem, rewrite=_getitem_rewrite, alias=True)


# --------------------------------------------------------------------------- metadata only
def _sizes_or_values(ctx):
    """A comparison or integer op: on sizes, metadata; on tensors, elementwise (the mask `y > 0`
    keeps y's channels where they are)."""
    return _elementwise(ctx) if ctx.out_is_tensor else _metadata(ctx)


_register(FUNCTION_RULES, (getattr, torch._assert, len, torch.numel, torch._C._get_tracing_state),
          Rule(analyse=_metadata))
_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
_register(FUNCTION_RULES, tuple(getattr(operator, op) for op in _COMPARISONS) + (operator.floordiv, operator.mod),
          Rule(analyse=_sizes_or_values))
_VALUE_OPS = _COMPARISONS + ("logical_and", "logical_or", "logical_xor", "remainder", "fmod", "floor_divide")
_VALUE_OP, _NOT = Rule(analyse=_elementwise), Rule(analyse=_same)
_register(FUNCTION_RULES, tuple(getattr(torch, op) for op in _VALUE_OPS), _VALUE_OP)
_register(METHOD_RULES, _VALUE_OPS, _VALUE_OP)
FUNCTION_RULES[torch.logical_not] = METHOD_RULES["logical_not"] = _NOT
# bitwise ops: on masks (`valid & ~padded`), elementwise; on Python ints, sizes
_register(FUNCTION_RULES, (operator.and_, operator.or_, operator.xor, operator.invert), Rule(analyse=_sizes_or_values))
_BITWISE = ("bitwise_and", "bitwise_or", "bitwise_xor")
_register(FUNCTION_RULES, tuple(getattr(torch, op) for op in _BITWISE), _VALUE_OP)
_register(METHOD_RULES, _BITWISE + ("__and__", "__or__", "__xor__"), _VALUE_OP)
FUNCTION_RULES[torch.bitwise_not] = METHOD_RULES["bitwise_not"] = _NOT


def _where(ctx):
    """where(condition, a, b): elementwise over its three operands."""
    if len(ctx.node.args) + len(ctx.node.kwargs) != 3:
        raise Unsupported("torch.where(condition), the indices of its true entries")
    return _elementwise(ctx)


FUNCTION_RULES[torch.where] = METHOD_RULES["where"] = Rule(analyse=_where)
_register(METHOD_RULES, ("size", "dim", "numel", "ndimension", "nelement", "get_device"), Rule(analyse=_metadata))
METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


# --------------------------------------------------------------------------- facts without a channel rule
# The walker pins what reaches these (as for unknown ops); their facts are still known.
MODULE_RULES[nn.MultiheadAttention] = Rule(analyse=None, nonlinear=True, layer=2)  # in and out projections
MODULE_RULES[nn.Unflatten] = Rule(analyse=None, linear=True, alias=True)
_register(METHOD_RULES, ("narrow", "t", "as_strided", "movedim",
                         "moveaxis", "select", "diagonal", "unfold", "real", "imag", "view_as_real", "type", "cpu",
                         "cuda", "split_with_sizes", "tensor_split", "hsplit", "vsplit", "T", "mT"),
          Rule(analyse=None, alias=True))
_register(FUNCTION_RULES, (torch.narrow, torch.movedim, torch.moveaxis, torch.select, torch.detach,
                           torch.t, torch.as_strided, torch.diagonal, torch.tensor_split), Rule(analyse=None, alias=True))
_register(FUNCTION_RULES, (F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout, torch.feature_dropout),
          Rule(analyse=None, linear=True, alias=True, random=True))


# --------------------------------------------------------------------------- attention
def _attention_heads(ctx):
    """attention_heads(q, k, v, head_dim, attn_mask, key_padding_mask, ...) and the AttentionHeads
    layer (q, k, v, attn_mask, key_padding_mask): each head (its q, k and v channels, and the output
    channels it writes) is one unit; heads never mix, so removing one removes only its own slices.
    The masks (L, S) and (N, S) are read whole: whatever channels they carry stay."""
    q, k, v = (ctx.arg(i, n) for i, n in enumerate(("q", "k", "v")))
    layer = ctx.module
    head_dim = layer.head_dim if layer is not None else ctx.arg(3, "head_dim")
    if not isinstance(head_dim, int):
        raise Unsupported("attention head size computed at run time")
    first_mask = 3 if layer is not None else 4
    for i, name in enumerate(("attn_mask", "key_padding_mask"), start=first_mask):
        mask = ctx.arg(i, name)
        if isinstance(mask, fx.Node) and ctx.is_tensor(mask):
            ctx.pin(ctx.layout_of(mask), f"an attention {name} is read whole")
    cdim = len(ctx.shape_of(q)) - 1
    ids = [along(ctx, t, cdim) for t in (q, k, v)]
    if len({len(i) for i in ids}) != 1 or len(ids[0]) % head_dim:
        raise Unsupported("q, k and v of different widths")
    for h in range(0, len(ids[0]), head_dim):
        ctx.space.union_all(np.concatenate([i[h:h + head_dim] for i in ids]))
    return channel_layout(ids[2], len(ctx.out_shape), cdim)


FUNCTION_RULES[attention_heads] = Rule(analyse=_attention_heads, nonlinear=True)
MODULE_RULES[AttentionHeads] = Rule(analyse=_attention_heads, nonlinear=True, random=True)


def _padded(ctx, value, nd):
    lay = ctx.layout_of(value)
    return lay.ids.reshape((1,) * (nd - lay.ids.ndim) + lay.ids.shape)


def _varies(ids, d) -> bool:
    return ids.shape[d] > 1


def _matmul(ctx):
    """a @ b over (..., n, k) x (..., k, m): batch dims broadcast (the heads of attention scores are
    one channel with their q and k), rows come from a and columns from b. A contraction over channels
    (x @ W with channels along k) mixes them: pinned, as the table has no mask site for it."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other")
    if not (ctx.is_tensor(a) and ctx.is_tensor(b)) or min(len(ctx.shape_of(a)), len(ctx.shape_of(b))) < 2:
        raise Unsupported("matmul with a vector")
    nd = len(ctx.out_shape)
    A, B = _padded(ctx, a, nd), _padded(ctx, b, nd)
    if _varies(A, nd - 1) or _varies(B, nd - 2):
        raise Unsupported("matmul contracts over a channel dim")
    if _varies(A, nd - 2) and _varies(B, nd - 1):
        raise Unsupported("matmul with channels on both rows and columns")
    batch_a, batch_b = A[..., :1, :1], B[..., :1, :1]
    ctx.space.union(*np.broadcast_arrays(batch_a, batch_b))
    out = A[..., :, :1] if _varies(A, nd - 2) else B[..., :1, :] if _varies(B, nd - 1) else batch_a
    return ctx.normalize(_owned(np.broadcast_to(
        out, np.broadcast_shapes(batch_a.shape[:-2] + out.shape[-2:], batch_b.shape[:-2] + out.shape[-2:]))), None)


_matmul_rule = Rule(analyse=_matmul)
_register(FUNCTION_RULES, (operator.matmul, torch.matmul, torch.bmm), _matmul_rule)
_register(METHOD_RULES, ("matmul", "bmm"), _matmul_rule)


def _sdpa(ctx):
    """scaled_dot_product_attention(q, k, v, attn_mask): q, k, v (and a per-head mask) share their
    batch dims (heads); v's last dim passes to the output. The contraction over q and k's last dim
    and the weighting over tokens must not carry channels."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    mask = ctx.arg(3, "attn_mask")
    nd = len(ctx.out_shape)
    Q, K, V = (_padded(ctx, t, nd) for t in (q, k, v))
    M = _padded(ctx, mask, nd) if isinstance(mask, fx.Node) and ctx.is_tensor(mask) else None
    if any(_varies(t, d) for t, dims in ((Q, (nd - 1, nd - 2)), (K, (nd - 1, nd - 2)), (V, (nd - 2,)))
           for d in dims) or (M is not None and (_varies(M, nd - 1) or _varies(M, nd - 2))):
        raise Unsupported("attention over a channel dim")
    batches = [t[..., :1, :1] for t in (Q, K, V) + ((M,) if M is not None else ())]
    arrays = np.broadcast_arrays(*batches)
    for other in arrays[1:]:
        ctx.space.union(arrays[0], other)
    out = np.broadcast_to(V[..., :1, :], arrays[0].shape[:-1] + V.shape[-1:])
    return ctx.normalize(_owned(out), None)


_register(FUNCTION_RULES, (F.scaled_dot_product_attention,), Rule(analyse=_sdpa, nonlinear=True))


def _einsum(ctx):
    """einsum("bhid,bhjd->bhij", q, k): a letter kept in the output is a dim the operands share
    (broadcast, coupled where they meet); a contracted letter must not carry channels (it would mix
    them), like matmul's k."""
    equation, operands = ctx.arg(0, "equation"), ctx.node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = operands[0]
    if not isinstance(equation, str) or "->" not in equation or "." in equation:
        raise Unsupported("einsum without an explicit output or with an ellipsis")
    inputs, out = equation.replace(" ", "").split("->")
    inputs = inputs.split(",")
    if len(inputs) != len(operands) or not all(isinstance(t, fx.Node) and ctx.is_tensor(t) for t in operands):
        raise Unsupported("einsum over non-tensor operands")
    letters = out + "".join(sorted({c for term in inputs for c in term} - set(out)))
    arrays = []
    for term, t in zip(inputs, operands):
        ids = ctx.layout_of(t).ids
        if len(term) != ids.ndim or len(set(term)) != len(term):
            raise Unsupported("einsum with a repeated index")
        if any(ids.shape[i] > 1 for i, c in enumerate(term) if c not in out):
            raise Unsupported("einsum contracts over a channel dim")
        # dims in `letters` order, size 1 where the operand has no such letter
        arrays.append(np.transpose(ids.reshape(ids.shape + (1,) * (len(letters) - len(term))),
                                   [term.index(c) if c in term else len(term) + sum(1 for d in letters[:k] if d not in term)
                                    for k, c in enumerate(letters)]))
    arrays = np.broadcast_arrays(*arrays)
    for other in arrays[1:]:
        ctx.space.union(arrays[0], other)
    ids = arrays[0]
    for _ in range(len(letters) - len(out)):  # the contracted letters: no channels there
        ids = ids.take(0, axis=-1)
    return ctx.normalize(_owned(ids), None)


_register(FUNCTION_RULES, (torch.einsum, torch.functional.einsum), Rule(analyse=_einsum))


def _unbind(ctx):
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    dim = _nd(ctx.arg(1, "dim", 0), ndim)
    if lay.dim == dim:
        ctx.pin(lay, "unbind along the channel dim")
    ids = ctx.space.materialize(lay, ctx.shape_of(x), dims=[dim])
    return tuple(ctx.normalize(ids.take(i, axis=dim), None) for i in range(ids.shape[dim]))


_register(FUNCTION_RULES, (torch.unbind,), Rule(analyse=_unbind, alias=True))
METHOD_RULES["unbind"] = Rule(analyse=_unbind, alias=True)


def _roll(ctx):
    """roll shifts positions along its dims: channels pass through unless it rolls the channel dim."""
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    dims = ctx.arg(2, "dims", None)
    dims = range(ndim) if dims is None or dims == [] else (dims if isinstance(dims, (tuple, list)) else (dims,))
    if any(lay.ids.shape[_nd(d, ndim)] > 1 for d in dims):
        raise Unsupported("roll along the channel dim")
    return lay


_register(FUNCTION_RULES, (torch.roll,), Rule(analyse=_roll, linear=True))


def _flip(ctx):
    """flip reverses positions along its dims: along the channel dim the ids are reversed with them
    (the kept channels, reversed, are what a smaller flip gives)."""
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    fixed = {torch.fliplr: [1], torch.flipud: [0]}
    dims = fixed[ctx.node.target] if ctx.node.target in fixed else ctx.varargs(1, "dims")
    ids = lay.ids
    for d in {_nd(d, ndim) for d in dims}:
        if ids.shape[d] > 1:
            ids = np.flip(ids, d)
    return Layout(_owned(ids), lay.dim)


_FLIP = Rule(analyse=_flip, linear=True)
_register(FUNCTION_RULES, (torch.flip, torch.fliplr, torch.flipud), _FLIP)


def _repeat(ctx):
    """repeat/tile copy the tensor along dims: along the channel dim each copy holds the same channels
    (the ids are tiled with them; the counts stay right after shrinking)."""
    x = ctx.arg(0, "input")
    lay = ctx.layout_of(x)
    reps = list(ctx.varargs(1, "dims" if ctx.node.target in (torch.tile, "tile") else "repeats"))
    if not all(isinstance(r, int) for r in reps):
        raise Unsupported("repeat counts computed at run time")
    nd = max(len(reps), lay.ids.ndim)
    reps = [1] * (nd - len(reps)) + reps  # tile pads the counts in front, repeat the tensor's dims
    ids = lay.ids.reshape((1,) * (nd - lay.ids.ndim) + lay.ids.shape)
    ids = np.tile(ids, [r if ids.shape[d] > 1 else 1 for d, r in enumerate(reps)])
    return Layout(_owned(ids), None if lay.dim is None else lay.dim + nd - lay.ids.ndim)


_REPEAT = Rule(analyse=_repeat, linear=True)
_register(FUNCTION_RULES, (torch.tile,), _REPEAT)
_register(METHOD_RULES, ("repeat", "tile"), _REPEAT)


def _cumulative(ctx):
    """cumsum/cumprod/logcumsumexp run along one dim: per channel, unless that dim is the channels'."""
    x = ctx.arg(0, "input")
    lay, ndim = ctx.layout_of(x), len(ctx.shape_of(x))
    if lay.ids.shape[_nd(ctx.arg(1, "dim"), ndim)] > 1:
        raise Unsupported(f"{getattr(ctx.node.target, '__name__', ctx.node.target)} along the channel dim")
    return lay


_CUMSUM, _CUMULATIVE = Rule(analyse=_cumulative, linear=True), Rule(analyse=_cumulative, nonlinear=True)
_register(FUNCTION_RULES, (torch.cumsum,), _CUMSUM)
_register(FUNCTION_RULES, (torch.cumprod, torch.logcumsumexp), _CUMULATIVE)
METHOD_RULES["cumsum"] = _CUMSUM
_register(METHOD_RULES, ("cumprod", "logcumsumexp"), _CUMULATIVE)


def _glu(ctx):
    """glu(x, dim) = a * sigmoid(b), a and b the halves of x along dim: along the channels, channel i
    of a and channel i of b make output channel i, one unit (the halves stay halves)."""
    x = ctx.arg(0, "input")
    lay, shape = ctx.layout_of(x), ctx.shape_of(x)
    d = _nd(ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim", -1), len(shape))
    a, b = np.split(ctx.space.materialize(lay, shape, dims=[d]), 2, axis=d)
    ctx.space.union(a, b)
    return ctx.normalize(_owned(a), lay.dim)


def _channel_shuffle(ctx):
    """channel_shuffle(x, g): output channel j*g + i is input channel i*n + j (n = C/g). Position j of
    every group is one unit, so that the groups stay equal as channels go."""
    x = ctx.arg(0, "input")
    g = ctx.module.groups if ctx.module is not None else ctx.arg(1, "groups")
    if not isinstance(g, int):
        raise Unsupported("a channel shuffle whose group count is computed at run time")
    by_group = along(ctx, x, 1).reshape(g, -1)
    ctx.space.union_rows(by_group.T)
    return channel_layout(by_group.T.reshape(-1).copy(), len(ctx.out_shape), 1)


_GLU, _SHUFFLE = Rule(analyse=_glu, nonlinear=True), Rule(analyse=_channel_shuffle, linear=True)
_register(MODULE_RULES, (nn.GLU,), _GLU)
_register(FUNCTION_RULES, (F.glu,), _GLU)
_register(MODULE_RULES, (nn.ChannelShuffle,), _SHUFFLE)
_register(FUNCTION_RULES, (torch.channel_shuffle, torch.native_channel_shuffle), _SHUFFLE)
_register(FUNCTION_RULES, (torch.addcmul, torch.addcdiv), Rule(analyse=lambda ctx: _elementwise(ctx)))
_register(METHOD_RULES, ("addcmul", "addcdiv"), Rule(analyse=lambda ctx: _elementwise(ctx)))


def _reshape_as(ctx):
    """x.reshape_as(y) / x.view_as(y): a reshape to y's shape, which it keeps after shrinking: so its
    channels are y's where they meet (coupled like an elementwise op)."""
    lay = _reshape(ctx)
    other = ctx.layout_of(ctx.arg(1, "other"))
    if other is None:
        return lay
    a, b = np.broadcast_arrays(lay.ids, other.ids.reshape((1,) * (lay.ids.ndim - other.ids.ndim) + other.ids.shape))
    ctx.space.union(a, b)
    return ctx.normalize(_owned(a), other.dim if other.dim is not None else lay.dim)


_register(METHOD_RULES, ("reshape_as", "view_as"), Rule(analyse=_reshape_as, linear=True, alias=True))
METHOD_RULES["roll"] = Rule(analyse=_roll, linear=True)
METHOD_RULES["flip"] = _FLIP


def _created_like(ctx):
    """new_zeros(size), ...: a new tensor of a given size; only its input's dtype and device are read."""
    return ctx.space.background(len(ctx.out_shape), "created from sizes or constants")


# zeros_like(x), x.fill_(v): constants in x's shape. Position i stands where x's channel i stands, so
# removing that channel removes it (its shape follows x's at run time) and nothing else changes.
_SHAPED_LIKE = Rule(analyse=_same)
_register(FUNCTION_RULES, (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like), _SHAPED_LIKE)
_register(METHOD_RULES, ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"), Rule(analyse=_created_like))


def _tensor_index(ctx, index):
    """(dim, index tensor) for an index that is one tensor, alone or among full slices; else None."""
    entries = index if isinstance(index, tuple) else (index,)
    tensors = [i for i, e in enumerate(entries) if isinstance(e, fx.Node) and ctx.is_tensor(e)]
    if len(tensors) != 1 or any(e != slice(None) for i, e in enumerate(entries) if i != tensors[0]):
        return None
    return tensors[0], entries[tensors[0]]


def _gather_rows(ctx, table=None, index=None, dim=0):
    """table[index] with one index tensor on dim 0 (a relative position bias table, an embedding):
    every gathered row holds the same channels, so the rows are coupled; the channels stay on the
    table's other dims (its heads)."""
    if table is None:  # aten.index.Tensor(table, [None, ..., index]): one index tensor, on dim `dim`
        table, indices = ctx.arg(0, "input"), ctx.arg(1, "indices")
        given = [i for i, e in enumerate(indices or ()) if e is not None]
        if len(given) != 1 or not isinstance(indices[given[0]], fx.Node):
            raise Unsupported("indexing with several index tensors")
        dim, index = given[0], indices[given[0]]
    lay = ctx.layout_of(table)
    if lay.dim == dim or (ctx.layout_of(index) is not None and ctx.layout_of(index).dim is not None):
        raise Unsupported("indexing that selects channels")
    ids = np.moveaxis(ctx.space.materialize(lay, ctx.shape_of(table), dims=[dim]), dim, 0)
    for i in range(1, ids.shape[0]):
        ctx.space.union(ids[0], ids[i])
    ids = np.moveaxis(ids[:1], 0, dim)
    shape = ids.shape[:dim] + (1,) * len(ctx.shape_of(index)) + ids.shape[dim + 1:]
    return ctx.normalize(ids.reshape(shape), None)


# --------------------------------------------------------------------------- recurrent layers
def _rnn_analyse(ctx):
    """nn.RNN/LSTM/GRU read their input's features through the first layer's input weights (both
    directions): those are its in channels. Its hidden units feed back into themselves, where a gate
    on the output would not reach, so its outputs (and initial states) are channels that stay."""
    m, x = ctx.module, ctx.arg(0, "input")
    if not ctx.is_tensor(x):
        raise Unsupported(f"{type(m).__name__} on a PackedSequence")
    cdim = len(ctx.shape_of(x)) - 1
    ctx.space.union(along(ctx, x, cdim), ctx.axis("in", m.input_size))
    ctx.consume(0, cdim)
    for value in ctx.node.all_input_nodes:
        lay = ctx.layout_of(value) if value is not x else None
        for one in (lay if isinstance(lay, tuple) else (lay,)):
            if isinstance(one, Layout):
                ctx.pin(one, "initial state of a recurrent layer")
    return ctx.w.fresh_output(ctx.node.meta.get("tensor_meta"), "output of a recurrent layer")


def _rnn_input_weights(m) -> list[str]:
    return ["weight_ih_l0"] + (["weight_ih_l0_reverse"] if m.bidirectional else [])


def _rnn_fold_input(m, scale):
    with torch.no_grad():
        for name in _rnn_input_weights(m):
            w = getattr(m, name)
            w.mul_(scale.to(w.dtype).view(1, -1))


def _rnn_resize(m, sizes):
    m.input_size = sizes["in"]


_register(MODULE_RULES, (nn.RNN, nn.LSTM, nn.GRU), Rule(
    analyse=_rnn_analyse, params=lambda m: {name: {1: "in"} for name in _rnn_input_weights(m)},
    resize=_rnn_resize, fold_input=_rnn_fold_input, nonlinear=True, layer=1))


# --------------------------------------------------------------------------- pixel shuffle
def _shuffle_factor(ctx) -> int:
    m = ctx.module
    if isinstance(m, nn.PixelShuffle):
        r = m.upscale_factor
    elif isinstance(m, nn.PixelUnshuffle):
        r = m.downscale_factor
    else:  # pixel_shuffle(x, upscale_factor) / pixel_unshuffle(x, downscale_factor)
        r = ctx.arg(1, "upscale_factor", ctx.node.kwargs.get("downscale_factor"))
    if not isinstance(r, int):
        raise Unsupported("a pixel shuffle whose factor is computed at run time")
    return r


def _pixel_shuffle(ctx):
    """(*, C*r*r, H, W) -> (*, C, H*r, W*r): the r*r input channels of output channel c become its
    pixels, so they go together: one unit, and output channel c is that unit."""
    x = ctx.arg(0, "input")
    r, cdim = _shuffle_factor(ctx), len(ctx.shape_of(x)) - 3
    blocks = along(ctx, x, cdim).reshape(-1, r * r)
    ctx.space.union_rows(blocks)
    return channel_layout(blocks[:, 0].copy(), len(ctx.out_shape), cdim)


def _pixel_unshuffle(ctx):
    """(*, C, H*r, W*r) -> (*, C*r*r, H, W): input channel c becomes output channels c*r*r ..
    c*r*r + r*r - 1, all of its unit."""
    x = ctx.arg(0, "input")
    r, cdim = _shuffle_factor(ctx), len(ctx.shape_of(x)) - 3
    return channel_layout(np.repeat(along(ctx, x, cdim), r * r), len(ctx.out_shape), cdim)


_PIXEL_SHUFFLE, _PIXEL_UNSHUFFLE = Rule(analyse=_pixel_shuffle, linear=True), Rule(analyse=_pixel_unshuffle, linear=True)
_register(MODULE_RULES, (nn.PixelShuffle,), _PIXEL_SHUFFLE)
_register(MODULE_RULES, (nn.PixelUnshuffle,), _PIXEL_UNSHUFFLE)
_register(FUNCTION_RULES, (torch.pixel_shuffle, aten.pixel_shuffle.default), _PIXEL_SHUFFLE)  # (F's is torch's)
_register(FUNCTION_RULES, (torch.pixel_unshuffle, aten.pixel_unshuffle.default), _PIXEL_UNSHUFFLE)


# --------------------------------------------------------------------------- ATen overloads
# A torch.export graph (passes/capture/export.py) calls ATen overloads. Their layers are lifted into
# modules (passes/capture/lift.py) and slices become getitem; every other op below takes its
# arguments in the order of the torch function it stands for, so it shares that function's rule.
def _aten(table_key: str, rule: Rule) -> None:
    for name in table_key.split():
        op, _, overload = name.partition(".")
        packet = getattr(aten, op, None)
        if packet is not None and hasattr(packet, overload or "default"):
            FUNCTION_RULES[getattr(packet, overload or "default")] = rule


_aten("relu relu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid hardsigmoid_ silu silu_ gelu gelu_ "
      "hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ mish mish_ softplus clamp clamp_ clamp_min clamp_min_ "
      "clamp_max clamp_max_ exp log abs sqrt rsqrt erf", _activation)
_aten(" ".join(name + tail for name in _MATH_UNARY for tail in ("", "_")), _activation)
_aten("neg", Rule(analyse=_same, linear=True))
_aten("clone detach alias contiguous _to_copy to.dtype to.dtype_layout to.device type_as",
      Rule(analyse=_same, linear=True, alias=True))
_aten("add.Tensor add_.Tensor sub.Tensor sub_.Tensor mul.Tensor mul_.Tensor div.Tensor div_.Tensor "
      "add.Scalar sub.Scalar mul.Scalar div.Scalar pow.Tensor_Scalar pow.Tensor_Tensor maximum minimum "
      "rsub.Scalar", Rule(analyse=_elementwise))
for _spatial in (1, 2, 3):
    _aten(f"max_pool{_spatial}d adaptive_max_pool{_spatial}d", Rule(
        analyse=lambda ctx, s=_spatial: _spatial_only(ctx, s, "pooling"), nonlinear=True))
    _aten(f"avg_pool{_spatial}d adaptive_avg_pool{_spatial}d", Rule(
        analyse=lambda ctx, s=_spatial: _spatial_only(ctx, s, "pooling"), linear=True))
_aten("upsample_nearest2d.vec upsample_bilinear2d.vec upsample_nearest1d.vec upsample_linear1d.vec "
      "upsample_nearest3d.vec upsample_trilinear3d.vec upsample_bicubic2d.vec", Rule(analyse=_interpolate))
_aten("pad constant_pad_nd", _PAD_RULE)
_aten("mean.dim sum.dim_IntList amax amin", Rule(analyse=_reduction))
_aten("linalg_vector_norm", FUNCTION_RULES[torch.linalg.vector_norm])
_aten("softmax.int _softmax log_softmax.int _log_softmax", _softmax_rule)
_aten("permute transpose.int", Rule(analyse=_permute, linear=True, alias=True))
_aten("view reshape _unsafe_view", _reshape_rule)
_aten("flatten.using_ints squeeze.dim squeeze.dims squeeze unsqueeze", _plain_reshape)
_aten("unflatten.int", Rule(analyse=_reshape, rewrite=_unflatten_rewrite, linear=True, alias=True))
_aten("expand", Rule(analyse=_expand, rewrite=_rewrite_sizes, linear=True, alias=True))
_aten("expand_as", METHOD_RULES["expand_as"])
_aten("cat", Rule(analyse=_cat))
_aten("stack", Rule(analyse=_stack))
_aten("roll", Rule(analyse=_roll, linear=True))
_aten("flip", _FLIP)
_aten("cumsum", _CUMSUM)
_aten("repeat tile", _REPEAT)
_aten("cumprod logcumsumexp", _CUMULATIVE)
_aten("glu", _GLU)
_aten("channel_shuffle native_channel_shuffle", _SHUFFLE)
_aten("eq.Scalar eq.Tensor ne.Scalar ne.Tensor lt.Scalar lt.Tensor le.Scalar le.Tensor gt.Scalar gt.Tensor "
      "ge.Scalar ge.Tensor logical_and logical_or logical_xor remainder.Scalar remainder.Tensor fmod.Scalar "
      "fmod.Tensor floor_divide", _VALUE_OP)
_aten("logical_not bitwise_not", _NOT)
_aten("bitwise_and.Tensor bitwise_or.Tensor bitwise_xor.Tensor __and__.Tensor __or__.Tensor __xor__.Tensor", _VALUE_OP)
_aten(" ".join(f"{kind}_pad{d}d" for kind in ("reflection", "replication") for d in (1, 2, 3)), _PAD_RULE)
_aten("clamp.Tensor clamp_min.Tensor clamp_max.Tensor", Rule(analyse=_elementwise, nonlinear=True))
_aten("where.self where.ScalarOther where.ScalarSelf where.Scalar", Rule(analyse=_elementwise))
_aten("addcmul addcdiv", Rule(analyse=lambda ctx: _elementwise(ctx)))
_aten("new_zeros new_ones new_empty new_full", Rule(analyse=_created_like))
_aten("zeros_like ones_like empty_like full_like", _SHAPED_LIKE)
_aten("index.Tensor", Rule(analyse=_gather_rows))
_aten("eq.Scalar eq.Tensor ne.Scalar ne.Tensor lt.Scalar lt.Tensor gt.Scalar gt.Tensor le.Scalar le.Tensor "
      "ge.Scalar ge.Tensor masked_fill.Scalar masked_fill.Tensor where.self", Rule(analyse=_elementwise))
_aten("lift_fresh_copy", Rule(analyse=_same, linear=True))
_aten("fill_.Scalar fill_.Tensor zero_", _SHAPED_LIKE)
_aten("matmul bmm", _matmul_rule)
_aten("einsum", Rule(analyse=_einsum))
_aten("scaled_dot_product_attention", Rule(analyse=_sdpa, nonlinear=True))
_aten("unbind.int", Rule(analyse=_unbind, alias=True))
_aten("split.Tensor split_with_sizes chunk tensor_split.sections tensor_split.indices", _split_rule)
_aten("sym_size.int sym_numel _assert_tensor_metadata _assert_scalar", Rule(analyse=_metadata))


# --------------------------------------------------------------------------- public rule constructors
def elementwise(*, nonlinear: bool = True, linear: bool = False) -> Rule:
    """The rule of an op that acts on each element (or each channel) alone and keeps the input's
    shape: an activation (`nonlinear=True`, the default), or a linear elementwise map (`linear=True`).
    Its channels are its input's channels; it has no parameters of its own to slice."""
    return Rule(analyse=_same, nonlinear=nonlinear and not linear, linear=linear)


def channelwise_module(size: str, params=("weight", "bias"), *, dim: int = 1, linear: bool = False,
                       nonlinear: bool = False) -> Rule:
    """The rule of a module with one entry per channel of its input along `dim` (dim 1: N, C, ...)
    in each of `params` (their dim 0), whose channel count is its attribute `size`; the output keeps
    the input's shape and channels. Shrinking slices those parameters/buffers and sets `size`."""
    params = tuple(params)

    def analyse(ctx):
        x = ctx.arg(0, "input")
        ndim = len(ctx.shape_of(x))
        cdim = _nd(dim, ndim)
        ctx.space.union(along(ctx, x, cdim), ctx.axis("ch", getattr(ctx.module, size)))
        return ctx.normalize(ctx.layout_of(x).ids, cdim)

    def resize(m, sizes):
        setattr(m, size, sizes["ch"])

    return Rule(analyse=analyse, resize=resize, linear=linear, nonlinear=nonlinear,
                params=lambda m: {p: {0: "ch"} for p in params if getattr(m, p, None) is not None})
