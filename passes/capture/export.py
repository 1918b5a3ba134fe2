"""The second capture path: torch.export (non-strict) for models torch.fx cannot trace.

torch.export runs the model's Python (loops over layer lists, shape-dependent branches, data
classes) and records the ATen ops it calls; `ExportedProgram.module()` gives a GraphModule whose
parameters are get_attr nodes. This pass turns that into an ordinary fx.GraphModule that the rest
of vpsurgery reads like a traced one: flat positional inputs, the model's output structure, a
batch dim that stays dynamic, `x[:, a:b]` written as getitem again, and a module that follows
train()/eval() (the exported one refuses). Layers are then lifted into modules (lift.py), so the
same rule table serves both paths; the ATen ops without a layer have rules keyed by overload
(passes/rules.py).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import operator
import traceback
import warnings

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..codegen import recompile
from ..copying import copy_module
from .weight_norm import modernize_weight_norm
from .trace import TraceError

aten = torch.ops.aten


class ExportError(TraceError):
    """torch.export could not capture the model (a TraceError: the model cannot become a graph)."""


def user_frame(error: BaseException) -> str | None:
    """'file:line (code)' of the innermost frame of `error` that is the user's code (not torch's,
    not vpsurgery's, not the standard library's)."""
    skip = ("/torch/", "/torchvision/", "/vpsurgery/", "/passes/", "/site-packages/", "/lib/python3", "<frozen")
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    for frame in reversed(frames):
        if not any(s in frame.filename for s in skip):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return None


@contextlib.contextmanager
def _quiet():
    """torch.export logs its graph and guards on failure; the error we raise says what matters."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo", "torch.export", "torch._export",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    # nothing reads the nodes' stack traces, and recording one per op costs a tenth of an export
    # (a plain module flag; where a torch version lacks it, setting it does nothing)
    emit = getattr(torch.fx.config, "do_not_emit_stack_traces", False)
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _batched(example: tuple) -> tuple:
    """Export specialises sizes 0 and 1: a batch of 1 would freeze the graph to batch 1."""
    return tuple(torch.cat([x, x]) if torch.is_tensor(x) and x.ndim and x.shape[0] == 1 else x for x in example)


def export_graph(model: torch.nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """A copy of `model` captured by torch.export as a GraphModule (shapes not yet propagated)."""
    model = copy_module(model).eval()
    modernize_weight_norm(model)
    example = _batched(tuple(example_inputs))
    dynamic = tuple({0: torch.export.Dim.AUTO} if torch.is_tensor(x) and x.ndim else None for x in example)
    try:
        with _quiet():
            program = torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # export raises many types; all mean one thing to a user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = user_frame(e)
        raise ExportError(f"torch.export cannot capture {type(model).__name__}: {first}"
                          + (f" [at {where}]" if where else "")) from None
    exported = program.module()
    graph = copy.deepcopy(exported.graph)
    _flat_outputs(graph, program.call_spec.out_spec)
    graph.set_codegen(fx.graph.CodeGen())  # plain positional inputs: what the other passes expect
    _slices_as_getitem(graph)
    graph._tracer_cls, graph._tracer_extras = None, {}  # unpickling must not re-run export's tracer
    gm = fx.GraphModule(exported, graph, type(model).__name__)
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    recompile(gm)
    return gm


def _impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and (target._schema.is_mutable or "assert" in target.__name__)


def _flat_outputs(graph: fx.Graph, out_spec) -> None:
    """Return the model's own output structure (tensor, tuple, list, dict) instead of a flat tuple."""
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = list(output.args[0])
    if out_spec is None:
        return
    structure = pytree.tree_unflatten(leaves, out_spec)
    if not _plain(structure):
        raise ExportError(f"the model returns a {type(structure).__name__}; the export path supports tensors, "
                          f"tuples, lists and dicts of them: return those, or wrap the model in a module "
                          f"that does")
    output.args = (structure,)


def _plain(value) -> bool:
    if isinstance(value, (fx.Node, type(None), int, float, bool)):
        return True
    if type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _slices_as_getitem(graph: fx.Graph) -> None:
    """aten.slice / aten.select are the getitem the model wrote; the getitem rule covers them."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.slice.Tensor, aten.select.int):
            continue
        x, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim < 0:
            continue
        if node.target is aten.slice.Tensor:
            start, end, step = (list(node.args[2:5]) + [None, None, 1])[:3]
            start = None if start in (0, None) else start
            end = None if end is None or (isinstance(end, int) and end >= 2 ** 62) else end
            entry = slice(start, end, None if step == 1 else step)
        else:
            entry = node.args[2]
        with graph.inserting_before(node):
            item = graph.call_function(operator.getitem, (x, (slice(None),) * dim + (entry,)))
        item.meta = dict(node.meta)
        node.replace_all_uses_with(item)
        graph.erase_node(node)
