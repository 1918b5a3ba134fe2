"""Where the batch dim is: per-example gate samples need dim 0 to be the batch at every tensor a
gate acts on. Shapes are propagated at a second batch size to see which tensors follow it."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture.trace import propagate_shapes


def batch_leads(gm: fx.GraphModule, acted_on: list[fx.Node], example_inputs) -> bool:
    """True when dim 0 of every node in `acted_on` is the batch (it grows with the input's)."""
    if not acted_on or not all(torch.is_tensor(t) and t.ndim > 0 for t in example_inputs):
        return True
    before = {n: tuple(n.meta["tensor_meta"].shape) for n in acted_on}
    bigger = [torch.cat([t, t[:1]]) for t in example_inputs]
    saved = {n: {k: n.meta[k] for k in ("tensor_meta", "type") if k in n.meta} for n in gm.graph.nodes}
    try:
        propagate_shapes(gm, bigger)
        after = {n: tuple(n.meta["tensor_meta"].shape) for n in acted_on}
    except Exception:
        return False  # the batch size is baked in somewhere: one sample per minibatch is safe
    finally:  # the shapes at the example, as they were (the same as propagating it again)
        for n, meta in saved.items():
            for k in ("tensor_meta", "type"):
                n.meta.pop(k, None)
            n.meta.update(meta)
    batch = example_inputs[0].shape[0]
    return all(before[n][0] == batch and after[n][0] == batch + 1 and before[n][1:] == after[n][1:]
               for n in acted_on)
