"""The public surgery API: wrap (trace, analyse, gate), gates, shrink, report."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

import warnings

from vpsurgery.passes.analyse import analyse, network_depth
from vpsurgery.passes.analyse.sections import add_residuals as _add_residuals
from vpsurgery.passes.attach import plan_of, set_plan
from vpsurgery.passes.capture.inplace import make_out_of_place
from vpsurgery.passes.capture import capture as _capture
from vpsurgery.passes.capture.trace import TraceError
from vpsurgery.passes.capture.trace import _as_tuple, complete_shapes, default_example
from vpsurgery.passes.codegen import one_recompile
from vpsurgery.passes.gate.insert import GATES, insert_gates
from vpsurgery.passes.gate.modules import ChannelMask, Gate
from vpsurgery.passes.plan import Plan
from vpsurgery.passes.shrink import Decision, shrink_to
from vpsurgery.passes.shrink import shrink as _shrink


def wrap(model: torch.nn.Module, example_inputs=None, *, channels: bool = True, sections: bool = True,
         add_residuals: bool = False, theta_init: float = 1.0, leaf_modules=(),
         concrete_args=None, exclude=(), capture: str = "auto", inplace: bool = False) -> fx.GraphModule:
    """Trace `model` (a copy; the model is not modified), find its prunable channel groups and
    residual sections, and return a GraphModule with one Bernoulli gate per group/section.

    With every theta at 1 (the default) the gated model computes exactly what the model does,
    unless `add_residuals=True`, which puts an identity shortcut around every shape-preserving
    layer of a plain network (x -> x + f(x)) so that layers can be pruned: a different network,
    to be trained.

    `exclude`: modules, by qualified name (a parent's name covers its children) or by class, to keep
    as they are (Torch-Pruning's ignored_layers): their channels are pinned, a residual section that
    holds one is not removable, and the report lists them.

    `capture`: how the model becomes a graph. 'fx' (torch.fx symbolic trace), 'export' (torch.export,
    non-strict: for models with Python control flow fx cannot trace), or 'auto' (the default: fx,
    with each function call fx keeps whole captured alone by torch.export and spliced in ('fx+export');
    the whole model exported where fx fails, or where an op fx cannot see into still pins channels
    and export's graph lets more of them go). `vpsurgery.plan(gated).capture` says which was used.

    `inplace=True`: give the model up instead of copying it (as torch.ao's prepare(inplace=True) and
    Torch-Pruning do): the gated graph is built over the model's own submodules and tensors, which
    saves the copy's time and memory (a model's size again, for a large one); use the gated model,
    not the model, afterwards. The export path copies all the same.
    """
    _refuse_wrapped(model)
    example_inputs = _as_tuple(default_example(model) if example_inputs is None else example_inputs)

    def analysed(how):
        gm, path = _capture(model, example_inputs, how=how, leaf_modules=leaf_modules, concrete_args=concrete_args,
                            inplace=inplace)
        # out-of-place ops, so that the gated and the shrunk graphs train whatever is removed; shapes
        # do not change, so only nodes it added without them need another run
        if make_out_of_place(gm):
            complete_shapes(gm, example_inputs)
        original_depth = network_depth(gm) if add_residuals else None  # None: analyse's own count
        if add_residuals and not _add_residuals(gm):
            warnings.warn(f"add_residuals=True: no layer of {type(model).__name__} preserves its input's shape "
                          f"(equal in/out channels, stride 1) with a nonlinearity, so no shortcut was added; "
                          f"the model is unchanged", stacklevel=3)
        plan = analyse(gm, example_inputs, channels=channels, sections=sections, original_depth=original_depth,
                       exclude=exclude)
        return gm, dataclasses.replace(plan, capture=path)

    with one_recompile():  # the passes rewrite the graph one after another: its code is made once
        gm, plan = analysed(capture)
        steered = bool(leaf_modules) or concrete_args is not None  # the user steers fx: stay with it
        if capture == "auto" and plan.capture != "export" and not steered and _blind_spots(plan):
            # fx kept a call it cannot see into (a function wrapped as a leaf, an op without a rule)
            # that pins channels: torch.export records the ops inside it; keep whichever sees more
            try:
                other = analysed("export")
            except TraceError:  # ExportError is one: export cannot take it either, fx's graph stands
                other = None
            if other is not None and other[1].prunable_share > plan.prunable_share:
                gm, plan = other
        insert_gates(gm, plan, theta_init)
    set_plan(gm, plan)
    return gm


def _blind_spots(plan: Plan) -> bool:
    """Did an op without a channel rule pin some layer's output channels?"""
    return any(u.reason.startswith("no channel rule") and u.producers for u in plan.unprunable)


def _refuse_wrapped(model) -> None:
    if isinstance(model, torch.nn.Module) and any(isinstance(m, (Gate, ChannelMask)) for m in model.modules()):
        raise ValueError(
            f"this {type(model).__name__} is already wrapped (it holds vpsurgery gates); wrap it only once. "
            f"Train or set its gates and shrink it (vpsurgery.shrink(gated)): the shrunk model can be "
            f"wrapped again for another round; or wrap the original model")


def gates(gated: fx.GraphModule) -> dict[str, Gate]:
    """Every gate of a wrapped model by name; `gate.theta` is its nn.Parameter, `gate.kind` is
    'channel' or 'section'. Set one by hand with `gate.set(0.0)` or `gate.set(mask)`."""
    plan_of(gated)
    container = getattr(gated, GATES, None)
    return dict(container.items()) if container is not None else {}


def shrink(gated: fx.GraphModule, threshold: float = 0.5, *, keep_gates: bool = False,
           inplace: bool = False) -> fx.GraphModule:
    """A new, smaller GraphModule without the structures whose theta < threshold (a number in
    (0, 1]); the surviving theta are folded into the weights (or, with keep_gates=True, kept as
    gates for more training). The gated model is not modified. A failure inside (a channel rule
    that is wrong for some op) is a ShrinkError naming the node.

    `inplace=True`: shrink `gated` itself, without copying it first, and return it; after a
    failure it is left half-shrunk."""
    return _shrink(gated, threshold, keep_gates=keep_gates, inplace=inplace)


def kept_map(small: fx.GraphModule) -> dict:
    """What a shrink kept, as JSON-able data: per module and channel axis the kept positions of
    the original model, plus the removed sections and units (to replay the pruning elsewhere)."""
    p = plan_of(small)
    modules = {m: {name: ax.original_positions().tolist() for name, ax in axes.items()}
               for m, axes in p.module_axes.items()}
    return {"format": 1, "example": [[list(s), d] for s, d in p.example],
            "removed_units": sorted(int(u) for u in p.removed_units),
            "removed_sections": sorted(p.removed_sections), "capture": p.capture, "modules": modules}


def replay(model: torch.nn.Module, kept: dict, example_inputs=None, **wrap_kwargs) -> fx.GraphModule:
    """Apply a kept map to (a copy of) the original model, e.g. onto its dense checkpoint."""
    if kept.get("format") != 1:
        raise ValueError("not a vpsurgery kept map (expected the kept_map.json written by compress)")
    if example_inputs is None:
        example_inputs = tuple(torch.zeros(s, dtype=getattr(torch, d)) for s, d in kept["example"])
    path = kept.get("capture", "auto")  # the path the map was made on ('fx+export' is auto's own choice)
    wrap_kwargs.setdefault("capture", "auto" if path == "fx+export" else path)
    gated = wrap(model, example_inputs, **wrap_kwargs)
    removed = set(kept["removed_units"])
    axes_now = plan_of(gated).module_axes
    # Unit ids only mean the same thing in the same graph: check before shrinking by them.
    clashes = [m for m, axes in kept["modules"].items()
               if m not in axes_now or any(name not in axes_now[m] or
                                           axes_now[m][name].keep(removed).tolist() != positions
                                           for name, positions in axes.items())]
    if not clashes:
        small = shrink_to(gated, Decision(frozenset(removed), frozenset(kept["removed_sections"]))).model
        got = kept_map(small)["modules"]
        clashes = [m for m, axes in kept["modules"].items() if got.get(m) != axes]
    if clashes:
        raise ValueError(f"the kept map does not fit this model: {len(clashes)} module(s) differ, e.g. "
                         f"{clashes[:3]}; replay it onto the architecture it was made from")
    return small


def plan(gated: fx.GraphModule) -> Plan:
    """The surgery plan: groups, sections, mask sites, and what is unprunable and why."""
    return plan_of(gated)


_CAPTURED_BY = {"fx": "torch.fx", "export": "torch.export",
                "fx+export": "torch.fx (calls fx keeps whole: torch.export)"}


def report(gated: fx.GraphModule) -> str:
    """A readable summary of what wrap found."""
    p = plan_of(gated)
    lines = [f"captured by {_CAPTURED_BY.get(p.capture, p.capture)}; "
             f"depth {p.depth} conv/linear layers (was {p.original_depth}); "
             f"{len(p.groups)} channel groups ({sum(len(g.units) for g in p.groups.values())} gated units), "
             f"{len(p.sections)} residual sections, {len(p.sites)} mask sites; "
             f"{100 * p.prunable_share:.1f}% of conv/linear output channels prunable"]
    for g in p.groups.values():
        lines.append(f"  group {g.name}: {len(g.units)} units, producers {', '.join(g.producers)}")
    for s in p.sections.values():
        lines.append(f"  section {s.name}: {len(s.modules)} modules, {s.params} params, depth {s.depth}")
    if p.unprunable:
        lines.append("unprunable:")
        for u in p.unprunable:
            where = ", ".join(u.where[:4]) + (" ..." if len(u.where) > 4 else "")
            pinned = f"; pins channels of {', '.join(u.producers[:4])}" + (" ..." if len(u.producers) > 4 else "") \
                if u.producers else ""
            lines.append(f"  {u.reason} (at {where}){pinned}")
    return "\n".join(lines)
