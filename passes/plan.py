"""The Plan: everything the analysis learnt, by name, so that wrap, shrink, the objective, reports
and the CLI read the same facts. Pure data (names and numpy arrays): it pickles, deep-copies and
survives shrinking (shrink returns a restricted Plan for the smaller graph)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np


@dataclass
class Axis:
    """One channel-bearing dim of a tensor or parameter: the unit of every position along it."""

    dim: int
    units: np.ndarray  # int64, one unit id per position
    positions: np.ndarray | None = None  # where each position was in the original model

    def keep(self, removed) -> np.ndarray:
        """Positions whose unit is not in `removed`: a set of unit ids, or its `removed_mask`."""
        if not len(removed):
            return np.arange(len(self.units))
        if isinstance(removed, np.ndarray):
            inside = self.units < len(removed)
            gone = np.zeros(len(self.units), dtype=bool)
            gone[inside] = removed[self.units[inside]]
        else:
            gone = np.isin(self.units, np.fromiter(removed, dtype=np.int64, count=len(removed)))
        return np.nonzero(~gone)[0]

    def original_positions(self) -> np.ndarray:
        return np.arange(len(self.units)) if self.positions is None else self.positions

    def restrict(self, removed) -> "Axis":
        keep = self.keep(removed)
        return Axis(self.dim, self.units[keep], self.original_positions()[keep])


def removed_mask(removed) -> np.ndarray:
    """A lookup table of a set of unit ids (entry u: is u in it), for Axis.keep: shrink asks it of
    every axis, and converting a large set each time would cost more than the rest."""
    ids = np.fromiter(removed, dtype=np.int64, count=len(removed))
    mask = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=bool)
    mask[ids] = True
    return mask


@dataclass
class ChannelGroup:
    """Units (channels, or whole conv groups) that share the same producers; one gate each."""

    name: str
    units: list[int]
    producers: list[str]  # modules whose output channels these are
    params: np.ndarray  # parameters removed with each unit (first order: overlaps counted twice)
    macs: np.ndarray  # multiply-accumulates per example removed with each unit


@dataclass
class Section:
    """A residual add: `branch` (a nonlinear section) plus a linear path; gated as a whole."""

    name: str
    add: str  # the add node
    branch_arg: int  # which argument of the add is the branch
    nodes: list[str]  # nodes that exist only to compute the branch (removed with it)
    modules: list[str]
    params: int
    macs: int
    depth: int  # conv/linear layers on the branch's longest path


@dataclass
class MaskSite:
    """Where a gated channel is read by an op that combines channels: a mixing consumer's input
    (conv/linear: kind "input", the mask multiplies it), or a norm over the channel dim (kind "norm":
    its statistics are taken over the active channels)."""

    name: str
    node: str
    arg: int
    axis: Axis
    kind: str = "input"


@dataclass
class Unprunable:
    reason: str
    where: list[str]  # nodes where it happened
    producers: list[str]  # modules whose output channels it pinned


@dataclass(frozen=True)
class Plan:
    groups: dict[str, ChannelGroup]
    sections: dict[str, Section]
    node_axes: dict[str, object]  # node -> Axis, or tuple of Axis|None for tuple outputs
    module_axes: dict[str, dict[str, Axis]]  # module -> axis name -> Axis
    param_axes: dict[str, Axis]  # get_attr target -> Axis
    sites: dict[str, MaskSite]
    unprunable: list[Unprunable]
    example: list[tuple[tuple[int, ...], str]]  # shapes and dtypes of the example inputs
    prunable_share: float = 0.0  # share of conv/linear output channels that are prunable
    depth: int = 0  # conv/linear layers on the longest input-to-output path
    original_depth: int = 0
    per_example: bool = True  # dim 0 is the batch wherever a gate acts: gates sample per example
    removed_units: set[int] = field(default_factory=set)
    removed_sections: set[str] = field(default_factory=set)
    kept_anyway: frozenset[int] = frozenset()  # decided off, kept so no tensor went empty (weights read 0)
    capture: str = "fx"  # how the model became a graph: "fx" or "export"

    @cached_property
    def _unit_group(self) -> dict[int, tuple[str, int]]:
        return {u: (g.name, i) for g in self.groups.values() for i, u in enumerate(g.units)}

    def unit_group(self) -> dict[int, tuple[str, int]]:
        """unit id -> (group name, index in the group); computed once (a Plan is frozen: shrink
        makes a new, restricted one)."""
        return self._unit_group

    @cached_property
    def unit_table(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """unit_group as arrays: (group names; per unit id, its group's index in them or -1, and
        its index in the group), for lookups of whole axes at once."""
        names = list(self.groups)
        size = 1 + max((max(g.units) for g in self.groups.values() if len(g.units)), default=-1)
        group, index = np.full(size, -1, dtype=np.int64), np.zeros(size, dtype=np.int64)
        for k, g in enumerate(self.groups.values()):
            units = np.asarray(g.units, dtype=np.int64)
            group[units], index[units] = k, np.arange(len(units))
        return names, group, index

    def restrict(self, removed_units: set[int], removed_sections: set[str]) -> "Plan":
        """The plan of the graph after shrinking, before its dead nodes go (see `forget`)."""
        mask = removed_mask(removed_units)

        def axis(a):
            if a is None:
                return None
            return tuple(axis(x) for x in a) if isinstance(a, tuple) else a.restrict(mask)

        groups = {}
        for g in self.groups.values():
            keep = [i for i, u in enumerate(g.units) if u not in removed_units]
            if keep:
                groups[g.name] = replace(g, units=[g.units[i] for i in keep], params=g.params[keep],
                                         macs=g.macs[keep])
        return replace(
            self, groups=groups,
            sections={k: s for k, s in self.sections.items() if k not in removed_sections},
            node_axes={k: axis(a) for k, a in self.node_axes.items()},
            module_axes={m: {n: axis(a) for n, a in ax.items()} for m, ax in self.module_axes.items()},
            param_axes={k: axis(a) for k, a in self.param_axes.items()},
            sites={k: replace(s, axis=axis(s.axis)) for k, s in self.sites.items()},
            removed_units=self.removed_units | removed_units,
            removed_sections=self.removed_sections | removed_sections)

    def forget(self, gone_nodes: set[str], gone_modules: set[str]) -> "Plan":
        """The plan without the nodes and modules that are no longer in the graph."""
        return replace(
            self, groups={k: replace(g, producers=[p for p in g.producers if p not in gone_modules])
                          for k, g in self.groups.items()},
            sections={k: s for k, s in self.sections.items() if s.add not in gone_nodes},
            node_axes={k: a for k, a in self.node_axes.items() if k not in gone_nodes},
            module_axes={m: ax for m, ax in self.module_axes.items() if m not in gone_modules},
            sites={k: s for k, s in self.sites.items() if s.node not in gone_nodes})
