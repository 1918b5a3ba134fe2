"""Dense training helpers for bench/bench_method.py: the same optimizer, per-step cosine schedule,
data order and evaluation as vpsurgery.fit, without gates or regulariser (so baselines differ from
fit only in what fit adds)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vpsurgery.train import autocast


def loaders(bundle, batch_size: int, seed: int):
    """Seeded shuffled train loader (same order for every method with the same seed) and val loader."""
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(bundle.train, batch_size=batch_size, shuffle=True, generator=g,
                       drop_last=len(bundle.train) > batch_size)
    val = DataLoader(bundle.val, batch_size=max(batch_size, 256))
    return train, val


def make_optimizer(params, lr: float, optimizer: str, momentum: float, weight_decay: float = 0.0):
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@torch.no_grad()
def evaluate(model, loader, dev) -> float:
    model.eval()
    correct = seen = 0
    for x, y in loader:
        x, y = x.to(dev), y.to(dev)
        with autocast(dev):
            out = model(x)
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


class DenseTrainer:
    """Cross-entropy training with fit's weight optimizer and cosine-per-step schedule over
    `total_epochs`; `replace_model` swaps in a pruned model (new optimizer, schedule continues).
    `after_backward(model)`, when set, runs between backward and the step (a sparse-training
    regulariser that edits the gradients, as Torch-Pruning's pruners do)."""

    def __init__(self, model, train_loader, val_loader, *, total_epochs: int, lr: float, optimizer: str,
                 momentum: float, dev, weight_decay: float = 0.0):
        self.model, self.train_loader, self.val_loader, self.dev = model.to(dev), train_loader, val_loader, dev
        self.lr, self.optimizer, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.after_backward = None
        self.total_steps = total_epochs * len(train_loader)
        self.step = 0
        self.epoch = 0
        self.opt = make_optimizer(self.model.parameters(), lr, optimizer, momentum, weight_decay)
        self.history: list[dict] = []

    def replace_model(self, model) -> None:
        self.model = model.to(self.dev)
        self.opt = make_optimizer(self.model.parameters(), self.lr, self.optimizer, self.momentum, self.weight_decay)

    def _lr_now(self) -> float:
        return 0.5 * self.lr * (1 + math.cos(math.pi * self.step / self.total_steps))

    def run_epoch(self) -> dict:
        t0 = time.perf_counter()
        self.model.train()
        loss_sum = correct = seen = 0
        for x, y in self.train_loader:
            x, y = x.to(self.dev), y.to(self.dev)
            for group in self.opt.param_groups:
                group["lr"] = self._lr_now()
            with autocast(self.dev):
                out = self.model(x)
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            if self.after_backward is not None:
                self.after_backward(self.model)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        val = evaluate(self.model, self.val_loader, self.dev)
        self.epoch += 1
        rec = {"epoch": self.epoch, "loss": loss_sum / seen, "train_acc": correct / seen, "val_acc": val,
               "epoch_time_s": time.perf_counter() - t0}
        self.history.append(rec)
        return rec
