"""Layer pruning: residual sections are found, gated, and removed for real."""
import warnings

import pytest
import torch
import torchvision

import vpsurgery
from vpsurgery.models import get_model
from vpsurgery.passes.analyse.sections import network_depth


def _tv(name, **kw):
    """A torchvision model whose BatchNorm statistics come from data, so outputs are O(1) (with
    torchvision's init some logits are ~1e-10 and any comparison would pass)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    return model.eval()


def _set_sections(gm, pattern):
    names = [n for n, g in vpsurgery.gates(gm).items() if g.kind == "section"]
    for i, n in enumerate(names):
        vpsurgery.gates(gm)[n].set(float(pattern(i)))
    return names


def _params(m):
    return sum(p.numel() for p in m.parameters())


CASES = [  # model, input size, sections expected at least
    (lambda: _tv("resnet18"), 64, 8),
    (lambda: _tv("resnet50"), 64, 16),
    (lambda: _tv("resnext50_32x4d"), 64, 16),
    (lambda: _tv("mobilenet_v2"), 64, 10),
    (lambda: _tv("mobilenet_v3_small"), 64, 6),
    (lambda: _tv("efficientnet_b0"), 64, 9),
    (lambda: _tv("regnet_x_400mf"), 64, 22),
    (lambda: _tv("convnext_tiny"), 64, 18),
    (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=10).eval(), 32, 4),
    (lambda: get_model("resnet56").eval(), 32, 27),
]


@pytest.mark.parametrize("case", CASES, ids=["resnet18", "resnet50", "resnext50", "mobilenet_v2",
                                            "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
                                            "convnext_tiny", "vit", "resnet56"])
def test_sections_found_and_removed_exactly(case):
    build, size, expected = case
    model = build()
    x = torch.randn(2, 3, size, size)
    gm = vpsurgery.wrap(model, (x,), channels=False).eval()
    plan = vpsurgery.plan(gm)
    assert len(plan.sections) >= expected
    off = _set_sections(gm, lambda i: i % 2)  # every other section off
    removed = [plan.sections[n] for i, n in enumerate(off) if i % 2 == 0]
    with torch.no_grad():
        ref = gm(x)
        small = vpsurgery.shrink(gm)
        out = small(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the parameter count drops by exactly the removed sections' parameters
    assert _params(model) - _params(small) == sum(s.params for s in removed)
    # the sections' compute is gone from the graph, not only masked
    names = {n.name for n in small.graph.nodes}
    for s in removed:
        assert s.add not in names
        assert not set(s.nodes) & names
    targets = {n.target for n in small.graph.nodes if n.op == "call_module"}
    for s in removed:
        assert not set(s.modules) & targets


def test_depth_goes_down_and_is_reported():
    model = get_model("resnet56").eval()
    x = torch.randn(2, 3, 32, 32)
    gm = vpsurgery.wrap(model, (x,)).eval()
    assert vpsurgery.plan(gm).depth == 56  # 55 convs + fc
    _set_sections(gm, lambda i: i >= 9)  # the whole first stage off
    small = vpsurgery.shrink(gm)
    assert network_depth(small) == 56 - 9 * 2
    assert "depth 38 conv/linear layers (was 56)" in vpsurgery.report(small)


def test_channel_and_section_gates_coexist():
    model = _tv("resnet18")
    x = torch.randn(2, 3, 64, 64)
    gm = vpsurgery.wrap(model, (x,)).eval()
    g = torch.Generator().manual_seed(3)
    for gate in vpsurgery.gates(gm).values():
        gate.set((torch.rand(gate.theta.shape, generator=g) > 0.35).float())
    with torch.no_grad():
        ref = gm(x)
        small = vpsurgery.shrink(gm)
        assert (small(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert _params(small) < _params(model)


def test_not_a_section_is_reported_not_gated():
    class TwoBranches(torch.nn.Module):  # both inputs of the add are nonlinear
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.b = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.a(x)) + torch.relu(self.b(x))

    class Broadcast(torch.nn.Module):  # shapes only match by broadcasting
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x.mean((2, 3), keepdim=True) + torch.relu(self.a(x))

    for model, reason in ((TwoBranches(), "both inputs are nonlinear"), (Broadcast(), "broadcasting")):
        gm = vpsurgery.wrap(model, (torch.randn(1, 4, 8, 8),))
        assert not vpsurgery.plan(gm).sections
        assert any(reason in u.reason for u in vpsurgery.plan(gm).unprunable)
        assert reason in vpsurgery.report(gm)


def test_add_residuals_on_plain_network():
    model = get_model("vgg16").eval()
    x = torch.randn(2, 3, 32, 32)
    plain = vpsurgery.wrap(model, (x,)).eval()
    assert not vpsurgery.plan(plain).sections
    gm = vpsurgery.wrap(model, (x,), add_residuals=True).eval()
    plan = vpsurgery.plan(gm)
    assert len(plan.sections) == 10  # the 13 convs less the 3 that change the width
    with torch.no_grad():
        assert not torch.allclose(gm(x), model(x))  # a different network until trained
        _set_sections(gm, lambda i: i % 2)
        ref = gm(x)
        small = vpsurgery.shrink(gm)
        assert (small(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert network_depth(small) == 15 - 5


def test_add_residuals_without_candidates_warns_and_leaves_model():
    model = get_model("lenet300_100").eval()
    x = torch.randn(2, 784)
    with pytest.warns(UserWarning, match="no layer of LeNet300100 preserves"):
        gm = vpsurgery.wrap(model, (x,), add_residuals=True)
    assert not vpsurgery.plan(gm).sections
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), model(x))


def test_kept_map_replays_onto_original_weights():
    model = _tv("resnet18")
    x = torch.randn(2, 3, 64, 64)
    gm = vpsurgery.wrap(model, (x,)).eval()
    g = torch.Generator().manual_seed(5)
    for gate in vpsurgery.gates(gm).values():
        gate.set((torch.rand(gate.theta.shape, generator=g) > 0.3).float())
    small = vpsurgery.shrink(gm)
    kept = vpsurgery.kept_map(small)
    replayed = vpsurgery.replay(model, kept)
    assert {k: v.shape for k, v in replayed.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    with torch.no_grad():  # all gates were hard, so folding changed nothing: same weights
        assert torch.allclose(replayed(x), small(x), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit this model"):
        vpsurgery.replay(_tv("resnet34"), kept)


# ------------------------------------------------------------- op facts where the old tables disagreed
class _PoolShortcut(torch.nn.Module):
    """A 1-D block whose shortcut is functional average pooling (linear per the one rule table; the
    old sections table knew only F.avg_pool2d / F.adaptive_avg_pool2d among the calls)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Conv1d(8, 8, 1)

    def forward(self, x):
        x = self.head(x)
        return torch.nn.functional.avg_pool1d(x, 2, ceil_mode=True) + torch.relu(self.conv(x))


