"""Functions that vpsurgery's graphs call (inserted by capture passes); each has a rule in rules.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention over (N, L, heads*head_dim) inputs (batch first)."""
    n, length, width = q.shape
    heads = width // head_dim
    q = q.view(n, length, heads, head_dim).transpose(1, 2)
    k = k.view(n, k.shape[1], heads, head_dim).transpose(1, 2)
    v = v.view(n, v.shape[1], heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, length, heads * head_dim)


torch.fx.wrap("attention_heads")  # a traced model that calls it keeps it as one call
