"""A flood of refused bulk connections (bad tickets) costs one log line per interval, not one each,
and the listener keeps serving real transfers."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import pytest

from ckptd.peers.bulk import MAGIC, BulkListener


def test_refused_handshakes_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        listener = BulkListener("127.0.0.1")
        port = await listener.start()

        def knock() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(MAGIC + os.urandom(16))
                assert s.recv(1) == b""  # refused: closed without a byte

        try:
            with caplog.at_level(logging.WARNING, logger="ckptd.peer"):
                for _ in range(30):
                    await asyncio.to_thread(knock)
            ticket, fut = listener.offer()  # a real ticket still gets its connection

            def connect() -> None:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(MAGIC + ticket)
            await asyncio.to_thread(connect)
            conn = await asyncio.wait_for(fut, 5)
            conn.close()
        finally:
            await listener.close()

    asyncio.run(main())
    refusals = [r for r in caplog.records if "bulk connection refused" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
