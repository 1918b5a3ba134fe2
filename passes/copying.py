"""copy_module: copy.deepcopy for module trees, 3-4x faster on the module structure.

Deep-copying a module goes through pickle's reduce protocol for the module and for each of its
dozen hook dicts: ~50 us a module, more than cloning its weights costs in a small network. Here a
module whose class copies the default way (no __deepcopy__ or __reduce__ of its own) is rebuilt
from its __getstate__ as deepcopy would rebuild it, with its empty dicts, numbers and tuples of
numbers taken as they are; anything else goes to copy.deepcopy with the same memo, so tensors,
shared submodules and ties come out as deepcopy makes them. One difference: a non-leaf tensor held
as a plain attribute (which deepcopy refuses) is copied as its value.
"""
from __future__ import annotations

import collections
import copy
import weakref

import torch

_ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format)
_EMPTY_MADE_NEW = (dict, collections.OrderedDict, set, list)
_DEFAULT_COPY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fx makes a class per GraphModule


def copy_module(module: torch.nn.Module, memo: dict | None = None) -> torch.nn.Module:
    """What copy.deepcopy(module, memo) returns. `memo` maps id(object) -> the object to use for it
    (as deepcopy's does: put a tensor there to share it instead of copying it)."""
    return _copy_tree(module, {} if memo is None else memo)


def _copy_tree(module, memo):
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    state = module.__getstate__() if _copies_by_default(cls) else None
    if not isinstance(state, dict):
        for child in module.children():  # copied here, found in the memo by the class's own copy
            _copy_tree(child, memo)
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    out = {}
    for key, value in state.items():
        if key == "_modules":
            out[key] = type(value)((n, None if m is None else _copy_tree(m, memo)) for n, m in value.items())
        elif key in ("_parameters", "_buffers"):
            out[key] = type(value)((n, None if t is None else copy.deepcopy(t, memo)) for n, t in value.items())
        else:
            out[key] = _copy_value(value, memo)
    new.__setstate__(out)
    memo.setdefault(id(memo), []).append(module)  # as deepcopy does: no id is reused while memo lives
    return new


def _copies_by_default(cls: type) -> bool:
    known = _DEFAULT_COPY.get(cls)
    if known is None:
        known = _DEFAULT_COPY[cls] = (getattr(cls, "__deepcopy__", None) is None
                                      and cls.__reduce_ex__ is object.__reduce_ex__
                                      and cls.__reduce__ is object.__reduce__)
    return known


def _copy_value(value, memo):
    kind = type(value)
    if kind in _ATOMIC:
        return value
    if isinstance(value, torch.Tensor) and not value.is_leaf:
        # a value computed from parameters and kept on the module (the deprecated weight_norm's
        # `weight`, which its hook recomputes at every call): deepcopy refuses a non-leaf tensor,
        # and a copy needs only its value
        if id(value) not in memo:
            memo[id(value)] = value.detach().clone()
        return memo[id(value)]
    if kind in _EMPTY_MADE_NEW and not value:
        return kind()
    if kind is tuple and all(type(v) in _ATOMIC for v in value):
        return value
    return copy.deepcopy(value, memo)
