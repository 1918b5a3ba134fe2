"""Channel identity: which positions of which tensors and parameters are "the same channel".

Every channel-bearing position gets an integer id. An id array is broadcastable to its tensor
(size 1 along dims that carry no channel identity), so an op's rule can apply the op itself to
the ids (reshape, permute, index, cat) and learn where each channel went. Rules *couple* ids with a
union-find; the classes are the prunable *units*. A unit is removed whole or kept whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np


@dataclass
class Layout:
    """Where the channels of one tensor are: `ids` broadcasts to the tensor, `dim` carries them."""

    ids: np.ndarray
    dim: int | None


class ChannelSpace:
    """Allocates channel ids and couples them (networkx's union-find)."""

    def __init__(self):
        self._uf = nx.utils.UnionFind()
        self._next = 0
        self.pins: dict[int, str] = {}  # id -> why it may not be removed
        self.producers: dict[int, tuple[str, str]] = {}  # id -> (module, axis) that creates it

    @property
    def size(self) -> int:
        """How many ids have been allocated (ids are 0..size-1)."""
        return self._next

    def fresh(self, shape, *, producer: tuple[str, str] | None = None) -> np.ndarray:
        n = int(np.prod(shape))
        ids = np.arange(self._next, self._next + n, dtype=np.int64).reshape(shape)
        self._next += n
        if producer is not None:
            for i in ids.ravel():
                self.producers[int(i)] = producer
        return ids

    def background(self, ndim: int, reason: str) -> Layout:
        """A tensor with no prunable channels (model inputs, outputs of unknown ops)."""
        ids = self.fresh((1,) * ndim)
        self.pin(ids, reason)
        return Layout(ids, None)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
        for x, y in pairs:
            if x != y:
                self._uf.union(int(x), int(y))

    def union_all(self, ids: np.ndarray) -> None:
        flat = np.unique(ids)
        if len(flat) > 1:
            self._uf.union(*(int(i) for i in flat))

    def pin(self, ids: np.ndarray, reason: str) -> None:
        for i in np.unique(ids):
            self.pins.setdefault(int(i), reason)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(ids, return_inverse=True)
        parents = self._uf.parents  # ids never unioned are their own root (and not stored)
        found = np.array([self._uf[int(i)] if int(i) in parents else int(i) for i in uniq], dtype=np.int64)
        return found[inverse].reshape(ids.shape)

    def normalize(self, ids: np.ndarray, prefer: int | None) -> Layout:
        """Make the units vary along one dim only, so removing a unit removes whole slices.

        Ids that vary along several dims (a split channel dim, a cat along tokens) are coupled
        along all but one: `prefer` when it varies, else the innermost varying dim.
        """
        roots = self.roots(ids)
        varying = [d for d in range(ids.ndim)
                   if ids.shape[d] > 1 and not (roots == roots.take([0], axis=d)).all()]
        keep = prefer if (prefer in varying or not varying) else varying[-1]
        for d in varying:
            if d != keep:
                moved = np.moveaxis(ids, d, 0)
                for i in range(1, moved.shape[0]):
                    self.union(moved[0], moved[i])
        for d in range(ids.ndim):
            if d != keep and ids.shape[d] > 1:
                ids = ids.take([0], axis=d)
        return Layout(ids, keep)

    def materialize(self, layout: Layout, shape, dims=None) -> np.ndarray:
        """Broadcast the ids to the tensor's real sizes along `dims` (all dims by default)."""
        target = [layout.ids.shape[d] if (dims is not None and d not in dims) else shape[d]
                  for d in range(len(shape))]
        return np.broadcast_to(layout.ids, target).copy()
