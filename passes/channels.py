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
        if len(a) < 2 or (a[1:] > a[:-1]).all():  # already distinct and in order (fresh ids on one side)
            return a, b
        n = max(self._next, 1)
        if n < (1 << 31):  # one int64 key per pair: sorting keys sorts the pairs
            keys = np.unique(a * n + b)
            return keys // n, keys % n
        pairs = np.unique(np.stack([a, b], axis=1), axis=0)
        return pairs[:, 0], pairs[:, 1]

    def _pairs_along(self, moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pairs of union(moved[0], moved[i]) for i = 1, 2, ..., in that order, at once."""
        n = max(self._next, 1)
        if n >= (1 << 31):
            xs, ys = zip(*(self._pairs(moved[0], moved[i]) for i in range(1, moved.shape[0])))
            return np.concatenate(xs), np.concatenate(ys)
        moved = np.asarray(moved, dtype=np.int64)
        rows = moved.reshape(moved.shape[0], -1)
        if rows.shape[0] > 2:  # a row equal to the one before it only repeats its unions (no-ops):
            # broadcast ids copied along a long dim (a class token cat onto 25k tokens) are one row
            fresh = np.r_[True, True, (rows[2:] != rows[1:-1]).any(axis=1)]
            moved = moved[fresh]
        keys = np.sort((moved[:1] * n + moved[1:]).reshape(moved.shape[0] - 1, -1), axis=1)
        first = np.ones(keys.shape, dtype=bool)  # each row's distinct pairs, rows in order
        first[:, 1:] = keys[:, 1:] != keys[:, :-1]
        keys = keys[first]
        return keys // n, keys % n

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
        roots = self._find(rows.reshape(-1)).reshape(rows.shape).tolist()
        classes = [set(r) for r in roots]  # each row's classes, in the order union_all collects them
        every = list(set().union(*classes))
        if sum(map(len, classes)) != len(every):  # a class in two rows: row after row
            for row in rows:
                self.union_all(row)
            return
        # no class is in two rows, so the rows' unions do not interact: each is _merge_set on its own
        weight = dict(zip(every, self._weight[every].tolist()))
        heads, children, totals = [], [], []
        for found in classes:
            if len(found) > 1:
                order = sorted(found, key=weight.__getitem__, reverse=True)
                heads.append(order[0])
                totals.append(sum(weight[r] for r in order))
                children += [(r, order[0]) for r in order[1:]]
        if children:
            child, head = np.array(children, dtype=np.int64).T
            self._parent[child] = head
            self._weight[np.array(heads, dtype=np.int64)] = totals

    def _merge_pairs(self, x: np.ndarray, y: np.ndarray) -> None:
        """networkx's union(x[k], y[k]) for k in order, exactly: same roots, same weights.

        The pairs are taken to the classes they join (local numbering), merged there by
        `_merge_local` (whole runs of merges at a time), and the outcome written back."""
        x = np.asarray(x, dtype=np.int64).reshape(-1)
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if not len(x):
            return
        rx, ry = self._find(x), self._find(y)
        live = rx != ry
        if not live.any():
            return
        rx, ry = rx[live], ry[live]
        ends = np.concatenate([rx, ry])
        ordered = np.sort(ends)
        if not (ordered[1:] == ordered[:-1]).any():  # no class in two pairs (a layer's fresh in-channels
            self._merge_disjoint(rx, ry)  # meeting its input's): the merges do not interact
            return
        nodes, inv = np.unique(ends, return_inverse=True)
        inv = inv.reshape(-1)
        weight = self._weight[nodes]  # a copy
        local = _merge_local(inv[:len(rx)], inv[len(rx):], weight, nodes)
        moved = local != np.arange(len(nodes))
        self._parent[nodes[moved]] = nodes[local[moved]]
        self._weight[nodes[~moved]] = weight[~moved]

    def _merge_disjoint(self, rx: np.ndarray, ry: np.ndarray) -> None:
        """networkx's union(rx[k], ry[k]) for roots no two pairs share: each pair on its own."""
        wx, wy = self._weight[rx], self._weight[ry]
        x_wins = wx > wy
        tie = np.nonzero(wx == wy)[0]
        if len(tie):
            x_wins[tie] = _first_of_pairs(rx[tie], ry[tie]) == rx[tie]
        root, child = np.where(x_wins, rx, ry), np.where(x_wins, ry, rx)
        self._parent[child] = root
        self._weight[root] = wx + wy

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
                self._merge_pairs(*self._pairs_along(moved))
        for d in range(ids.ndim):
            if d != keep and ids.shape[d] > 1:
                ids = ids.take([0], axis=d)
        return Layout(ids, keep)

    def materialize(self, layout: Layout, shape, dims=None) -> np.ndarray:
        """Broadcast the ids to the tensor's real sizes along `dims` (all dims by default)."""
        target = [layout.ids.shape[d] if (dims is not None and d not in dims) else shape[d]
                  for d in range(len(shape))]
        return np.broadcast_to(layout.ids, target).copy()


def _first_of_pair(a: int, b: int) -> int:
    """networkx's tie-break between two roots of equal weight: the first of the Python set {a, b}
    (it sorts that set by weight, stably)."""
    return next(iter({a, b}))


def _first_of_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`_first_of_pair` of each (a[k], b[k]), computed as CPython lays out a set of two ints."""
    if not _SET_ORDER_MODELLED:
        return np.array([_first_of_pair(x, y) for x, y in zip(a.tolist(), b.tolist())], dtype=np.int64)
    return _modelled_first(a, b)


def _modelled_first(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(a & 7 < _slot_of_second(a, b), a, b)


def _slot_of_second(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where {a, b} puts b: a set of two starts with 8 slots and iterates them in order; an int
    below 2**61 hashes to itself; a taken slot i sends the probe to (5i + 1 + perturb) & 7, perturb
    starting at the hash and shifted right by 5 before each step (CPython's setobject.c)."""
    slot, taken = b & 7, a & 7
    perturb = b.copy()
    clash = np.nonzero(slot == taken)[0]
    while len(clash):
        perturb[clash] >>= 5
        slot[clash] = (slot[clash] * 5 + 1 + perturb[clash]) & 7
        clash = clash[slot[clash] == taken[clash]]
    return slot


def _set_order_modelled() -> bool:
    """Does this interpreter's set order follow the model? (Checked once, on pairs that clash.)"""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**31 - 1, 4096, dtype=np.int64)
    b = np.where(np.arange(4096) % 2 == 0, a + 8 * rng.integers(1, 2**20, 4096), rng.integers(0, 2**31 - 1, 4096))
    b = np.where(b == a, b + 1, b)
    want = [_first_of_pair(x, y) for x, y in zip(a.tolist(), b.tolist())]
    return _modelled_first(a, b).tolist() == want


