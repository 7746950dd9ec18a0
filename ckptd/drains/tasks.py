"""Ownership of the daemon's short-lived background tasks, and its shutdown flag.

``TaskSet`` is handed to every component that starts a task that is not a ``Worker`` (a shard's
checksum pass, a cross-node commit): ``spawn`` tracks the task until it ends, and the daemon's
``stop`` waits for the set with a deadline (``wait``) or cancels and awaits it (``cancel``), so no
task outlives its owner. ``Shutdown`` is the one flag that says the daemon is draining: the save
path refuses new saves, and a disk drain waiting for its step's push goes ahead.

Invariants: a spawned task is in the set until it finishes; ``cancel`` returns only after every
task it cancelled has ended; exceptions of cancelled tasks are swallowed there, never raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    """Tasks spawned on behalf of one owner, awaited or cancelled by it on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout_s: float) -> None:
        """Let the tasks running now finish within ``timeout_s`` (they are not cancelled)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def cancel(self) -> None:
        """Cancel every task and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


class Shutdown:
    """Set once when the daemon starts draining for shutdown; read by whoever must react."""

    def __init__(self) -> None:
        self.draining = False
