"""Capture: a model becomes a GraphModule whose nodes carry shapes, by torch.fx's symbolic trace or,
where that fails, torch.export (export.py); functional layers are lifted into modules (lift.py) and
in-place ops made out-of-place (inplace.py), so every later pass sees one kind of graph."""
from __future__ import annotations

import torch
import torch.fx as fx

from .attention import split_attention
from .export import ExportError, export_graph, user_frame
from .lift import lift_layers
from .trace import TraceError, _as_tuple, propagate_shapes, trace

CAPTURE_PATHS = ("auto", "fx", "export")


def capture(model: torch.nn.Module, example_inputs: tuple, *, how: str = "auto", leaf_modules=(),
            concrete_args=None) -> tuple[fx.GraphModule, str]:
    """(graph, path): `how` 'fx' traces, 'export' exports, 'auto' traces and falls back to export when
    fx cannot trace. The graph is a copy in the model's mode; the model is not modified."""
    if how not in CAPTURE_PATHS:
        raise ValueError(f"capture={how!r}: choose one of {', '.join(map(repr, CAPTURE_PATHS))}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    example_inputs = _as_tuple(example_inputs)
    fx_error = None
    gm = None
    if how in ("auto", "fx"):
        try:
            gm, path = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args), "fx"
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
    if lift_layers(gm) + split_attention(gm):
        propagate_shapes(gm, example_inputs)
    return gm, path


__all__ = ["CAPTURE_PATHS", "ExportError", "TraceError", "capture", "user_frame"]
