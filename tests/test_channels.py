"""ChannelSpace's union-find picks networkx's roots, merge by merge (unit numbers are saved in kept
maps, so they must not depend on which of its fast paths a merge took)."""
import numpy as np
import pytest
from networkx.utils import UnionFind

from vpsurgery.passes.channels import _SET_ORDER_MODELLED, ChannelSpace, _first_of_pair, _first_of_pairs


def _replay(seed: int):
    rng = np.random.default_rng(seed)
    space, uf, arrays = ChannelSpace(), UnionFind(), []
    for _ in range(int(rng.integers(5, 25))):
        op = int(rng.integers(0, 7))
        if op == 0 or not arrays:
            ids = space.fresh((int(rng.integers(1, 300)),))
            for i in ids.tolist():
                uf[i]  # networkx adds an element on first lookup
            arrays.append(ids)
            continue
        x, y = arrays[rng.integers(len(arrays))], arrays[rng.integers(len(arrays))]
        n = min(len(x), len(y))
        if op >= 5:  # rows of a grouped conv: classes in one row only (5), or shared between rows (6)
            width = int(rng.integers(3, 9))
            rows = (rng.permutation(x) if op == 5 else rng.choice(x, len(x)))[:len(x) // width * width]
            rows = rows.reshape(-1, width)
            space.union_rows(rows)
            for row in np.sort(rows, axis=1).tolist():
                uf.union(*row)
            continue
        if op == 1:  # one to one, in order: a layer's fresh in-channels meet its input's
            a, b = x[:n], y[:n]
        elif op == 2:  # one to one, permuted (a channel shuffle)
            a, b = x[rng.permutation(len(x))[:n]], y[:n]
        elif op == 3:  # many to many (a grouped layer, a reshape)
            k = int(rng.integers(1, 3 * n + 1))
            a, b = rng.choice(x, k), rng.choice(y, k)
        else:  # broadcast against one id
            a, b = x, y[:1]
        space.union(a, b)
        for p, q in sorted(set(zip(*np.broadcast_arrays(a, b)))):
            uf.union(int(p), int(q))
    return space, uf


@pytest.mark.parametrize("seed", range(40))
def test_roots_are_networkx_roots(seed):
    space, uf = _replay(seed)
    ids = np.arange(space.size)
    assert space.roots(ids).tolist() == [uf[i] for i in ids.tolist()]


def test_first_of_pairs_is_pythons_set_order():
    assert _SET_ORDER_MODELLED  # CPython: the vectorised model of its set layout is what runs
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**31 - 1, 20000), rng.integers(0, 2**31 - 1, 20000)
    b[:5000] = a[:5000] + 8 * rng.integers(1, 100, 5000)  # same hash slot: the probe order decides
    assert _first_of_pairs(a, b).tolist() == [_first_of_pair(x, y) for x, y in zip(a.tolist(), b.tolist())]


@pytest.mark.parametrize("a,b", [((2, 96, 8, 56, 56), (2, 96, 25088)), ((2, 25088, 96), (2, 25088, 3, 32)),
                                 ((1, 8, 4), (8, 4)), ((6, 4, 1), (24,)), ((), (1,)), ((3, 1, 4), (12, 1, 1)),
                                 ((4, 6), (2, 2, 3, 2))])
def test_reshaped_ids_broadcast_to_the_materialised_reshape_and_stay_compact(a, b):
    from vpsurgery.passes.rules import reshape_ids
    rng = np.random.default_rng(0)
    for trial in range(8):  # ids vary along a random subset of the dims (size 1 elsewhere)
        shape = tuple(s if rng.random() < 0.4 else 1 for s in a)
        ids = rng.integers(0, 1000, size=shape)
        got = reshape_ids(ids, a, b)
        assert np.array_equal(np.broadcast_to(got, b), np.broadcast_to(ids, a).reshape(b))
        assert got.size <= max(np.broadcast_to(ids, a).size, 1)
    tokens = np.arange(96).reshape(1, 96, 1, 1, 1)  # channel ids only: the 25k tokens carry none
    assert reshape_ids(tokens, (2, 96, 8, 56, 56), (2, 96, 25088)).shape == (1, 96, 1)


@pytest.mark.parametrize("seed", range(12))
def test_normalize_couples_rows_as_networkx_would_repeated_rows_included(seed):
    """normalize couples row 0 with row 1, 2, ... of the dims it folds; a row equal to the one before
    it (ids broadcast along a long dim) is skipped, which must not move any root."""
    rng = np.random.default_rng(seed)
    space, uf = ChannelSpace(), UnionFind()
    base = space.fresh((int(rng.integers(2, 6)), int(rng.integers(2, 8))))
    for i in range(space.size):
        uf[i]
    rows = [base[int(rng.integers(len(base)))] for _ in range(int(rng.integers(3, 12)))]
    rows = [r for r in rows for _ in range(int(rng.integers(1, 4)))]  # runs of equal rows
    ids = np.stack(rows)  # (rows, channels): channels kept on dim 1, dim 0 folded
    space.normalize(ids, prefer=1)
    for i in range(1, len(rows)):
        for p, q in sorted(set(zip(rows[0].tolist(), rows[i].tolist()))):
            uf.union(p, q)
    assert space.roots(np.arange(space.size)).tolist() == [uf[i] for i in range(space.size)]
