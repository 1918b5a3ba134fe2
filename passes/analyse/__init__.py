"""Analyse: one call turns a captured GraphModule into its complete, frozen Plan."""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from ..plan import Plan
from .batch import batch_leads
from .groups import analyse_channels
from .sections import find_sections, network_depth


def analyse(gm: fx.GraphModule, example_inputs, *, channels: bool = True, sections: bool = True,
            original_depth: int | None = None, exclude=()) -> Plan:
    """Channel groups (when `channels`), residual sections (when `sections`), what is unprunable and
    why, the depth, and whether gates can sample per example. `gm` must carry shapes for
    `example_inputs` (capture.trace); `original_depth` is the depth before any graph rewrite that
    changed it (add_residuals). `exclude`: modules (qualified names or classes) that keep every
    channel and are never removed with a section."""
    excluded = excluded_modules(gm, exclude)
    example = [(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in example_inputs]
    plan = analyse_channels(gm, example, excluded) if channels else Plan({}, {}, {}, {}, {}, {}, [], example)
    found, skipped = find_sections(gm, excluded) if sections else ({}, [])
    depth = network_depth(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    acted_on = [nodes[s.node].args[s.arg] for s in plan.sites.values()] + [
        nodes[s.add].args[s.branch_arg] for s in found.values()]
    return replace(plan, sections=found, unprunable=plan.unprunable + skipped, depth=depth,
                   original_depth=depth if original_depth is None else original_depth,
                   per_example=batch_leads(gm, acted_on, example_inputs))


def excluded_modules(gm: fx.GraphModule, exclude) -> frozenset[str]:
    """The qualified names of the called modules that `exclude` names, by name or by class."""
    if isinstance(exclude, (str, type)):
        exclude = [exclude]
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    modules = dict(gm.named_modules())
    out = set()
    for item in exclude:
        if isinstance(item, type):
            out |= {name for name in called if isinstance(modules[name], item)}
        elif isinstance(item, str):
            if item not in modules:
                near = sorted(n for n in called if item.split(".")[-1] in n)[:5]
                raise ValueError(f"exclude: the model has no module named {item!r}"
                                 + (f"; did you mean {', '.join(near)}?" if near else
                                    "; use the names of model.named_modules()"))
            out |= {name for name in called if name == item or name.startswith(item + ".")}
        else:
            raise TypeError(f"exclude takes module names (str) or module classes, got {item!r}")
    return frozenset(out)


__all__ = ["analyse", "excluded_modules", "network_depth"]
