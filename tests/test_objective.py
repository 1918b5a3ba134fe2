"""The regulariser: values and gradients checked by hand on tiny models; multilinearity in theta."""
import pytest
import torch
import torch.nn as nn

import vpsurgery
from vpsurgery.models import get_model
from vpsurgery.train.objective import objective


def tiny(theta):
    """Linear(2, 3) - ReLU - Linear(3, 1) with one gated hidden group of 3 units."""
    torch.manual_seed(0)
    gm = vpsurgery.wrap(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), torch.randn(4, 2))
    (gate,) = vpsurgery.gates(gm).values()
    gate.set(theta)
    return gm, gate


def by_hand(gm, theta, price, sigma1, n):
    w1, b1, w2, b2 = (p.detach() for name, p in gm.named_parameters() if not name.startswith("vps_"))
    slab = lambda w: w.pow(2) / (2 * sigma1 ** 2) + price
    unit = slab(w1).sum(1) + slab(b1) + slab(w2[0])  # everything hidden unit o governs
    return (torch.dot(theta, unit) + slab(b2).sum()) / n, unit / n


def test_value_and_gradient_by_hand():
    theta = torch.tensor([1.0, 0.3, 0.0])
    gm, gate = tiny(theta)
    value = objective(gm, 10, price=0.2, sigma1=0.5)
    value.backward()
    expected, grad = by_hand(gm, theta, 0.2, 0.5, 10)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(gate.theta.grad, grad, rtol=1e-6)


def test_price_counts_expected_kept_parameters():
    gm, gate = tiny([1.0, 0.5, 0.0])
    # sigma1 huge: only the price is left; a hidden unit governs 2 + 1 + 1 = 4 parameters, b2 is 1
    value = objective(gm, 1, price=1.0, sigma1=1e8)
    assert value.item() == pytest.approx(4 * 1.5 + 1)


def test_spike_and_slab_adds_the_spike_term():
    theta = torch.tensor([1.0, 0.3, 0.0])
    gm, _ = tiny(theta)
    w1, b1, w2, _ = (p.detach() for name, p in gm.named_parameters() if not name.startswith("vps_"))
    sq = w1.pow(2).sum(1) + b1.pow(2) + w2[0].pow(2)
    spike = torch.dot(1 - theta, sq) / (2 * 0.1 ** 2)
    slab = objective(gm, 1, price=0.2, sigma1=0.5)
    both = objective(gm, 1, price=0.2, sigma1=0.5, prior="spike_and_slab", sigma0=0.1)
    assert (both - slab).item() == pytest.approx(spike.item(), rel=1e-5)


def test_multilinear_in_theta():
    """Affine in every single theta: the second difference along each coordinate is zero."""
    gm = vpsurgery.wrap(get_model("resnet20", width=0.25), torch.randn(1, 3, 8, 8))
    gates = vpsurgery.gates(gm)
    torch.manual_seed(1)
    for g in gates.values():
        g.set(torch.rand_like(g.theta))
    section = gates["sec_add_1"]
    channel = next(g for g in gates.values() if g.kind == "channel")
    for gate, i in ((section, 0), (channel, 3)):
        values = []
        for t in (0.0, 0.5, 1.0):
            with torch.no_grad():
                gate.theta[i] = t
            values.append(objective(gm, 100).item())
        assert values[1] == pytest.approx((values[0] + values[2]) / 2, rel=1e-5)


def test_section_gate_multiplies_its_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

        def forward(self, x):
            return x + self.inner(x)

    gm = vpsurgery.wrap(Block(), torch.randn(2, 4), channels=False)
    (gate,) = vpsurgery.gates(gm).values()
    assert gate.kind == "section"
    on = objective(gm, 1, price=1.0, sigma1=1e8).item()
    gate.set(0.0)
    off = objective(gm, 1, price=1.0, sigma1=1e8).item()
    assert on == pytest.approx(40) and off == pytest.approx(0)


def test_price_per_flop_uses_macs_per_example():
    gm = vpsurgery.wrap(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1)),
                        torch.randn(1, 1, 5, 5))
    value = objective(gm, 1, price=1.0, sigma1=1e8, per="flops").item()
    assert value == pytest.approx((2 * 9 + 2) * 25)  # both convs' weights, 25 output positions each


@pytest.mark.parametrize("kwargs, message", [({"prior": "laplace"}, "prior"), ({"per": "bytes"}, "per"),
                                             ({"n_train": 0}, "n_train")])
def test_bad_arguments(kwargs, message):
    gm, _ = tiny([1.0, 1.0, 1.0])
    args = {"n_train": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        objective(gm, args.pop("n_train"), **args)


@pytest.mark.parametrize("per", ["params", "flops"])
def test_expected_cost_is_the_shrunk_networks_cost_at_hard_gates(per):
    from vpsurgery.train.objective import expected_cost, macs_per_weight_entry

    def cost(m):
        if per == "params":
            return sum(p.numel() for n, p in m.named_parameters() if not n.startswith("vps_"))
        return sum(k * m.get_submodule(n).weight.numel() for n, k in macs_per_weight_entry(m).items())

    torch.manual_seed(0)
    gm = vpsurgery.wrap(get_model("resnet20", width=0.5), torch.randn(2, 3, 16, 16))
    assert float(expected_cost(gm, per).detach()) == pytest.approx(cost(gm))  # theta = 1: the dense network
    gen = torch.Generator().manual_seed(1)
    for gate in vpsurgery.gates(gm).values():
        gate.set((torch.rand(gate.theta.shape, generator=gen) > 0.4).float())
    small = vpsurgery.shrink(gm)
    assert float(expected_cost(gm, per).detach()) == pytest.approx(cost(small), rel=1e-6)
    theta = torch.rand(sum(g.theta.numel() for g in vpsurgery.gates(gm).values()) + 1, requires_grad=True)
    expected_cost(gm, per, theta).backward()
    assert theta.grad is not None and theta.grad[1:].abs().sum() > 0


def test_a_weight_normed_layer_costs_what_its_computed_weight_does():
    """The objective reads a parametrized weight (weight_norm, spectral_norm) as the tensor its layer
    computes: the expected params and MACs equal those of the same net with plain weights, under any
    gates, and the slab term regularises the computed weight."""
    from torch.nn.utils import parametrize

    from test_rules import _Reparametrized
    from vpsurgery.train.objective import expected_cost, weight_mass

    torch.manual_seed(0)
    model = _Reparametrized().eval()
    torch.manual_seed(0)
    plain = _Reparametrized().eval()  # (not a deepcopy: that shares the class parametrize made)
    for m in plain.modules():
        for name in list(getattr(m, "parametrizations", {})):
            parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    x = torch.randn(2, 3, 8, 8)
    gated, reference = vpsurgery.wrap(model, (x,)), vpsurgery.wrap(plain, (x,))
    assert set(vpsurgery.gates(gated)) == set(vpsurgery.gates(reference))
    g = torch.Generator().manual_seed(0)
    for name, gate in vpsurgery.gates(gated).items():
        value = torch.rand(gate.theta.shape, generator=g)
        gate.set(value)
        vpsurgery.gates(reference)[name].set(value)
    for per in ("params", "flops"):
        assert expected_cost(gated, per).item() == pytest.approx(expected_cost(reference, per).item(), rel=1e-6)
    assert weight_mass(gated).item() == pytest.approx(weight_mass(reference).item(), rel=1e-5)
    weight_mass(gated).backward()  # through weight_norm's g and v
    assert gated.get_submodule("a").parametrizations.weight.original1.grad is not None
