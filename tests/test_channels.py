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
        op = int(rng.integers(0, 5))
        if op == 0 or not arrays:
            ids = space.fresh((int(rng.integers(1, 300)),))
            for i in ids.tolist():
                uf[i]  # networkx adds an element on first lookup
            arrays.append(ids)
            continue
        x, y = arrays[rng.integers(len(arrays))], arrays[rng.integers(len(arrays))]
        n = min(len(x), len(y))
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
