"""Shrink: remove what the gates switched off, for real (smaller tensors, fewer layers)."""
from .rewrite import SLICES_KEY, ShrinkError, decide, shrink, slice_module

__all__ = ["SLICES_KEY", "ShrinkError", "decide", "shrink", "slice_module"]
