"""Helpers of the peer push/fetch test modules (tests/peer/test_push_fetch.py, test_peer_refusals.py).

``run`` drives a coroutine to completion under a timeout in a fresh event loop, ``payload`` makes
reproducible bytes of a given size (a repeating pattern and a random tail), and ``BOTH_PATHS``
parametrizes a test over the two data paths: the plain-TCP bulk port and gRPC messages.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from typing import TypeVar

import pytest

T = TypeVar("T")
BOTH_PATHS = pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc"])


def run(coro: Awaitable[T], timeout_s: float = 60) -> T:
    async def main() -> T:
        async with asyncio.timeout(timeout_s):
            return await coro
    return asyncio.run(main())


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed) & 0xFF for i in range(256)) * (n // 256) + os.urandom(n % 256)
