"""Capture: a model becomes a GraphModule whose nodes carry shapes, by torch.fx's symbolic trace or,
where that fails, torch.export (export.py); functional layers are lifted into modules (lift.py) and
in-place ops made out-of-place (inplace.py), so every later pass sees one kind of graph."""
from __future__ import annotations

import torch
import torch.fx as fx

from .attention import split_attention
from .export import ExportError, _batched, export_graph, user_frame
from .inline import inline_opaque_calls, opaque_calls
from .lift import lift_layers
from .trace import NodeFailure, TraceError, _as_tuple, adopt_mode, complete_shapes, propagate_shapes, trace

CAPTURE_PATHS = ("auto", "fx", "export")


def capture(model: torch.nn.Module, example_inputs: tuple, *, how: str = "auto", leaf_modules=(),
            concrete_args=None, inplace: bool = False) -> tuple[fx.GraphModule, str]:
    """(graph, path): `how` 'fx' traces, 'export' exports, 'auto' traces and falls back to export when
    fx cannot trace; where fx traced but kept a function call whole, 'auto' captures that call alone
    with torch.export and splices its ops in (path 'fx+export'). The graph is a copy in the model's
    mode; the model is not modified. inplace=True: the fx path builds the graph over the model's own
    submodules and tensors (the caller gives the model up); export copies all the same."""
    if how not in CAPTURE_PATHS:
        raise ValueError(f"capture={how!r}: choose one of {', '.join(map(repr, CAPTURE_PATHS))}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    example_inputs = _as_tuple(example_inputs)
    fx_error = None
    gm = None
    if how in ("auto", "fx"):
        try:
            gm, path = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                             inplace=inplace), "fx"
        except TraceError as e:
            if how == "fx":
                raise
            fx_error = e
    if gm is None:
        try:
            gm, path = export_graph(model, example_inputs), "export"
        except ExportError as e:
            if fx_error is None:
                raise
            fx_said, _, fx_fix = str(fx_error).partition(". Either ")
            raise TraceError(
                f"neither capture path works. {fx_said}. And {e}. Fix: write that construct without Python "
                f"control flow on tensor values (torch.where, torch.cond), or (fx path) either {fx_fix}") from None
        propagate_shapes(gm, example_inputs)
        gm.train(model.training)
    captured = set(gm.modules())
    if how == "auto" and path == "fx" and not leaf_modules and concrete_args is None and _inline(gm, example_inputs):
        path = "fx+export"
    # a lifted layer keeps the meta of the call it replaces; split attention adds nodes without
    if lift_layers(gm) + split_attention(gm):
        complete_shapes(gm, example_inputs)
    adopt_mode(gm, captured, gm.training)  # the modules the rewrites made
    return gm, path


def _inline(gm: fx.GraphModule, example_inputs: tuple) -> int:
    """inline_opaque_calls, on shapes at a batch of 2 or more (export freezes a size of 1); the
    graph's shapes are those at `example_inputs` after."""
    calls = opaque_calls(gm)
    if not calls:
        return 0
    doubled = any(torch.is_tensor(x) and x.ndim and x.shape[0] == 1 for x in example_inputs)
    if doubled:
        try:
            propagate_shapes(gm, _batched(example_inputs), internal=True)
        except NodeFailure:  # the graph runs at batch 1 only: export could not free the batch either
            propagate_shapes(gm, example_inputs)
            return 0
    inlined = inline_opaque_calls(gm, calls)
    try:  # the input fitted the traced graph: a failure now is in the spliced ops
        if doubled:
            propagate_shapes(gm, example_inputs, internal=True)
        elif inlined:  # only the spliced ops need shapes
            complete_shapes(gm, example_inputs, internal=True)
    except NodeFailure as e:
        raise TraceError(f"the ops torch.export recorded inside a call that fx keeps whole fail on the "
                         f"example input, {e}. wrap(..., capture='fx') keeps such calls whole (their "
                         f"channels then stay)") from e.cause
    return inlined


__all__ = ["CAPTURE_PATHS", "ExportError", "TraceError", "capture", "user_frame"]
