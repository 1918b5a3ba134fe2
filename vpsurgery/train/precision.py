"""The one device set-up of vpsurgery's training code: bf16 autocast on CUDA, full precision
elsewhere (fit's training step and evaluation, BatchNorm re-estimation and the benchmarks run the
model under it), and moving a batch to the device."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def autocast(device: torch.device | str):
    """A context manager: torch.autocast to bfloat16 on a CUDA device, a no-op on any other."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(batch, dev: torch.device):
    """A batch with its tensors on `dev`: (x, y) (any tuple/list) or a dict (Mapping) of tensors."""
    move = lambda v: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v  # noqa: E731
    if isinstance(batch, Mapping):
        return {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(v) for v in batch) if isinstance(batch, list) else tuple(move(v) for v in batch)
    raise ValueError(f"a batch must be (inputs, targets) or a dict, got a {type(batch).__name__}")
