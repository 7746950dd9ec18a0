"""ByteBudget: bytes in flight across concurrent writers (a peer client's pushes share one).

Invariant: ``in_use_bytes`` never exceeds ``capacity_bytes`` except for one oversized request,
which is admitted alone (clamped to the capacity) so that it cannot wait forever.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    """Bytes in flight across concurrent writers; ``acquire`` waits while the budget is spent."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.in_use_bytes = 0
        self._cond = asyncio.Condition()

    async def acquire(self, nbytes: int) -> int:
        nbytes = min(nbytes, self.capacity_bytes)  # one oversized chunk may still pass, alone
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_use_bytes + nbytes <= self.capacity_bytes)
            self.in_use_bytes += nbytes
        return nbytes

    async def release(self, nbytes: int) -> None:
        async with self._cond:
            self.in_use_bytes -= nbytes
            self._cond.notify_all()
