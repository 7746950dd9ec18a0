"""TLS on the peer port: a job-wide self-signed certificate, and mutual TLS with a CA. Under TLS
the bytes stay inside the gRPC stream (no plain bulk connection is offered or used)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ckptd.core.config.peers import TlsFiles
from ckptd.core.errors import TierFailed, Timeout
from tests.peer._kit import MIB, make_header, peer_client, peer_node

pytestmark = pytest.mark.timeout(60)


def self_signed(d: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.mark.parametrize("mutual", [False, True], ids=["shared-cert", "mutual-tls"])
def test_tls_push_fetch_and_refusals(tmp_path: Path, mutual: bool) -> None:
    cert, key = self_signed(tmp_path, "job-peers")
    other_cert, other_key = self_signed(tmp_path, "stranger")
    tls = TlsFiles(cert, key, cert if mutual else None)
    data = os.urandom(6 * MIB)

    async def main() -> None:
        async with peer_node(tls=tls) as node, peer_client(tls=tls) as c:
            assert node.running.bulk_port == 0 and not c.bulk
            assert (await c.ping(node.target)).node_id == "node-b"
            await c.push(node.target, make_header(data), memoryview(data), 10)
            dst = bytearray(len(data))
            await c.fetch_into(node.target, "job", 1, 0, memoryview(dst), 10)
            assert bytes(dst) == data
            for bad_tls in (None, TlsFiles(other_cert, other_key, other_cert if mutual else None)):
                async with peer_client(max_attempts=1, tls=bad_tls) as bad:  # plaintext, or an untrusted cert
                    with pytest.raises((TierFailed, Timeout)):
                        await bad.ping(node.target, deadline_s=3)
    asyncio.run(main())
