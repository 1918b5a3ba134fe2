"""recompile(gm): regenerate a GraphModule's Python code after a rewrite, now or, inside a
`one_recompile()` block, once at the block's end.

Generating and compiling the code costs ~8 us a node (a few ms on a mid-size network), and wrap
runs up to five rewriting passes in a row whose graphs nothing calls in between (shapes are
propagated with fx.Interpreter, which reads the graph, not the code): one recompile at the end
gives the same module.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch.fx as fx

_PENDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vps_pending_recompiles", default=None)


def recompile(gm: fx.GraphModule) -> None:
    pending = _PENDING.get()
    if pending is None:
        gm.recompile()
    else:
        pending[id(gm)] = gm


@contextlib.contextmanager
def one_recompile():
    """Every recompile(gm) inside is done once, when the block ends (also when it raises: a graph a
    pass rewrote never keeps stale code)."""
    if _PENDING.get() is not None:  # nested: the outer block does them
        yield
        return
    pending: dict = {}
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
        for gm in pending.values():
            gm.recompile()
