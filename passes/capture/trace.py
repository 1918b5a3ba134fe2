"""Trace a model with torch.fx and propagate shapes, with errors a user can act on."""
from __future__ import annotations

import contextlib
import copy
import time

import torch
import torch.fx as fx
from torch.fx.immutable_collections import immutable_dict, immutable_list
import torch.utils._pytree as pytree
import torchvision
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata
from torch.nn.utils.stateless import _reparametrize_module

from ..copying import copy_module
from .weight_norm import modernize_weight_norm
from ..rules import MODULE_RULES


def is_tensor_meta(meta) -> bool:
    return meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype")


def tensor_meta(node):
    """The shape and dtype ShapeProp recorded for a node's tensor (None for other values)."""
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


class TraceError(RuntimeError):
    """The model cannot be turned into a graph by torch.fx."""


class ExampleInputError(ValueError):
    """The example input does not fit the model."""


# Modules whose forward reads `self.training` at run time: tracing through them would bake the
# mode in (stochastic depth would stay on, or off, for good).
LEAF_MODULES: tuple[type, ...] = (torchvision.ops.StochasticDepth,)


class SurgeryTracer(fx.Tracer):
    def __init__(self, leaf_modules=()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)
        self.scope_path: list[str] = []
        self.failed_in: str | None = None  # the innermost module whose forward raised
        self.kept_whole: set[int] = set()  # composite layers fx could not trace into (by id)

    def is_leaf_module(self, m, qualname):
        if isinstance(m, LEAF_MODULES + self.extra_leaves):
            return True
        if _composite(m) and id(m) not in self.kept_whole:
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.scope_path.append(path or type(m).__name__)
        try:
            if _composite(m) and not self.is_leaf_module(m, path):
                return self._into_or_whole(m, forward, args, kwargs)
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # record it before the unwinding pops it
                self.failed_in = self.scope_path[-1]
            raise
        finally:
            self.scope_path.pop()

    def _into_or_whole(self, m, forward, args, kwargs):
        """Trace into a composite layer; where its Python cannot be traced, take back what it
        recorded and keep it whole, as fx does with every torch.nn layer."""
        recorded = len(self.graph.nodes)  # the tracer only appends
        saved = (copy.copy(self.module_stack), dict(self.num_calls), self.failed_in)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            while len(self.graph.nodes) > recorded:  # last first: nothing reads it
                self.graph.erase_node(next(reversed(self.graph.nodes)))
            self.module_stack, self.num_calls, self.failed_in = saved
            self.kept_whole.add(id(m))
            return super().call_module(m, forward, args, kwargs)


def _composite(m: torch.nn.Module) -> bool:
    """A torch.nn layer made only of other layers (nn.TransformerEncoderLayer, nn.Transformer): fx
    keeps every torch.nn layer whole, but the parts of this one have rules of their own."""
    return (type(m).__module__.startswith("torch.nn.modules.") and type(m) not in MODULE_RULES
            and not m._parameters and not m._buffers and next(m.children(), None) is not None
            and not isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)))


