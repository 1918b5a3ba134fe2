"""Re-estimating BatchNorm's statistics for the network that training ends with.

A BatchNorm layer's running mean and variance are exponential averages over the whole run, taken
while gates were sampled (the stochastic phase) and while structures were being removed, so at
the end they describe networks that no longer exist. Where the layer's momentum is small (torchvision
builds MNASNet with 3e-4, MobileNetV3 and EfficientNet with 1e-2) they have not even caught up with
the dense training: such a model can reach 99% training accuracy and 10% in eval mode after a short
run. The remedy (AdaBN; the usual last step of structured pruning) is one more pass over training
batches with every other layer in eval mode, averaging the batch statistics exactly (momentum=None:
a cumulative average) instead of exponentially. The pass changes only BatchNorm buffers, so the
gated network and its shrunk one stay equal (the invariant): shrink slices the same buffers.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from vpsurgery.train.precision import autocast, to_device


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, *, batches: int = 100, device=None,
                          forward=None) -> int:
    """Replace every BatchNorm's running mean and variance by their exact average over the first
    `batches` batches of `loader`, the rest of `model` in eval mode (gates at theta, dropout off).
    `forward(model, batch)` runs one batch (default: model(x) of an (x, y) batch, model(**batch)
    of a dict). Under torch.distributed the statistics are averaged over the ranks, so every rank
    ends with the same ones. Returns the number of batches used (0: no BatchNorm, or nothing to do)."""
    norms = batchnorms(model)
    if not norms or batches <= 0:
        return 0
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    used = 0
    try:
        for batch in loader:
            if used >= batches:
                break
            batch = to_device(batch, device)
            with autocast(device):
                if forward is not None:
                    forward(model, batch)
                elif isinstance(batch, Mapping):
                    model(**batch)
                else:
                    model(batch[0])
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        for m in norms:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf /= dist.get_world_size()
    return used

