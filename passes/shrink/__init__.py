"""Shrink: remove what the gates switched off, for real (smaller tensors, fewer layers)."""
from .rewrite import Decision, ShrinkError, ShrinkResult, shrink, shrink_to, slice_module

__all__ = ["Decision", "ShrinkError", "ShrinkResult", "shrink", "shrink_to", "slice_module"]
