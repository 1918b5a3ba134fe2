"""The deprecated `torch.nn.utils.weight_norm` (a forward pre-hook that recomputes `weight` from
`weight_g` and `weight_v` at every call) becomes `torch.nn.utils.parametrizations.weight_norm` over
the same two Parameters: the same function, in the form the rules know. With the hook, a shrink
would slice `weight` only for the hook to recompute it from the unsliced g and v at the next call;
a parametrized weight is sliced as the tensor it computes (passes/shrink/rewrite.py `_bake`).
"""
from __future__ import annotations

import torch
from torch.nn.utils import parametrizations
from torch.nn.utils.weight_norm import WeightNorm


def modernize_weight_norm(model: torch.nn.Module) -> int:
    """Rewrite every hook-based weight_norm of `model` (in place) as a parametrization holding the
    hook's g and v as they are (an optimizer over them carries on); returns how many."""
    count = 0
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if not isinstance(hook, WeightNorm):
                continue
            name = hook.name
            g, v = module._parameters.pop(name + "_g"), module._parameters.pop(name + "_v")
            del module._forward_pre_hooks[key]
            module.__dict__.pop(name, None)  # the hook's last computed weight
            module.register_parameter(name, torch.nn.Parameter(v.detach(), requires_grad=v.requires_grad))
            parametrizations.weight_norm(module, name, dim=hook.dim)  # dim -1: the hook's "dim=None"
            originals = module.parametrizations[name]
            originals.original0, originals.original1 = g, v
            count += 1
    return count
