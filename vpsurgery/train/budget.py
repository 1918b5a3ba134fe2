"""A budget instead of a price: keep a given share of the dense model's parameters or FLOPs.

The regulariser's price c multiplies the expected kept cost C(theta) = sum_e a_e cost_e
(docs/method.md). Asking for C <= target * C_dense makes c a Lagrange multiplier: `PriceController`
raises it while the expected share is above the (scheduled) target and lowers it below, by a
multiplicative step (c stays positive and its scale, which differs per model, loss and data size,
is found rather than given). `round_to_budget` is the final, exact step: it chooses which
structures the rounded network keeps, in the order of their theta, so that its cost is the largest
that fits the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from vpsurgery.train.objective import expected_cost, flat_theta, group_slots, section_slots, weight_mass


def scheduled_target(target: float, progress: float) -> float:
    """The share to aim at when `progress` (0..1) of the ramp is done: cubic from 1 to `target`,
    fast at first, so that most of the removal happens early (the papers' point) and the last
    part of the ramp moves slowly enough for the weights to follow."""
    p = min(max(progress, 0.0), 1.0)
    return target + (1.0 - target) * (1.0 - p) ** 3


@dataclass
class PriceController:
    """Dual ascent on log(price): log c += rate * clip((share - goal) / goal, -1, 1) per step."""

    price: float
    rate: float

    def update(self, share: float, goal: float) -> float:
        gap = max(-1.0, min(1.0, (share - goal) / max(goal, 1e-12)))
        self.price = min(max(self.price * math.exp(self.rate * gap), 1e-12), 1e12)
        return self.price

    def state_dict(self) -> dict:
        return {"price": self.price, "rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        self.price, self.rate = float(state["price"]), float(state["rate"])


@torch.no_grad()
def round_to_budget(gm: fx.GraphModule, budget: float, per: str, *,
                    sections: bool = True) -> tuple[torch.Tensor, float]:
    """A 0/1 flat theta whose network costs at most `budget` (absolute params or MACs) and is the
    largest such prefix of the structures ranked by theta; ties (e.g. theta still at 1 after a short
    run) are broken by the weight mass each structure governs per unit of its cost; every channel
    group keeps at least its best-ranked unit. Returns the hard flat theta (slot 0 is the constant
    1) and its cost. sections=False: the section gates are kept (rounded to 1). If even the least
    it may keep is over budget, returns that assignment: the caller reports the target as out of
    reach."""
    theta = flat_theta(gm).detach().clone().requires_grad_(True)
    with torch.enable_grad():  # d/d theta_s of the sums: what structure s governs
        grad_mass = torch.autograd.grad(weight_mass(gm, theta), theta)[0]
        grad_cost = torch.autograd.grad(expected_cost(gm, per, theta), theta)[0]
    value = theta.detach()[1:]
    mass_per_cost = grad_mass[1:] / grad_cost[1:].clamp_min(1e-12)
    rank = lambda i: (float(value[i]), float(mass_per_cost[i]))  # noqa: E731
    # Every channel group keeps its best unit: a group with no unit left cuts the network where the
    # group is not inside a residual branch (e.g. a trunk of concats, as in ShuffleNet), so the
    # output no longer depends on the input; removing a whole branch is what section gates are for.
    stays = {max((s - 1 for s in slots), key=rank) for slots in group_slots(gm) if len(slots)}
    if not sections:
        stays |= {s - 1 for s in section_slots(gm)}
    # ascending: the first in this order are removed first
    order = sorted((i for i in range(len(value)) if i not in stays), key=rank)

    def hard(removed: int) -> torch.Tensor:
        t = torch.ones_like(theta.detach())
        if removed:
            t[1 + torch.tensor(order[:removed])] = 0.0
        return t

    def cost_of(removed: int) -> float:
        return float(expected_cost(gm, per, hard(removed)))

    lo, hi = 0, len(order)  # cost_of is non-increasing in the number removed
    if cost_of(lo) <= budget:
        return hard(lo), cost_of(lo)
    if cost_of(hi) > budget:
        return hard(hi), cost_of(hi)
    while hi - lo > 1:  # invariant: cost_of(lo) > budget >= cost_of(hi)
        mid = (lo + hi) // 2
        if cost_of(mid) > budget:
            lo = mid
        else:
            hi = mid
    return _refill(gm, per, hard(hi), order[:hi], budget)


def _refill(gm, per, theta, removed, budget, rounds: int = 256):
    """The cut can overshoot by one big structure (a whole section): put back, in the reverse
    order of removal, the removed structures that still fit. C is multilinear, so dC/d theta_i at a
    0/1 point is exactly the cost of putting structure i back alone."""
    removed = list(reversed(removed))  # the highest-ranked first
    for _ in range(rounds):
        t = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            cost = expected_cost(gm, per, t)
            grad = torch.autograd.grad(cost, t)[0]
        gap = budget - float(cost)
        fits = next((i for i in removed if float(grad[1 + i]) <= gap), None)
        if fits is None:
            break
        theta[1 + fits] = 1.0
        removed.remove(fits)
    return theta, float(expected_cost(gm, per, theta))
