"""Shared helpers for the surgery tests: random hard gate assignments and THE INVARIANT.

THE INVARIANT: for any hard 0/1 assignment of the gates, in eval mode, `vpsurgery.shrink(gm)(x)`
equals `gm(x)` (max abs error <= 1e-4 * max |reference|), and the shrunk model is physically
smaller. With every theta = 1 the gated model equals the original model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import vpsurgery
from vpsurgery.passes.gate.insert import GATES, MASKS

RTOL = 1e-4


def realistic_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, so that removing a channel is visible in
    the output (torchvision's init makes some logits ~1e-10, which would make any check pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
    return model


def channel_gates(gm):
    return {k: g for k, g in vpsurgery.gates(gm).items() if g.kind == "channel"}


def section_gates(gm):
    return {k: g for k, g in vpsurgery.gates(gm).items() if g.kind == "section"}


def random_hard_gates(gm, p: float = 0.4, seed: int = 0, *, sections: float = 0.5,
                      keep_one: bool = False) -> tuple[int, int]:
    """Set every channel gate to a random 0/1 mask with round(p * size) zeros per group (at least one
    zero where the group has >= 2 units) and every section gate to 0 with probability `sections`.
    Returns (zeroed units, total units)."""
    rng = np.random.default_rng(seed)
    zeroed = total = 0
    for g in channel_gates(gm).values():
        n = g.theta.numel()
        k = int(round(p * n))
        if p > 0 and n >= 2:
            k = max(k, 1)
        if keep_one:
            k = min(k, n - 1)
        values = np.ones(n, dtype=np.float32)
        values[rng.choice(n, size=k, replace=False)] = 0.0
        g.set(torch.from_numpy(values))
        zeroed, total = zeroed + k, total + n
    for g in section_gates(gm).values():
        g.set(0.0 if rng.random() < sections else 1.0)
    return zeroed, total


def rel_err(out, ref) -> float:
    out, ref = [t.detach() for t in _flat(out)], [t.detach() for t in _flat(ref)]
    assert len(out) == len(ref)
    scale = max(max(float(r.abs().max()) for r in ref), 1e-12)
    worst = 0.0
    for o, r in zip(out, ref):
        assert o.shape == r.shape, f"shape {tuple(o.shape)} != {tuple(r.shape)}"
        worst = max(worst, float((o.double() - r.double()).abs().max()))
    return worst / scale


def _flat(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flat(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _flat(y)]
    raise TypeError(type(x))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def layer_sizes(m: nn.Module) -> dict[str, int]:
    """Parameter+buffer numel of every Conv/Linear/BN/GroupNorm module (a tensor its parametrizations
    compute, such as a weight_norm'ed weight, as the tensor it computes)."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm)

    def size(mod):
        computed = getattr(mod, "parametrizations", {})
        return (sum(t.numel() for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)))
                + sum(getattr(mod, name).numel() for name in computed))
    return {name: size(mod) for name, mod in m.named_modules() if isinstance(mod, kinds)}


def assert_no_gates(shrunk) -> None:
    for node in shrunk.graph.nodes:
        if node.op == "call_module":
            assert not node.target.startswith((GATES + ".", MASKS + ".")), node.format_node()
            mod = shrunk.get_submodule(node.target)
            assert not isinstance(mod, (vpsurgery.Gate, vpsurgery.ChannelMask)), node.format_node()
    assert not any(isinstance(m, (vpsurgery.Gate, vpsurgery.ChannelMask)) for m in shrunk.modules())


@torch.no_grad()
def assert_invariant(gm, *inputs, rtol: float = RTOL, smaller: bool | None = None):
    """shrink(gm)(x) == gm(x) in eval mode; returns the shrunk module.

    `smaller=True` also asserts the parameter count dropped and no Conv/Linear/BN/GroupNorm grew
    (every one that reads or writes a removed unit shrank)."""
    gm.eval()
    ref = gm(*inputs)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    shrunk = vpsurgery.shrink(gm).eval()
    out = shrunk(*inputs)
    err = rel_err(out, ref)
    assert err <= rtol, f"shrunk model differs from gated model: rel err {err:.3g}"
    # shrink must not modify the gated model
    after = gm.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert_no_gates(shrunk)
    if smaller:
        assert n_params(shrunk) < n_params(gm), (n_params(shrunk), n_params(gm))
        before, now = layer_sizes(gm), layer_sizes(shrunk)
        for name, size in now.items():
            if name in before:
                assert size <= before[name], f"{name} grew: {before[name]} -> {size}"
    return shrunk


@pytest.fixture
def invariant():
    return assert_invariant
