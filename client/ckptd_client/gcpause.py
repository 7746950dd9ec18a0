"""Pause Python's cyclic garbage collector across a burst of allocations on the hot path.

Flattening a state or restoring into it allocates a few small objects per tensor (views, tree
nodes, layout entries). With 10^5 tensors that is 10^5-10^6 allocations, which trigger the
collector's full passes over a heap that holds the whole training program: measured, a third to
a half of a 100,000-tensor restore's client time went to collections that freed nothing (the
objects are all alive until the call ends). ``paused()`` disables the collector for the call and
restores its previous state afterwards; reference counting still frees everything as usual,
and any cycles made meanwhile are collected by the next pass after it.

Invariants: the collector's enabled/disabled state after the block is what it was before it
(also when the block raises); nesting is safe (an inner block leaves it disabled).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


__all__ = ["paused"]
