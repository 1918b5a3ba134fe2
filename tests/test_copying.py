"""copy_module returns what copy.deepcopy returns, faster."""
import copy

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

from vpsurgery.passes.copying import copy_module


def _storages(m):
    return {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.again = self.shared  # one module under two names
        self.head = nn.Linear(4, 4)
        self.head.weight = self.shared.weight  # a tied parameter
        self.widths = [4, 4]  # a mutable attribute
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x):
        return self.head(self.again(self.shared(x)))


def test_same_as_deepcopy_on_a_torchvision_model():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).train()
    ours, theirs = copy_module(model), copy.deepcopy(model)
    assert type(ours) is type(model) and ours.training
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    assert not _storages(ours) & _storages(model)  # nothing shared with the original
    x = torch.randn(2, 3, 32, 32)
    ours.eval(), model.eval()
    assert torch.equal(ours(x), model(x))
    with torch.no_grad():
        next(ours.parameters()).add_(1.0)
    assert not torch.equal(next(ours.parameters()), next(model.parameters()))


def test_shared_modules_ties_and_mutable_attributes():
    model = Tied()
    new = copy_module(model)
    assert new.shared is new.again and new.shared is not model.shared
    assert new.head.weight is new.shared.weight and new.head.weight is not model.shared.weight
    assert new.widths == [4, 4] and new.widths is not model.widths
    x = torch.randn(3, 4)
    assert torch.equal(new(x), model(x))


def test_memo_shares_the_tensors_it_names():
    model = Tied()
    keep = {id(model.shared.weight): model.shared.weight}
    new = copy_module(model, keep)
    assert new.shared.weight is model.shared.weight and new.head.weight is model.shared.weight
    assert new.shared.bias is not model.shared.bias


def test_hooks_are_copied():
    model = nn.Sequential(nn.Linear(4, 4))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(m))
    new = copy_module(model)
    new(torch.randn(1, 4))
    assert seen == [new[0]]


@pytest.mark.parametrize("make", [lambda: nn.LSTM(4, 8, num_layers=2), lambda: nn.MultiheadAttention(8, 2)],
                         ids=["lstm", "mha"])
def test_layers_with_their_own_state_protocol(make):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    new = copy_module(model)
    assert not _storages(new) & _storages(model)
    x = torch.randn(5, 1, 4 if isinstance(model[0], nn.LSTM) else 8)
    out = new[0](x) if isinstance(model[0], nn.LSTM) else new[0](x, x, x)
    ref = model[0](x) if isinstance(model[0], nn.LSTM) else model[0](x, x, x)
    assert torch.equal(out[0], ref[0])


def test_a_graph_module_keeps_its_graph_and_code():
    gm = fx.symbolic_trace(Tied())
    new = copy_module(gm)
    assert isinstance(new, fx.GraphModule) and new.graph is not gm.graph
    assert new.code == gm.code and new.shared is not gm.shared
    x = torch.randn(2, 4)
    assert torch.equal(new(x), gm(x))


def test_copying_graph_modules_keeps_none_of_their_classes_alive():
    import gc
    import weakref

    from vpsurgery.passes import copying
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    cls = weakref.ref(type(gm))  # fx makes a class per GraphModule
    copy_module(gm)
    del gm
    gc.collect()
    assert cls() is None
    assert len(copying._DEFAULT_COPY) < 100