def test_functional_avg_pool1d_shortcut_is_linear():
    x = torch.randn(2, 8, 16)
    gm = vpsurgery.wrap(_PoolShortcut().eval(), (x,))
    (section,) = vpsurgery.plan(gm).sections.values()
    assert section.modules == ["conv"] and section.depth == 1
    vpsurgery.gates(gm)[section.name].set(0.0)
    small = vpsurgery.shrink(gm).eval()
    with torch.no_grad():
        assert torch.allclose(small(x), gm.eval()(x), atol=1e-6)
    assert network_depth(small) == 1


class _MaxPoolShortcut(_PoolShortcut):
    def forward(self, x):
        x = self.head(x)
        return torch.nn.functional.max_pool1d(x, 2, ceil_mode=True) + torch.relu(self.conv(x))


def test_max_pool_shortcut_is_not_linear():
    gm = vpsurgery.wrap(_MaxPoolShortcut().eval(), (torch.randn(2, 8, 16),))
    assert not vpsurgery.plan(gm).sections


class _SoftsignPlain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.nn.functional.softsign(self.a(x)))


def test_add_residuals_knows_every_activation_of_the_table():
    """F.softsign (and Softsign, Tanhshrink, LogSigmoid, the shrinks, Threshold, exp/abs/clamp/...)
    are activations of the rule table; the old nonlinearity list did not have them, so no shortcut
    was added around such a layer."""
    gm = vpsurgery.wrap(_SoftsignPlain().eval(), (torch.randn(1, 4, 6, 6),), add_residuals=True)
    assert len(vpsurgery.plan(gm).sections) == 1