def _merge_local(u: np.ndarray, v: np.ndarray, weight: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Merge classes 0..m-1 along the pairs (u[k], v[k]) in order k, as networkx's union does: the
    heavier root stays, equals go to `_first_of_pair` of their `key`s (x side first). `weight` is
    updated at the roots; returns each class's root.

    Sequential in principle; done by rounds. In a round every class C takes the *run* of its
    pending pairs that nothing else can interfere with: its first pair, and then each next one as
    long as the other side is a class with no other pending pair (a leaf: a star absorbs its leaves
    in one run). A run is then one cumulative sum: C's root changes only at a pair whose leaf
    weighs at least as much as everything absorbed so far (which at least doubles the weight, so
    this happens a few times per run), and those pairs are followed one by one. Runs of different
    classes touch disjoint classes and no pair earlier than theirs is left touching them, so they
    commute with every pair still pending. Pairs whose sides have become one class are dropped.
    When rounds stop paying (chains), the rest is followed pair by pair."""
    m = len(weight)
    parent = np.arange(m)
    while len(u):
        n = len(u)
        if n <= 32:
            break
        flat = np.stack([u, v], axis=1).reshape(-1)  # occurrence 2k: x side of pair k, 2k + 1: y side
        degree = np.bincount(flat, minlength=m)
        order = np.argsort(flat, kind="stable")  # by class, then by pair
        cls, other = flat[order], flat[order ^ 1]
        pair, x_side = order >> 1, (order & 1) == 0
        head = np.nonzero(np.r_[True, cls[1:] != cls[:-1]])[0]
        group = np.cumsum(np.r_[True, cls[1:] != cls[:-1]]) - 1
        rank = np.arange(2 * n) - head[group]
        first_pair = np.full(m, -1, dtype=np.int64)
        first_pair[cls[head]] = pair[head]
        leaf_other, leaf_self = degree[other] == 1, degree[cls] == 1
        own_leaf = leaf_other & (~leaf_self | x_side)  # two leaves: the x side takes the pair
        ready = ~leaf_other & ~leaf_self & x_side & (first_pair[other] == pair)  # first of both sides
        ok = np.where(rank == 0, own_leaf | ready, own_leaf & own_leaf[head][group])
        bad = np.where(ok, 2 * n, rank)
        sel = np.nonzero(rank < np.minimum.reduceat(bad, head)[group])[0]
        if len(sel) * 8 < n:
            break
        c, d, xs, g = cls[sel], other[sel], x_side[sel], group[sel]
        wd = weight[d]
        first = np.r_[True, g[1:] != g[:-1]]
        cum = np.cumsum(wd)
        before = cum - wd
        before -= before[np.nonzero(first)[0]][np.cumsum(first) - 1]  # absorbed earlier in the run
        before += weight[c]
        heads = np.nonzero(first)[0]
        run = np.cumsum(first) - 1
        centre = c[heads]
        root = centre.copy()  # each run's root, pair after pair
        cand = np.nonzero(wd >= before)[0]  # where the root may change: a few per run
        alone = np.bincount(run[cand], minlength=len(heads))[run[cand]] == 1
        one = cand[alone]  # the run's only such pair: its root is still the centre's there
        gain = wd[one] > before[one]
        root[run[one[gain]]] = d[one[gain]]
        tie = one[~gain]
        if len(tie):
            kc, kd = key[c[tie]].tolist(), key[d[tie]].tolist()
            lost = np.array([_first_of_pair(a, b) != a if x else _first_of_pair(b, a) != a
                             for a, b, x in zip(kc, kd, xs[tie].tolist())], dtype=bool)
            root[run[tie[lost]]] = d[tie[lost]]
        for i in cand[~alone].tolist():  # in order
            r, di = run[i], d[i]
            cur = root[r]
            if wd[i] > before[i]:
                root[r] = di
            else:
                a, b = (int(key[cur]), int(key[di])) if xs[i] else (int(key[di]), int(key[cur]))
                if _first_of_pair(a, b) != key[cur]:
                    root[r] = di
        weight[root] = weight[centre] + np.add.reduceat(wd, heads)
        parent[centre] = root
        parent[d] = root[run]
        done = np.ones(n, dtype=bool)
        done[pair[sel]] = False
        u, v = parent[u[done]], parent[v[done]]
        live = u != v
        u, v = u[live], v[live]
    if len(u):
        _merge_sequential(u, v, parent, weight, key)
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up


def _merge_sequential(u: np.ndarray, v: np.ndarray, parent: np.ndarray, weight: np.ndarray,
                      key: np.ndarray) -> None:
    """`_merge_local`'s pairs one by one (u, v: current roots in `parent`, which is updated)."""
    par, w, k = parent.tolist(), weight.tolist(), key.tolist()

    def find(i):
        while par[i] != i:
            par[i] = par[par[i]]
            i = par[i]
        return i

    for a, b in zip(u.tolist(), v.tolist()):
        a, b = find(a), find(b)
        if a == b:
            continue
        if w[a] < w[b] or (w[a] == w[b] and _first_of_pair(k[a], k[b]) != k[a]):
            a, b = b, a
        par[b] = a
        w[a] += w[b]
    parent[:] = par
    weight[:] = w


_SET_ORDER_MODELLED = _set_order_modelled()
