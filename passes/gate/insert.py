"""Insert the gates of a Plan into a traced graph (this is what `vpsurgery.wrap` returns)."""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ..codegen import recompile
from .modules import ChannelGate, ChannelMask, SectionGate, gate_norm

from ..plan import Plan

GATES = "vps_gates"
MASKS = "vps_masks"


def mask_index(plan: Plan, site_units, groups: list[str]) -> torch.Tensor:
    """Per channel position: 0 (no gate) or 1 + the unit's slot in cat(z of `groups`)."""
    names, group, index = plan.unit_table
    offset = np.full(len(names) + 1, -1, dtype=np.int64)  # the last entry: "no group"
    start, position = 1, {name: k for k, name in enumerate(names)}
    for name in groups:
        offset[position[name]] = start
        start += len(plan.groups[name].units)
    units = np.asarray(site_units, dtype=np.int64).reshape(-1)
    known = units < len(group)
    owner = np.where(known, group[np.where(known, units, 0)], -1)
    base = offset[owner]  # owner -1 reads the "no group" entry
    return torch.from_numpy(np.where(base >= 0, base + index[np.where(known, units, 0)], 0))


def site_groups(plan: Plan, site_units) -> list[str]:
    """The groups whose units the site's channels are, by name."""
    names, group, _ = plan.unit_table
    units = np.asarray(site_units, dtype=np.int64).reshape(-1)
    owners = np.unique(group[units[units < len(group)]])
    return sorted(names[k] for k in owners.tolist() if k >= 0)


def insert_gates(gm: fx.GraphModule, plan: Plan, init: float = 1.0) -> fx.GraphModule:
    """Mutates `gm` (a fresh trace): gate calls at the top, masks before mixing consumers,
    section gates on residual branches. Gates see the first input (for the batch size)."""
    gm.add_submodule(GATES, nn.ModuleDict())
    gm.add_submodule(MASKS, nn.ModuleDict())
    nodes = {n.name: n for n in gm.graph.nodes}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor, first = placeholders[-1], placeholders[0]

    z = {}
    for name, group in plan.groups.items():
        getattr(gm, GATES)[name] = ChannelGate(len(group.units), init, per_example=plan.per_example, name=name)
    for name, section in plan.sections.items():
        branch = nodes[section.add].args[section.branch_arg]
        getattr(gm, GATES)[name] = SectionGate(init, per_example=plan.per_example, name=name,
                                               branch_ndim=len(branch.meta["tensor_meta"].shape))
    with gm.graph.inserting_after(anchor):
        for name in reversed(list(plan.groups) + list(plan.sections)):
            z[name] = gm.graph.call_module(f"{GATES}.{name}", (first,))

    for name, site in plan.sites.items():
        used = site_groups(plan, site.axis.units)
        consumer = nodes[site.node]
        if site.kind == "norm":  # the norm itself takes the gates: statistics over active channels
            gate_norm(gm.get_submodule(consumer.target), mask_index(plan, site.axis.units, used))
            consumer.args = (consumer.args[0], *[z[g] for g in used])
            continue
        getattr(gm, MASKS)[name] = ChannelMask(mask_index(plan, site.axis.units, used), site.axis.dim)
        with gm.graph.inserting_before(consumer):
            masked = gm.graph.call_module(f"{MASKS}.{name}", (consumer.args[site.arg], *[z[g] for g in used]))
        consumer.update_arg(site.arg, masked)

    for name, section in plan.sections.items():
        add = nodes[section.add]
        with gm.graph.inserting_before(add):
            gated = gm.graph.call_function(operator.mul, (add.args[section.branch_arg], z[name]))
        add.update_arg(section.branch_arg, gated)

    for container in (getattr(gm, GATES), getattr(gm, MASKS)):  # the new modules take the model's mode (an
        container.train(gm.training)  # eval model stays deterministic); the others keep theirs
    gm.graph.lint()
    recompile(gm)
    return gm
