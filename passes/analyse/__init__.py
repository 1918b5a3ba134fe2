"""Analyse: one call turns a captured GraphModule into its complete, frozen Plan."""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from ..plan import Plan
from .batch import batch_leads
from .groups import analyse_channels
from .sections import find_sections, network_depth


def analyse(gm: fx.GraphModule, example_inputs, *, channels: bool = True, sections: bool = True,
            original_depth: int | None = None) -> Plan:
    """Channel groups (when `channels`), residual sections (when `sections`), what is unprunable and
    why, the depth, and whether gates can sample per example. `gm` must carry shapes for
    `example_inputs` (capture.trace); `original_depth` is the depth before any graph rewrite that
    changed it (add_residuals)."""
    example = [(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in example_inputs]
    plan = analyse_channels(gm, example) if channels else Plan({}, {}, {}, {}, {}, {}, [], example)
    found, skipped = find_sections(gm) if sections else ({}, [])
    depth = network_depth(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    acted_on = [nodes[s.node].args[s.arg] for s in plan.sites.values()] + [
        nodes[s.add].args[s.branch_arg] for s in found.values()]
    return replace(plan, sections=found, unprunable=plan.unprunable + skipped, depth=depth,
                   original_depth=depth if original_depth is None else original_depth,
                   per_example=batch_leads(gm, acted_on, example_inputs))


__all__ = ["analyse", "network_depth"]