def default_example(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """A 1x3x224x224 batch, or what the model's first conv/linear/embedding layer asks for."""
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            return (torch.randint(0, m.num_embeddings, (1, 16)),)
        if isinstance(m, torch.nn.Conv1d):
            return (torch.randn(1, m.in_channels, 224),)
        if isinstance(m, torch.nn.Conv2d):
            return (torch.randn(1, m.in_channels, 224, 224),)
        if isinstance(m, torch.nn.Conv3d):
            return (torch.randn(1, m.in_channels, 16, 64, 64),)
        if isinstance(m, torch.nn.Linear):
            return (torch.randn(1, m.in_features),)
    return (torch.randn(1, 3, 224, 224),)


def trace(model: torch.nn.Module, example_inputs=None, *, leaf_modules=(), concrete_args=None,
          inplace: bool = False) -> fx.GraphModule:
    """A copy of `model` as a GraphModule whose nodes carry `meta['tensor_meta']` (inplace=True: a
    GraphModule over the model's own submodules and tensors, no time or memory spent copying them).

    The model is traced in eval mode: code that branches on `self.training` (auxiliary heads of
    GoogLeNet/Inception) keeps its inference path. The copy is returned in the model's mode.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    example_inputs = _as_tuple(default_example(model) if example_inputs is None else example_inputs)
    model = model if inplace else copy_module(model)
    modernize_weight_norm(model)
    tracer = SurgeryTracer(leaf_modules)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:  # the inference fast path of nn.Transformer* layers branches on tensor properties
        torch.backends.mha.set_fastpath_enabled(False)
        with evaluating(model):
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # fx raises many types; all mean the same thing to a user
        where = tracer.failed_in or (tracer.scope_path[-1] if tracer.scope_path else type(model).__name__)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__} (inside '{where}'): {first}. "
            f"Either mark the submodule that contains it as a leaf, e.g. "
            f"wrap(model, leaf_modules=[{type(_get(model, where)).__name__}]) (its channels then stay "
            f"unpruned), or fix the input-dependent argument with concrete_args={{...}}.") from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    adopt_mode(gm, set(model.modules()), model.training)  # the containers GraphModule made
    propagate_shapes(gm, example_inputs)
    return gm


class NodeFailure(RuntimeError):
    """Running the graph on example inputs failed at a node (`node`: its name; `cause`: the error)."""

    def __init__(self, node: fx.Node, cause: BaseException):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"at node '{node.name}' ({node.op} {node.target}): {first}")
        self.node, self.cause, self.first = node.name, cause, first


# A propagation runs for real until it has taken SWITCH_AFTER_S at more than SLOW_NODE_S a node,
# then finishes on the meta device (shapes without arithmetic, about 0.3 ms a node): a large
# model at full size spends seconds on arithmetic of which only the shapes are kept, a small one
# never reaches the switch.
SWITCH_AFTER_S = 0.5
SLOW_NODE_S = 2e-3


class _MetaFailed(Exception):
    """A node failed after the switch to the meta device: run the whole graph for real."""


def _to_meta(value):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), value)


_CONTAINERS = (immutable_list, immutable_dict, tuple)


def as_written(value):
    """A node's arguments as the generated code passes them: fx.Interpreter hands lists and dicts
    over as fx's immutable_list/immutable_dict, and a function called on them may mutate its
    arguments (torchvision's Swin3d `_get_window_and_shift_size` does)."""
    kind = type(value)
    if kind is immutable_list:
        return [as_written(v) for v in value]
    if kind is immutable_dict:
        return {k: as_written(v) for k, v in value.items()}
    if kind is tuple and any(type(v) in _CONTAINERS for v in value):
        return tuple(as_written(v) for v in value)
    return value


class LeanRun:
    """fx.Interpreter (mixed in before it) without its per-node bookkeeping, which shape runs do
    not need: the traceback-meta context and debug log of every node, and a walk of the dotted
    name for every module call (its own `submodules` table holds them). On a small model at 64 px
    that bookkeeping costs about as much as the model's arithmetic. Arguments are passed as the
    generated code passes them (as_written)."""

    def fetch_args_kwargs_from_env(self, n):
        return as_written(super().fetch_args_kwargs_from_env(n))

    def run_node(self, n):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return getattr(self, n.op)(n.target, args, kwargs)

    def call_module(self, target, args, kwargs):
        module = self.submodules.get(target)  # (a module held under two names is listed under one)
        return module(*args, **kwargs) if module is not None else super().call_module(target, args, kwargs)


class _ShapeProp(LeanRun, ShapeProp):
    """ShapeProp's records (meta 'tensor_meta' and 'type'), less the memory-format queries (a third
    of a propagation's time; nothing here reads them), and a failure raised as NodeFailure. With
    `switch`, the rest of a slow run goes on the meta device (see SWITCH_AFTER_S)."""

    def __init__(self, gm, *, switch: bool = False):
        super().__init__(gm)
        self._started, self._done = time.perf_counter(), 0
        self._may_switch, self.switched, self.on_meta = switch, False, contextlib.ExitStack()

    def slow(self) -> bool:
        """Has the run so far taken over SLOW_NODE_S a node (or gone to meta for it)?"""
        return self.switched or time.perf_counter() - self._started > SLOW_NODE_S * max(self._done, 1)

    def _maybe_switch(self) -> None:
        if time.perf_counter() - self._started < SWITCH_AFTER_S:
            return
        self._may_switch = False
        if self.slow():
            self.on_meta.enter_context(on_meta(self.module))
            self.switched = True
            self.env = {k: _to_meta(v) for k, v in self.env.items()}

    def run_node(self, n):
        if self._may_switch:
            self._maybe_switch()
        self._done += 1
        try:
            result = super().run_node(n)
            if self.switched and n.op in ("placeholder", "get_attr"):  # an input, a constant: to meta too
                result = _to_meta(result)
        except NodeFailure:
            raise
        except Exception as e:
            if self.switched:
                raise _MetaFailed() from e
            raise NodeFailure(n, e) from e
        found = False

        def record(value):
            nonlocal found
            if not isinstance(value, torch.Tensor):
                return value
            found = True
            if value.is_quantized or value.layout != torch.strided:  # rare: ShapeProp's full record
                return _extract_tensor_metadata(value)
            return TensorMetadata(value.shape, value.dtype, value.requires_grad, value.stride(), None, False, {})

        meta = fx.node.map_aggregate(result, record)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def adopt_mode(gm: fx.GraphModule, known: set, training: bool) -> None:
    """Modules of `gm` not in `known` (made by a pass, in nn.Module's default training mode) take
    the model's mode; the others keep their own. `known` holds the modules themselves, not ids: an
    id may be reused once a rewrite drops a module."""
    for m in gm.modules():
        if m not in known:
            m.training = training


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """`module` in eval mode inside the block; after it, each submodule back in the mode it had (a
    BatchNorm frozen in a training model stays frozen). Nothing is switched where nothing trains."""
    training = [m for m in module.modules() if m.training]
    if training:
        module.eval()
    try:
        yield module
    finally:
        for m in training:
            m.training = True


def propagate_shapes(gm: fx.GraphModule, example_inputs, *, internal: bool = False) -> None:
    """Run `gm` on the example inputs, recording every node's shape in `meta['tensor_meta']`.

    A failure blames the example input (ExampleInputError), or with `internal=True` (a graph that
    vpsurgery rewrote, run on inputs that fitted it before) raises NodeFailure naming the node."""
    example_inputs = _as_tuple(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders with no default value
    if not (len(required) <= len(example_inputs) <= len(placeholders)):
        raise ExampleInputError(
            f"the model's forward takes {len(required)} input(s) ({', '.join(n.name for n in required)}) "
            f"but {len(example_inputs)} example input(s) were given; pass example_inputs=(x,) with one "
            f"tensor per input")
    try:
        with evaluating(gm), torch.no_grad():
            _propagate(gm, example_inputs)
    except NodeFailure as e:
        if internal:
            raise
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__
                           for t in example_inputs)
        raise ExampleInputError(
            f"the example input ({shapes}) does not fit the model: {e.first} (at node '{e.node}'). Pass "
            f"example_inputs with the shape and dtype the model expects, e.g. "
            f"example_inputs=({_typical_input(gm)},)") from None


def _typical_input(model: torch.nn.Module) -> str:
    """An input of the kind the model's first layer reads, written out (an error's hint): token ids
    for an embedding, a clip for a 3-d conv, a 224x224 image for a 2-d one."""
    x = default_example(model)[0]
    if not x.is_floating_point():
        vocabulary = next(m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding))
        return f"torch.randint(0, {vocabulary}, (1, 128))"
    shape = tuple(x.shape)
    return f"torch.randn{shape[:2] + (16, 224, 224) if len(shape) == 5 else shape}"


SLOW_KEY = "vps_slow_to_run"  # gm.meta: a real run of this graph took over SLOW_NODE_S a node


def _propagate(gm: fx.GraphModule, example_inputs) -> None:
    prop = _ShapeProp(gm, switch=True)
    try:
        with prop.on_meta:
            prop.propagate(*example_inputs)
        slow = prop.slow()
    except _MetaFailed:  # an op the meta device cannot run (a tensor made on the CPU inside forward)
        _ShapeProp(gm).propagate(*example_inputs)
        slow = False  # meta cannot run it: later runs must be real anyway
    if not any(torch.is_tensor(t) and t.is_meta for t in example_inputs):  # a real run: its time tells
        gm.meta[SLOW_KEY] = slow


def slow_to_run(gm: fx.GraphModule) -> bool:
    """Did a real shape propagation of this graph (or of the graph it was copied or shrunk from)
    take over SLOW_NODE_S a node? Then shapes are cheaper on the meta device."""
    return bool(getattr(gm, "meta", {}).get(SLOW_KEY, False))


def complete_shapes(gm: fx.GraphModule, example_inputs, *, internal: bool = False) -> None:
    """Record shapes for the nodes a rewrite added without them (the others' shapes are those at
    `example_inputs`): on the meta device, from the recorded shapes of their inputs, so the model
    does not run again; by propagate_shapes where that cannot be done (an input whose value was not
    recorded, such as a size; an op without a meta kernel)."""
    # ShapeProp records each node's type (and 'tensor_meta' for tensors only, so not for sizes): a
    # node a pass added without copying a meta has neither
    missing = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr") and "type" not in n.meta]
    if not missing:
        return
    try:
        _shapes_on_meta(gm, missing)
    except Exception:
        propagate_shapes(gm, example_inputs, internal=internal)


class _Unrecorded(Exception):
    """A node's value is needed but only its type was recorded."""


def _as_meta(meta):
    """A meta-device stand-in for a recorded result (tensors as empty meta tensors, the rest as is)."""
    if is_tensor_meta(meta):  # before tuples: TensorMetadata is one
        if meta.is_quantized:
            raise _Unrecorded("a quantized tensor")
        return torch.empty_strided(tuple(meta.shape), tuple(meta.stride), dtype=meta.dtype, device="meta")
    if isinstance(meta, (tuple, list)):
        return type(meta)(_as_meta(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _as_meta(m) for k, m in meta.items()}
    return meta


@contextlib.contextmanager
def on_meta(gm: fx.GraphModule):
    """`gm` with its parameters and buffers swapped for meta-device stand-ins (shapes, dtypes, no
    data)."""
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    meta = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad) for name, t in named}
    with _reparametrize_module(gm, meta):
        yield


def _shapes_on_meta(gm: fx.GraphModule, missing: list[fx.Node]) -> None:
    todo = set(missing)
    prop = _ShapeProp(gm)
    for node in missing:
        for a in node.all_input_nodes:
            if a in todo or a.op == "get_attr":
                continue
            if "tensor_meta" in a.meta:
                prop.env[a] = _as_meta(a.meta["tensor_meta"])
            elif a.meta.get("type") is type(None):
                prop.env[a] = None
            else:  # a size, a flag: ShapeProp keeps the type of such a value, not the value
                raise _Unrecorded(a.name)
    for n in gm.graph.nodes:  # the attributes they read, recorded as they are, read on meta
        if n.op == "get_attr" and any(u in todo for u in n.users):
            value = prop.run_node(n)
            prop.env[n] = _to_meta(value)
    try:
        with evaluating(gm), on_meta(gm), torch.no_grad():
            for n in missing:
                prop.env[n] = prop.run_node(n)
    except Exception:
        for n in missing:  # nothing half-recorded
            n.meta.pop("tensor_meta", None)
            n.meta.pop("type", None)
        raise


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _get(model, path):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model
