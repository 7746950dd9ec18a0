"""Test helper: a real S3 endpoint over HTTP (moto's ThreadedMotoServer on 127.0.0.1).

``serve_moto()`` starts the server on a free port with dummy credentials in the environment
(AWS_ACCESS_KEY_ID etc.; the user's AWS config files and proxies are hidden) and creates one
bucket; tests/conftest.py's session fixture ``moto_s3`` holds it (tests/tiers/conftest.py's
``make_tier`` builds ObjectTiers on that bucket). Shard/manifest builders make valid
ShardEntry/Manifest values over given bytes; ``keys_under`` and ``uploads_under`` list what the
bucket holds under a prefix (objects, multipart uploads in progress).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.tiers.object import ObjectTier

BUCKET = "ckptd-test"
SECRET_ACCESS_KEY = "dummy-secret-never-logged-0123456789"
ACCESS_KEY_ID = "AKIDUMMYTESTKEY00000"
MiB = 2**20


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str
    bucket: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


@contextmanager
def serve_moto() -> Iterator[MotoS3]:
    """Start the server with dummy credentials in the environment and one bucket; undo on exit."""
    mp = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", "/nonexistent/ckptd-test-aws-config")
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/ckptd-test-aws-credentials")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    listener = getattr(getattr(server, "_server", None), "socket", None)
    if isinstance(listener, socket.socket):  # accepted sockets inherit it: no Nagle/delayed-ACK stalls
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = server.get_host_and_port()
    s3 = MotoS3(f"http://{host}:{port}", BUCKET)
    s3.client().create_bucket(Bucket=BUCKET)
    try:
        yield s3
    finally:
        server.stop()
        mp.undo()


TierFactory = Callable[..., ObjectTier]


def shard_entry(rank: int, data: bytes, chunk_bytes: int = 256 * 1024) -> ShardEntry:
    """A valid entry: one uint8 tensor over the whole shard."""
    n = len(data)
    tensors = (TensorEntry("w", "uint8", (n,), 0, n),)
    tree = {"d": [["w", {"t": 0}]]}
    return ShardEntry(rank, n, chunk_bytes, tuple(chunk_crcs(data, chunk_bytes)), tensors, tree)


def manifest_of(job: str, step: int, entries: list[ShardEntry]) -> Manifest:
    return Manifest(job, step, len(entries), tuple(entries), created_unix_s=1.0, extra={"lr": 0.1})


def pattern(n: int, seed: int) -> bytes:
    """n bytes that differ per seed and per position (cheap to build, no zero pages)."""
    block = bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(65536))
    return (block * (n // len(block) + 1))[:n]


def save_step(tier: ObjectTier, job: str, step: int, shards: list[bytes], chunk_bytes: int = 256 * 1024) -> Manifest:
    entries = [shard_entry(r, d, chunk_bytes) for r, d in enumerate(shards)]
    for e, d in zip(entries, shards):
        tier.put_shard(job, step, e, memoryview(d))
    m = manifest_of(job, step, entries)
    tier.commit(m)
    return m


def read_back(tier: ObjectTier, job: str, step: int, rank: int) -> bytes:
    m = tier.read_manifest(job, step)
    e = m.shard(rank)
    buf = bytearray(e.nbytes)
    tier.read_shard_into(job, step, e, memoryview(buf))
    return bytes(buf)



def keys_under(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every object key under prefix, sorted (all pages)."""
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(o["Key"] for o in page.get("Contents", ()))
    return sorted(out)


def uploads_under(client: Any, bucket: str, prefix: str) -> list[str]:
    """The keys of the multipart uploads in progress under prefix."""
    resp = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [u["Key"] for u in resp.get("Uploads", ())]
