"""PruningCallback with a real lightning.Trainer on the CPU: parameters drop during training and the
smaller module goes on training; a target is met."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vpsurgery
from vpsurgery.train import kept_params

lightning = pytest.importorskip("lightning")
from vpsurgery.lightning import PruningCallback  # noqa: E402


class Module(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.model = vpsurgery.wrap(net, torch.randn(2, 64))
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.losses.append((self.current_epoch, float(loss.detach())))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)}


def digits(n=512):
    from vpsurgery.data import load_data
    data = load_data("digits").train
    x, y = data.tensors
    return DataLoader(TensorDataset(x[:n].flatten(1), y[:n]), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def test_the_callback_prunes_and_the_module_keeps_training():
    module, loader = Module(), digits()
    dense = kept_params(module.model)
    callback = PruningCallback(target=0.4, per="params", harden=0.5, prune_every=4, theta_lr=0.05)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, loader)
    small = vpsurgery.shrink(module.model)
    share = kept_params(small) / dense
    assert abs(share - 0.4) <= 0.04, share  # the budget, met by the rounding at hardening (epoch 2)
    assert module.model is callback.pruner.model and callback.pruner.hard
    assert callback.pruner.state.removed_cost[0][0] <= len(loader)  # removed physically before epoch 2 trained
    # epoch 2 trained the smaller model: the optimizer holds its parameters, and the loss went on falling
    opt = trainer.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in callback.pruner.weights()}
    assert all(p in opt.state for p in callback.pruner.weights())  # momentum carried (sliced), not reset
    first = [loss for epoch, loss in module.losses if epoch == 0][:2]
    last = [loss for epoch, loss in module.losses if epoch == 1][-2:]
    assert sum(last) < sum(first)
    assert callback.pruner.price != vpsurgery.config.default("price")
