"""The variational regulariser of docs/method.md, as a differentiable function of weights and theta.

Every weight entry w_e is *active* when all the gates that govern it are on: the unit of each of
its channel axes (producer row, consumer column, norm entry) and the residual section its module
belongs to. Under the Bernoulli posterior, P(active) = a_e = product of those thetas. The
regulariser is

    prior='slab'            R = sum_e a_e * (w_e^2 / (2 sigma1^2) + price_e)
    prior='spike_and_slab'  R = sum_e a_e * (w_e^2 / (2 sigma1^2) + price_e) + (1 - a_e) * w_e^2 / (2 sigma0^2)

with price_e = price (per='params') or price * MACs per example of the entry (per='flops'). With
per='flops' the products of two activations (attention's q k^T and weights x v) are priced too, a
weightless term a_p * MACs_p per position p of their output's channel axis (its unit's theta, and
its section's), plus whatever part of their cost no unit takes (a constant).
Both are multilinear in theta. `objective` returns R / n_train, the per-example term that is added
to the mean minibatch loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from vpsurgery.config import PER, PRIORS, default
from vpsurgery.passes.gate.insert import GATES
from vpsurgery.passes.rules import module_rule
from vpsurgery.passes.analyse import cost as _cost
from vpsurgery.passes.attach import plan_of
from vpsurgery.passes.plan import Axis

_CACHE_KEY = "vpsurgery.objective_index"


@dataclass
class _Entry:
    """One parameter tensor: which flat-theta slots govern it, and its MACs per entry. Or, with
    qualname None, one product of two activations: the slots of its output axis' positions, the
    MACs per position, and the MACs no unit takes (`constant`)."""

    qualname: str | None
    axes: list[tuple[int, torch.Tensor]]  # (param dim, index into flat theta per position)
    section: int  # index into flat theta of its section's gate (0: always on)
    macs_per_entry: float
    constant: float = 0.0


def flat_theta(gm: fx.GraphModule) -> torch.Tensor:
    """cat([1], theta of every gate in plan order): slot 0 stands for 'no gate'."""
    gates = getattr(gm, GATES, {})
    thetas = [gates[name].theta for name in _gate_order(gm)]
    one = next(gm.parameters()).new_ones(1)
    return torch.cat([one, *[t.to(one.dtype) for t in thetas]])


def _gate_order(gm: fx.GraphModule) -> list[str]:
    plan, gates = plan_of(gm), getattr(gm, GATES, {})
    return [n for n in [*plan.groups, *plan.sections] if n in gates]


def group_slots(gm: fx.GraphModule) -> list[range]:
    """The flat-theta slots of each gated channel group's units, in plan order."""
    plan, out, offset = plan_of(gm), [], 1
    for name in _gate_order(gm):
        if name in plan.groups:
            out.append(range(offset, offset + len(plan.groups[name].units)))
        offset += len(out[-1]) if name in plan.groups else 1  # a section gate takes one slot
    return out


def section_slots(gm: fx.GraphModule) -> list[int]:
    """The flat-theta slots of the section gates."""
    return sorted(_slots(gm)[1].values())


def _slots(gm: fx.GraphModule) -> tuple[dict[int, int], dict[str, int]]:
    """Flat-theta slot of every gated unit id, and of every section gate."""
    plan, unit_slot, section_slot, offset = plan_of(gm), {}, {}, 1
    for name in _gate_order(gm):
        if name in plan.groups:
            for i, u in enumerate(plan.groups[name].units):
                unit_slot[int(u)] = offset + i
            offset += len(plan.groups[name].units)
        else:
            section_slot[name] = offset
            offset += 1
    return unit_slot, section_slot


def macs_per_weight_entry(gm: fx.GraphModule) -> dict[str, float]:
    """MACs per example per weight entry of each conv/linear module, summed over its calls (the
    one cost model, vpsurgery.passes.analyse.cost)."""
    return _cost.macs_per_weight_entry(gm)


