"""The pushing side of the partition test, run inside its own network namespace.

Talks to the test over stdin/stdout lines: pushes and fetches once and prints "ready"; on "cut"
pushes with a 3 s deadline and prints "failed <ErrorType> <seconds>" (or "ok"); on "healed"
pushes again with a 30 s deadline and prints "resumed <seconds>", then "fetched <bool>".
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from ckptd.core.errors import CkptdError
from ckptd.peers.client import PeerClient
from tests.peer._kit import MIB, TOKEN, make_header


async def main(target: str) -> None:
    data = os.urandom(8 * MIB)
    client = PeerClient(TOKEN, "node-a", max_attempts=20, backoff_s=0.2)
    loop = asyncio.get_running_loop()

    async def line() -> str:
        text: str = await loop.run_in_executor(None, sys.stdin.readline)
        return text.strip()

    await client.push(target, make_header(data, step=1), memoryview(data), 20)
    print("ready", flush=True)
    assert await line() == "cut"
    t0 = time.monotonic()
    try:
        await client.push(target, make_header(data, step=2), memoryview(data), 3)
        print("ok", flush=True)
    except CkptdError as exc:
        print(f"failed {type(exc).__name__} {time.monotonic() - t0:.2f}", flush=True)
    assert await line() == "healed"
    t0 = time.monotonic()
    await client.push(target, make_header(data, step=3), memoryview(data), 30)
    print(f"resumed {time.monotonic() - t0:.2f}", flush=True)
    dst = bytearray(len(data))
    await client.fetch_into(target, "job", 3, 0, memoryview(dst), 10)
    print(f"fetched {bytes(dst) == data}", flush=True)
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
