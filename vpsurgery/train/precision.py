"""The one mixed-precision set-up of vpsurgery's training code: bf16 autocast on CUDA, full
precision elsewhere. fit's training step and evaluation, and the benchmarks, run the model under it."""
from __future__ import annotations

import torch


def autocast(device: torch.device | str):
    """A context manager: torch.autocast to bfloat16 on a CUDA device, a no-op on any other."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
