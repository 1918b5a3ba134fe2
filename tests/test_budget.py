"""Budget: the price controller moves the right way; rounding lands on the budget exactly."""
import pytest
import torch

import vpsurgery
from vpsurgery.train.budget import PriceController, round_to_budget, scheduled_target
from vpsurgery.models import get_model
from vpsurgery.train.objective import expected_cost, flat_theta, set_flat_theta


def test_schedule_runs_from_dense_to_target_fast_first():
    assert scheduled_target(0.3, 0.0) == 1.0 and scheduled_target(0.3, 1.0) == pytest.approx(0.3)
    assert scheduled_target(0.3, 2.0) == pytest.approx(0.3)
    half = scheduled_target(0.3, 0.5)
    assert 0.3 < half < 0.3 + 0.5 * 0.7  # more than half of the way after half of the ramp


def test_price_rises_above_the_goal_and_falls_below():
    c = PriceController(price=0.01, rate=0.1)
    assert c.update(share=0.6, goal=0.3) > 0.01
    up = c.price
    assert c.update(share=0.2, goal=0.3) < up
    c.load_state_dict(PriceController(price=5.0, rate=0.2).state_dict())
    assert (c.price, c.rate) == (5.0, 0.2)


@pytest.mark.parametrize("per", ["params", "flops"])
@pytest.mark.parametrize("share", [0.5, 0.25, 0.1])
def test_rounding_keeps_the_most_that_fits(per, share):
    torch.manual_seed(0)
    gm = vpsurgery.wrap(get_model("resnet20", width=0.5), torch.randn(2, 3, 16, 16))
    dense = float(expected_cost(gm, per).detach())
    n = flat_theta(gm).numel()
    set_flat_theta(gm, torch.cat([torch.ones(1), torch.rand(n - 1, generator=torch.Generator().manual_seed(2))]))
    hard, cost = round_to_budget(gm, share * dense, per)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and hard[0] == 1
    assert cost <= share * dense
    set_flat_theta(gm, hard)
    small = vpsurgery.shrink(gm)
    got = float(expected_cost(gm, per).detach())
    assert got == pytest.approx(cost)
    assert got > 0.9 * share * dense  # the largest that fits: within the +-10% band
    if per == "params":  # the emitted network has what the rounding priced
        params = sum(p.numel() for p in small.parameters())
        assert params == pytest.approx(cost, rel=0.02)


def test_ties_at_one_are_broken_by_weight_mass():
    torch.manual_seed(0)
    gm = vpsurgery.wrap(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                        torch.randn(2, 4))
    with torch.no_grad():
        gm.get_submodule("0").weight.mul_(torch.arange(1, 9).float().unsqueeze(1))  # unit i has mass ~ i^2
    dense = float(expected_cost(gm, "params").detach())
    hard, _ = round_to_budget(gm, 0.6 * dense, "params")
    kept = hard[1:].nonzero().flatten().tolist()
    assert kept == list(range(8 - len(kept), 8))  # the heaviest units stay


def test_rounding_keeps_a_unit_of_every_channel_group():
    """A group with no unit left cuts a trunk that no residual bypasses: the output would not depend
    on the input (ShuffleNet at 25% of its FLOPs ended at chance this way). The rounding keeps each
    group's best unit, and the emitted network costs what the rounding priced."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 2))
    gm = vpsurgery.wrap(net, torch.randn(2, 4))
    gates = vpsurgery.gates(gm)
    first, second = sorted(gates)
    gates[first].set(torch.full((16,), 0.05))  # the cheapest way to the budget: the whole first group
    gates[second].set(torch.linspace(0.6, 1.0, 16))
    dense = float(expected_cost(gm, "params").detach())
    hard, cost = round_to_budget(gm, 0.5 * dense, "params")
    set_flat_theta(gm, hard)
    assert all(float(g.theta.max()) == 1.0 for g in gates.values())
    assert float(gates[first].theta.sum()) == 1.0  # its best unit only
    x = torch.randn(8, 4)
    small = vpsurgery.shrink(gm)
    assert sum(p.numel() for p in small.parameters()) == pytest.approx(cost)
    assert small(x).std(0).min() > 0  # the output still depends on the input
