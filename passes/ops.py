"""Functions and modules that vpsurgery's graphs call (inserted by capture passes); each has a rule
in rules.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
                    attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention over (N, L, heads*head_dim) inputs (batch first),
    with nn.MultiheadAttention's masks: `attn_mask` (L, S) and `key_padding_mask` (N, S), each
    boolean (True: not attended) or added to the scores. Neither has a head dim, so pruning heads
    leaves them as they are. `dropout_p` drops attention weights; `is_causal` masks the future (as
    scaled_dot_product_attention's, in place of the masks)."""
    n, length, width = q.shape
    heads = width // head_dim
    q = q.view(n, length, heads, head_dim).transpose(1, 2)
    k = k.view(n, k.shape[1], heads, head_dim).transpose(1, 2)
    v = v.view(n, v.shape[1], heads, head_dim).transpose(1, 2)
    mask = None if attn_mask is None else _additive(attn_mask, q.dtype)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, q.dtype).view(n, 1, 1, k.shape[2])
        mask = padding if mask is None else mask + padding
    if is_causal:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(n, length, heads * head_dim)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: masked) as scores to add (-inf where masked), as MultiheadAttention reads it."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


torch.fx.wrap("attention_heads")  # a traced model that calls it keeps it as one call


class AttentionHeads(nn.Module):
    """attention_heads as a layer, so that its dropout follows train() and eval() as
    nn.MultiheadAttention's does (a function in a traced graph cannot read the mode)."""

    def __init__(self, head_dim: int, dropout: float = 0.0, is_causal: bool = False):
        super().__init__()
        self.head_dim, self.dropout, self.is_causal = head_dim, dropout, is_causal

    def forward(self, q, k, v, attn_mask=None, key_padding_mask=None):
        return attention_heads(q, k, v, self.head_dim, attn_mask, key_padding_mask,
                               self.dropout if self.training else 0.0, self.is_causal)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, dropout={self.dropout}, is_causal={self.is_causal}"