def _build_index(gm: fx.GraphModule) -> list[_Entry]:
    plan = plan_of(gm)
    unit_slot, section_slot = _slots(gm)
    in_section = {m: section_slot[s.name] for s in plan.sections.values() if s.name in section_slot
                  for m in s.modules}
    macs = macs_per_weight_entry(gm)
    entries = []
    for mname, module in gm.named_modules():
        if mname == GATES or mname.startswith(GATES + ".") or ".parametrizations." in f".{mname}.":
            continue  # (a parametrized tensor counts once, as the tensor its layer computes: below)
        rule = module_rule(module)
        dims = rule.params(module) if rule is not None and rule.params and mname in plan.module_axes else {}
        names = [pname for pname, _ in module.named_parameters(recurse=False)]
        names += list(getattr(module, "parametrizations", {}))  # weight_norm's weight: computed from g, v
        for pname in names:
            axes = []
            for d, axis_name in dims.get(pname, {}).items():
                units = plan.module_axes[mname][axis_name].units
                axes.append((d, torch.tensor([unit_slot.get(int(u), 0) for u in units], dtype=torch.long)))
            entries.append(_Entry(f"{mname}.{pname}" if mname else pname, axes, in_section.get(mname, 0),
                                  macs.get(mname, 0.0) if pname == "weight" else 0.0))
    node_section = {n: section_slot[s.name] for s in plan.sections.values() if s.name in section_slot
                    for n in s.nodes}
    batch = _cost.graph_batch(gm.graph)
    for node in gm.graph.nodes:
        total = _cost.product_macs(node, batch)
        if not total:
            continue
        ax = plan.node_axes.get(node.name)
        if isinstance(ax, Axis) and len(ax.units):
            per = _cost.product_macs_along(node, ax.dim, total, batch)
            slots = torch.tensor([unit_slot.get(int(u), 0) for u in ax.units], dtype=torch.long)
            entries.append(_Entry(None, [(0, slots)], node_section.get(node.name, 0), per,
                                  max(total - per * len(ax.units), 0.0)))
        else:
            entries.append(_Entry(None, [], node_section.get(node.name, 0), 0.0, total))
    return entries


def _index(gm: fx.GraphModule, device: torch.device) -> list[_Entry]:
    """Built once per plan (shrinking makes a new plan) and per device."""
    plan = plan_of(gm)
    cached = gm.meta.get(_CACHE_KEY)
    if cached is None or cached[0] is not plan or cached[1] != device:
        entries = _build_index(gm)
        for e in entries:
            e.axes = [(d, idx.to(device)) for d, idx in e.axes]
        cached = (plan, device, entries)
        gm.meta[_CACHE_KEY] = cached
    return cached[2]


def active_probability(theta: torch.Tensor, entry: _Entry, ndim: int) -> torch.Tensor:
    """a_e for every entry of one parameter, broadcastable to its shape."""
    act = theta[entry.section].reshape([1] * ndim)
    for d, idx in entry.axes:
        shape = [1] * ndim
        shape[d] = -1
        act = act * theta[idx].view(shape)
    return act


def objective(gm: fx.GraphModule, n_train: int, *, price: float = default("price"),
              sigma1: float = default("sigma1"), per: str = default("per"), prior: str = default("prior"),
              sigma0: float = default("sigma0")) -> torch.Tensor:
    """The regulariser per training example, R / n_train (add it to the mean minibatch loss).
    The defaults are fit's (vpsurgery.config.FitConfig).

    price: nats per kept parameter (per='params') or per kept MAC per example (per='flops');
    sigma1: slab standard deviation (weight decay 1/(n_train sigma1^2) on active weights);
    prior='spike_and_slab' adds the spike term (1 - a_e) w_e^2 / (2 sigma0^2) (first reading of
    docs/method.md; it prunes prematurely and is kept for comparison only).
    """
    return objective_and_cost(gm, n_train, price=price, sigma1=sigma1, per=per, prior=prior, sigma0=sigma0)[0]


