"""Channel identity: which positions of which tensors and parameters are "the same channel".

Every channel-bearing position gets an integer id. An id array is broadcastable to its tensor
(size 1 along dims that carry no channel identity), so an op's rule can apply the op itself to
the ids (reshape, permute, index, cat) and learn where each channel went. Rules *couple* ids with a
union-find; the classes are the prunable *units*. A unit is removed whole or kept whole.

The union-find works on numpy arrays (a parameter alone may hold millions of ids), but picks the
same root for every class as networkx's UnionFind did, merge by merge: unit numbers are the ranks
of the roots, and they are saved (kept maps, resumed runs), so they must not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Layout:
    """Where the channels of one tensor are: `ids` broadcasts to the tensor, `dim` carries them."""

    ids: np.ndarray
    dim: int | None


class ChannelSpace:
    """Allocates channel ids and couples them (a union-find by weight, as networkx's)."""

    def __init__(self):
        self._next = 0
        self._parent = np.zeros(0, dtype=np.int64)  # grown in _reserve; a root is its own parent
        self._weight = np.zeros(0, dtype=np.int64)  # class size, valid at roots
        self._pin = np.zeros(0, dtype=np.int32)  # index into `reasons` of the first pin, -1: none
        self.reasons: list[str] = []
        self._reason_code: dict[str, int] = {}
        self._producers: list[tuple[int, int, tuple[str, str]]] = []  # (first id, end, (module, axis))

    @property
    def size(self) -> int:
        """How many ids have been allocated (ids are 0..size-1)."""
        return self._next

    def _reserve(self, n: int) -> None:
        need = self._next + n
        if need <= len(self._parent):
            return
        cap = max(need, 2 * len(self._parent), 1024)
        old = len(self._parent)
        self._parent = np.concatenate([self._parent, np.arange(old, cap, dtype=np.int64)])
        self._weight = np.concatenate([self._weight, np.ones(cap - old, dtype=np.int64)])
        self._pin = np.concatenate([self._pin, np.full(cap - old, -1, dtype=np.int32)])

    def fresh(self, shape, *, producer: tuple[str, str] | None = None) -> np.ndarray:
        n = int(np.prod(shape))
        self._reserve(n)
        ids = np.arange(self._next, self._next + n, dtype=np.int64).reshape(shape)
        if producer is not None and n:
            self._producers.append((self._next, self._next + n, producer))
        self._next += n
        return ids

    def background(self, ndim: int, reason: str) -> Layout:
        """A tensor with no prunable channels (model inputs, outputs of unknown ops)."""
        ids = self.fresh((1,) * ndim)
        self.pin(ids, reason)
        return Layout(ids, None)

    # ------------------------------------------------------------------ pins and producers
    def pin(self, ids: np.ndarray, reason: str) -> None:
        """These ids may not be removed; an id keeps the first reason it was pinned for."""
        code = self._reason_code.setdefault(reason, len(self._reason_code))
        if code == len(self.reasons):
            self.reasons.append(reason)
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        flat = flat[self._pin[flat] < 0]
        self._pin[flat] = code

    def pinned(self) -> tuple[np.ndarray, np.ndarray]:
        """(pinned ids, ascending; the code in `reasons` of each one's first pin)."""
        pin = self._pin[:self._next]
        ids = np.nonzero(pin >= 0)[0]
        return ids, pin[ids]

    @property
    def pins(self) -> dict[int, str]:
        """id -> why it may not be removed (for inspection; `pinned` is the fast form)."""
        ids, codes = self.pinned()
        return {int(i): self.reasons[c] for i, c in zip(ids.tolist(), codes.tolist())}

    def producer_ids(self) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray]:
        """(ids that a module creates, ascending; the distinct producers; each id's index in them)."""
        names: dict[tuple[str, str], int] = {}
        ids, which = [], []
        for start, end, producer in self._producers:
            ids.append(np.arange(start, end, dtype=np.int64))
            which.append(np.full(end - start, names.setdefault(producer, len(names)), dtype=np.int64))
        if not ids:
            return np.zeros(0, np.int64), [], np.zeros(0, np.int64)
        return np.concatenate(ids), list(names), np.concatenate(which)

    @property
    def producers(self) -> dict[int, tuple[str, str]]:
        """id -> (module, axis) that creates it (for inspection; `producer_ids` is the fast form)."""
        ids, names, which = self.producer_ids()
        return {int(i): names[k] for i, k in zip(ids.tolist(), which.tolist())}

    # ------------------------------------------------------------------ union-find
    def _find(self, ids: np.ndarray) -> np.ndarray:
        """The roots of a 1-D array of ids (path compression for the ids asked about)."""
        parent = self._parent
        r = parent[ids]
        while True:
            up = parent[r]
            if np.array_equal(up, r):
                break
            r = up
        parent[ids] = r
        return r

    def roots(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return self._find(ids.reshape(-1)).reshape(ids.shape)

    def _pairs(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distinct (a, b) pairs of two broadcast id arrays, in lexicographic order."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        a, b = a.reshape(-1), b.reshape(-1)
        n = max(self._next, 1)
        if n < (1 << 31):  # one int64 key per pair: sorting keys sorts the pairs
            keys = np.unique(a * n + b)
            return keys // n, keys % n
        pairs = np.unique(np.stack([a, b], axis=1), axis=0)
        return pairs[:, 0], pairs[:, 1]

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple a[i] with b[i] (broadcast), pair by pair in lexicographic order."""
        self._merge_pairs(*self._pairs(a, b))

    def union_all(self, ids: np.ndarray) -> None:
        flat = np.unique(ids)
        if len(flat) > 1:
            self._merge_set(flat.tolist())

    def union_rows(self, rows: np.ndarray) -> None:
        """union_all of each row of a 2-D array, row after row (grouped convs, GroupNorm)."""
        rows = np.sort(np.asarray(rows, dtype=np.int64), axis=1)
        if rows.shape[1] == 2:  # union_all of two ids is the union of the smaller with the larger
            self._merge_pairs(rows[:, 0], rows[:, 1])
            return
        for row in rows:
            self.union_all(row)

    def _merge_pairs(self, x: np.ndarray, y: np.ndarray) -> None:
        """networkx's union(x[k], y[k]) for k in order. Pairs whose classes no earlier pair of the
        batch touches merge independently, so they are linked together; a chain (one class met by
        several pairs) is followed pair by pair."""
        while len(x):
            rx, ry = self._find(x), self._find(y)
            live = rx != ry
            if not live.all():
                x, y, rx, ry = x[live], y[live], rx[live], ry[live]
            if not len(x):
                return
            n = _independent_prefix(rx, ry)
            if n >= 16:
                self._link(rx[:n], ry[:n])
            else:
                n = min(len(x), 256)
                for i, j in zip(x[:n].tolist(), y[:n].tolist()):
                    self._merge_set([i, j])
            x, y = x[n:], y[n:]

    def _link(self, rx: np.ndarray, ry: np.ndarray) -> None:
        """Merge the classes of roots rx[k], ry[k] (all distinct): the heavier root stays; between
        equals, the first of the Python set {rx, ry} (networkx sorts that set by weight, stably)."""
        wx, wy = self._weight[rx], self._weight[ry]
        x_wins = wx > wy
        tie = np.nonzero(wx == wy)[0]
        if len(tie):
            x_wins[tie] = [next(iter({a, b})) == a for a, b in zip(rx[tie].tolist(), ry[tie].tolist())]
        root, other = np.where(x_wins, rx, ry), np.where(x_wins, ry, rx)
        self._weight[root] += self._weight[other]
        self._parent[other] = root

    def _merge_set(self, objects: list[int]) -> None:
        """networkx's UnionFind.union(*objects), exactly."""
        roots = sorted({int(self._find_one(x)) for x in objects}, key=lambda r: self._weight[r], reverse=True)
        root = roots[0]
        for r in roots[1:]:
            self._weight[root] += self._weight[r]
            self._parent[r] = root

    def _find_one(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            i = parent[i]
        return i

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
                # union(moved[0], moved[i]) for i = 1, 2, ...: their pairs, in that order, at once
                xs, ys = zip(*(self._pairs(moved[0], moved[i]) for i in range(1, moved.shape[0])))
                self._merge_pairs(np.concatenate(xs), np.concatenate(ys))
        for d in range(ids.ndim):
            if d != keep and ids.shape[d] > 1:
                ids = ids.take([0], axis=d)
        return Layout(ids, keep)

    def materialize(self, layout: Layout, shape, dims=None) -> np.ndarray:
        """Broadcast the ids to the tensor's real sizes along `dims` (all dims by default)."""
        target = [layout.ids.shape[d] if (dims is not None and d not in dims) else shape[d]
                  for d in range(len(shape))]
        return np.broadcast_to(layout.ids, target).copy()


def _independent_prefix(rx: np.ndarray, ry: np.ndarray) -> int:
    """How many leading pairs touch only roots that no earlier pair touches."""
    flat = np.stack([rx, ry], axis=1).reshape(-1)
    order = np.argsort(flat, kind="stable")
    repeat = order[1:][flat[order[1:]] == flat[order[:-1]]]  # later occurrences of a root
    return int(repeat.min()) // 2 if len(repeat) else len(rx)
