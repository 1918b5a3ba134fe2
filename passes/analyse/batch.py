"""Where the batch dim is: per-example gate samples need dim 0 to be the batch at every tensor a
gate acts on. Shapes are propagated at a second batch size to see which tensors follow it."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture.trace import LeanRun, evaluating, on_meta, propagate_shapes, slow_to_run


def batch_leads(gm: fx.GraphModule, acted_on: list[fx.Node], example_inputs) -> bool:
    """True when dim 0 of every node in `acted_on` is the batch (it grows with the input's).

    Shapes at a second batch size show it: one example where the input has several (the cheapest
    run), confirmed at one more than the input's batch where that run is inconclusive (a graph that
    squeezes a batch of one, or fails at it)."""
    if not acted_on or not all(torch.is_tensor(t) and t.ndim > 0 for t in example_inputs):
        return True
    batch = example_inputs[0].shape[0]
    for size in ([1, batch + 1] if batch > 1 else [batch + 1]):
        verdict = _follows(gm, acted_on, example_inputs, size)
        if verdict is not None:
            return verdict
    return False  # the batch size is baked in somewhere: one sample per minibatch is safe


def _follows(gm, acted_on, example_inputs, size: int) -> bool | None:
    """Do the nodes' shapes at input batch `size` differ from the recorded ones in dim 0 only, by
    the input's change of batch? None where this run cannot tell: it failed, or a shape changed
    beyond dim 0. A dim 0 that scales with the batch by another factor (windows or heads folded
    into it) is a definite no: it is that multiple of any batch."""
    batch = example_inputs[0].shape[0]
    before = {n: tuple(n.meta["tensor_meta"].shape) for n in acted_on}
    other = [t[:size] if size <= t.shape[0] else torch.cat([t, t[:size - t.shape[0]]]) for t in example_inputs]
    try:
        after = _shapes_cheaply(gm, other, set(acted_on))
    except Exception:
        return None
    if any(after[n] is None or len(after[n]) != len(before[n]) or after[n][1:] != before[n][1:] for n in acted_on):
        return None
    if all(before[n][0] == batch and after[n][0] == size for n in acted_on):
        return True
    if any(before[n][0] != batch and after[n][0] * batch == before[n][0] * size for n in acted_on):
        return False
    return None


class _ShapesOf(LeanRun, fx.Interpreter):
    """Runs the graph keeping the shapes of `wanted` nodes only (node meta is left as it is)."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted, self.shapes = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.shapes[n] = tuple(out.shape) if torch.is_tensor(out) else None
        return out


def _shapes_cheaply(gm: fx.GraphModule, inputs, wanted: set[fx.Node]) -> dict:
    """The shapes of `wanted` at `inputs` (see _cheaply)."""
    def run(values):
        interpreter = _ShapesOf(gm, wanted)
        with evaluating(gm), torch.no_grad():
            interpreter.run(*values)
        return interpreter.shapes

    return _cheaply(gm, inputs, run)


def propagate_cheaply(gm: fx.GraphModule, inputs, *, internal: bool = False) -> None:
    """Shapes at `inputs` recorded on the graph (see _cheaply). `internal`: as in propagate_shapes
    (a failure of the real run names the node)."""
    _cheaply(gm, inputs, lambda values: propagate_shapes(gm, values, internal=internal))


def _cheaply(gm: fx.GraphModule, inputs, run):
    """run(inputs) on the meta device where a real run of the graph was slow (slow_to_run), for
    real otherwise and where meta fails (an op without a meta kernel, a tensor made on the CPU
    inside forward, a value read as a number)."""
    if slow_to_run(gm):
        try:
            with on_meta(gm):
                return run([t.to("meta") for t in inputs])
        except Exception:
            pass
    return run(inputs)
