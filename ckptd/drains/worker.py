"""The one shape of every background task of the daemon: owned, kicked, stopped with a deadline.

A ``Worker`` subclass implements ``_run``; the daemon calls ``start()`` once, ``kick()`` whenever
there may be work, and awaits ``stop(timeout_s)`` on shutdown, which lets the task finish its
current work within the deadline and cancels it after.
"""

from __future__ import annotations

import asyncio


class Worker:
    name = "worker"

    def __init__(self) -> None:
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)
        self.kick()

    def kick(self) -> None:
        self._wakeup.set()

    async def _wait_kick(self, timeout_s: float | None = None) -> None:
        """Wait for a kick (or timeout_s), then clear it."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=timeout_s)
        except TimeoutError:
            pass
        self._wakeup.clear()

    async def stop(self, timeout_s: float) -> bool:
        """Let the task finish within timeout_s, else cancel it; True if nothing was abandoned."""
        self._stopping = True
        self.kick()
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout_s)
            return True
        except TimeoutError:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            return False

    async def _run(self) -> None:
        raise NotImplementedError
