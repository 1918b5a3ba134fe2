"""wrap(inplace=True) and shrink(inplace=True): the model given up instead of copied, with the same
result as the copying default; the modes of submodules kept as they were; the one-pass gather that
shrink slices weights with."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import vpsurgery
from vpsurgery.passes.shrink.rewrite import gather

from conftest import random_hard_gates, realistic_stats, rel_err

X = torch.randn(2, 3, 16, 16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                                   nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        return self.fc(x.mean((2, 3)))


def _models():
    yield "net", realistic_stats(Net()).eval()
    torch.manual_seed(0)
    yield "mobilenet_v3_small", torchvision.models.mobilenet_v3_small(num_classes=10).eval()


@pytest.mark.parametrize("name,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_in_place_gives_what_the_copies_give(name, model):
    with torch.no_grad():
        dense = model(X)
    given = copy.deepcopy(model)
    copied, in_place = vpsurgery.wrap(model, (X,)), vpsurgery.wrap(given, (X,), inplace=True)
    ids = {id(p) for p in given.parameters()}
    assert ids and ids <= {id(p) for p in in_place.parameters()}  # the model's own tensors, no copy
    assert not ids & {id(p) for p in copied.parameters()}
    for seed in range(3):
        for gm in (copied, in_place):
            random_hard_gates(gm, 0.4, seed, sections=0.5)
        with torch.no_grad():
            assert torch.equal(copied.eval()(X), in_place.eval()(X))
        small = vpsurgery.shrink(copied)
        if seed < 2:  # a copy of the gated model, shrunk in place, leaves the gated model to go on with
            target = copy.deepcopy(in_place)
            out = vpsurgery.shrink(target, inplace=True)
        else:
            target = in_place
            out = vpsurgery.shrink(in_place, inplace=True)
        assert out is target
        with torch.no_grad():
            assert torch.equal(out(X), small(X))
        assert [tuple(p.shape) for p in out.parameters()] == [tuple(p.shape) for p in small.parameters()]
        assert vpsurgery.kept_map(out) == vpsurgery.kept_map(small)
    with torch.no_grad():  # the copying path left the model as it was
        assert torch.equal(model(X), dense)


def test_in_place_shrink_folds_gates_into_the_tensors_it_keeps():
    gm = vpsurgery.wrap(realistic_stats(Net()).eval(), (X,), inplace=True)
    gates = vpsurgery.gates(gm)
    for g in gates.values():
        g.set(0.7)  # kept, not removed: folded into the weights that read them
    with torch.no_grad():
        ref = gm.eval()(X)
    small = vpsurgery.shrink(gm, inplace=True)
    with torch.no_grad():
        assert rel_err(small(X), ref) <= 1e-6
    assert not any("gate" in n for n, _ in small.named_modules())


def test_a_submodule_keeps_its_own_mode():
    """A BatchNorm frozen (eval) in a model that trains stays frozen in the gated model, and the
    model is left in its modes (wrap traces in eval mode and switches back module by module)."""
    model = realistic_stats(Net()).train()
    model.stem[1].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    gm = vpsurgery.wrap(model, (X,))
    assert {n: m.training for n, m in model.named_modules()} == modes
    got = dict(gm.named_modules())
    assert got["stem.1"].training is False and got["block.1"].training is True and gm.training
    small = vpsurgery.shrink(gm)
    assert dict(small.named_modules())["stem.1"].training is False


@pytest.mark.parametrize("shape,dims", [((6, 5, 3, 3), (0, 1)), ((6, 5), (0, 1)), ((6, 5, 3), (1,)),
                                        ((6, 5, 4), (0, 2)), ((6,), (0,)), ((6, 5, 3, 3), (0, 1, 2)),
                                        ((6, 5, 4), (1, 2))])
def test_gather_is_slicing_dim_by_dim(shape, dims):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=g)
    kept = {d: torch.randperm(shape[d], generator=g)[:shape[d] - 2].sort().values for d in dims}
    ref = t
    for d in dims:
        ref = ref.index_select(d, kept[d])
    out = gather(t, kept)
    assert torch.equal(out, ref) and out.is_contiguous()
    assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_gather_of_whole_dims_is_a_copy():
    t = torch.randn(3, 4)
    out = gather(t, {0: torch.arange(3)})
    assert torch.equal(out, t) and out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
