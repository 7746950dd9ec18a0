"""A network link for tests and benches: an asyncio TCP proxy with a rate limit and added latency.

``LinkProxy(upstream_host, upstream_port, rate_mbit, latency_s)`` listens on 127.0.0.1 and relays
every connection to the upstream (e.g. the moto server), so clients that use ``proxy.url`` as
their endpoint see a link of ``rate_mbit`` Mbit/s (0: unlimited) in each direction, shared by all
connections like one NIC, and ``latency_s`` of one-way delay on every byte. It runs its own event
loop in a daemon thread; ``start()`` returns once it listens, ``stop()`` closes everything.

Invariants:
- Each direction is paced by one shared schedule: a block of n bytes is released no earlier than
  n / rate after the previous one, so the sum over all connections never exceeds the rate
  (averaged over a block of at most ``BLOCK_BYTES``).
- A released block is delivered ``latency_s`` later; bounded queues (``QUEUE_BLOCKS`` per
  connection and direction) give backpressure to the sender, as a full TCP window would.
bench/object.py and the object tier tests share this one module.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Final

BLOCK_BYTES: Final = 64 * 1024
QUEUE_BLOCKS: Final = 64


class _Pacer:
    """One direction of the link: blocks leave no faster than the rate."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self._next_free = 0.0

    async def take(self, nbytes: int) -> None:
        if self.rate_bytes_per_s <= 0:
            return
        now = time.monotonic()
        start = max(now, self._next_free)
        self._next_free = start + nbytes / self.rate_bytes_per_s
        if self._next_free - now > 0.001:
            await asyncio.sleep(self._next_free - now)


class LinkProxy:
    def __init__(self, upstream_host: str, upstream_port: int, rate_mbit: float, latency_s: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rate_mbit = rate_mbit
        self.latency_s = latency_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="linkproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._up = _Pacer(rate_mbit * 1e6 / 8)
        self._down = _Pacer(rate_mbit * 1e6 / 8)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LinkProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer, self._up), self._pipe(up_reader, writer, self._down))
        except asyncio.CancelledError:
            pass  # stop(): this connection task ends here, quietly
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pacer: _Pacer) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_BLOCKS)

        async def deliver() -> None:
            while True:
                due, block = await queue.get()
                if not block:
                    with contextlib.suppress(OSError, RuntimeError):
                        dst.write_eof()
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                dst.write(block)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                block = await src.read(BLOCK_BYTES)
                if block:
                    await pacer.take(len(block))
                await queue.put((time.monotonic() + self.latency_s, block))
                if not block:
                    break
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