def objective_and_cost(gm: fx.GraphModule, n_train: int, *, price: float, sigma1: float, per: str, prior: str,
                       sigma0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective(...), expected_cost(gm, per)) from one pass over the parameters; the cost is
    detached (what a budget controller reads)."""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    if n_train <= 0:
        raise ValueError(f"n_train must be the (positive) number of training examples, got {n_train}")
    slab, spike, cost = _sums(gm, per, with_weights=True, spike=prior == "spike_and_slab")
    total = slab / (2 * sigma1 ** 2) + price * cost
    if prior == "spike_and_slab":
        total = total + spike / (2 * sigma0 ** 2)
    return total / n_train, cost.detach()


def expected_cost(gm: fx.GraphModule, per: str = "params", theta: torch.Tensor | None = None) -> torch.Tensor:
    """E[kept parameters] (per='params') or E[kept conv/linear and attention MACs per example] (per='flops') under
    the gates, sum_e a_e cost_e; differentiable in theta. With every theta at 0 or 1 it is the cost of
    the network shrink emits. `theta`: a flat theta (see flat_theta) to evaluate instead of the gates'."""
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    return _sums(gm, per, with_weights=False, theta=theta)[2]


@torch.no_grad()
def cost_without(gm: fx.GraphModule, per: str, units=(), sections=()) -> float:
    """The cost of the network left when the given units and sections are removed and everything
    else is kept (every other theta at 1)."""
    unit_slot, section_slot = _slots(gm)
    theta = torch.ones_like(flat_theta(gm).detach())
    theta[[unit_slot[int(u)] for u in units if int(u) in unit_slot]] = 0.0
    theta[[section_slot[s] for s in sections if s in section_slot]] = 0.0
    return float(expected_cost(gm, per, theta))


def weight_mass(gm: fx.GraphModule, theta: torch.Tensor | None = None) -> torch.Tensor:
    """sum_e a_e w_e^2: the squared weights expected to be kept."""
    return _sums(gm, "params", with_weights=True, theta=theta)[0]


def set_flat_theta(gm: fx.GraphModule, theta: torch.Tensor) -> None:
    """Write a flat theta (see flat_theta) back into the gates."""
    gates, offset = getattr(gm, GATES, {}), 1
    with torch.no_grad():
        for name in _gate_order(gm):
            t = gates[name].theta
            t.copy_(theta[offset:offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()


def _sums(gm, per, *, with_weights, spike=False, theta=None):
    """One pass over the parameters: (sum_e a_e w_e^2, sum_e (1 - a_e) w_e^2, sum_e a_e cost_e)."""
    params = dict(gm.named_parameters())
    device = next(iter(params.values())).device

    def tensor(qualname):  # a parameter, or a tensor a parametrization computes (weight_norm)
        if qualname in params:
            return params[qualname]
        owner, _, leaf = qualname.rpartition(".")
        return getattr(gm.get_submodule(owner) if owner else gm, leaf)

    theta = flat_theta(gm) if theta is None else theta
    slab = spikes = cost = theta.new_zeros(())
    for e in _index(gm, device):
        if e.qualname is None:  # a product of activations: MACs only
            if per == "flops":
                kept = sum((theta[idx].sum() for _, idx in e.axes), theta.new_zeros(()))
                cost = cost + theta[e.section] * (e.macs_per_entry * kept + e.constant)
            continue
        w = tensor(e.qualname)
        # Sum over the dims no gate governs first: the theta products then touch one entry per
        # (gated position, gated position), not every kernel entry.
        gated = {d for d, _ in e.axes}
        other = [d for d in range(w.ndim) if d not in gated]
        per_position = math.prod(w.shape[d] for d in other)
        act = active_probability(theta, e, w.ndim)
        entry_cost = (e.macs_per_entry if per == "flops" else 1.0) * per_position
        if entry_cost:
            kept = act.expand([w.shape[d] if d in gated else 1 for d in range(w.ndim)])
            cost = cost + entry_cost * kept.sum()
        if with_weights:
            sq = w.float().pow(2)
            sq = sq.sum(dim=other, keepdim=True) if other else sq
            slab = slab + (act * sq).sum()
            if spike:
                spikes = spikes + ((1 - act) * sq).sum()
    return slab, spikes, cost

