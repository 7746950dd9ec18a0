"""How fast does ckptd's object tier move a shard to and from an S3 endpoint, against boto3?

One run, one endpoint (a moto server started in a child process on 127.0.0.1 unless
``--endpoint`` is given; credentials from the standard AWS chain, dummy ones for the local
moto), the same ``--size-mib`` bytes (default 512, random), the same part size and
concurrency on both sides, and the same client defaults (path-style addressing, botocore's
default checksum behaviour), ``--reps`` repetitions alternating which side goes first:

  boto3_upload_s     bare boto3: ``upload_fileobj`` (s3transfer multipart) from a BytesIO
  ckptd_upload_s     ``ObjectTier.put_shard`` + ``commit`` (STAGED bytes to a PERSISTED step:
                     multipart upload, shard HEAD check, create-only manifest put)
  boto3_download_s   bare boto3: ``download_fileobj`` (s3transfer ranged GETs) into a BytesIO
  ckptd_restore_s    ``ObjectTier.read_manifest`` + ``read_shard_into`` a preallocated buffer:
                     parallel ranged GETs plus crc32c verification of every chunk

Figures are medians over the reps (every sample is in the JSON); ratios are ckptd / boto3
(lower is better; the contract is <= 1.25). Both downloads are checked bit-exact. The last
line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config as BotoConfig  # noqa: E402

from ckptd.config import ObjectSection  # noqa: E402
from ckptd.integrity import chunk_crcs  # noqa: E402
from ckptd.layout import TensorEntry  # noqa: E402
from ckptd.manifest import Manifest, ShardEntry  # noqa: E402
from ckptd.tiers.object import ObjectTier  # noqa: E402

MIB = 2**20
CHUNK_BYTES = 16 * MIB  # ckptd's default crc32c chunk (memory.chunk_bytes)
MOTO_CHILD = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


def start_moto() -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-c", MOTO_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        raise SystemExit("moto server did not start")
    return proc, f"http://127.0.0.1:{port}"


def shard_entry(data: memoryview) -> ShardEntry:
    n = data.nbytes
    return ShardEntry(0, n, CHUNK_BYTES, tuple(chunk_crcs(data, CHUNK_BYTES)),
                      (TensorEntry("state", "uint8", (n,), 0, n),), {"d": [["state", {"t": 0}]]})


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--endpoint", default="", help="S3 endpoint URL (default: a moto server on loopback)")
    ap.add_argument("--bucket", default="ckptd-bench")
    ap.add_argument("--part-size-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    args = ap.parse_args()

    moto: subprocess.Popen[str] | None = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        moto, endpoint = start_moto()
    part = args.part_size_mib * MIB
    tier = ObjectTier(ObjectSection(
        enabled=True, preset="minio", endpoint_url=endpoint, bucket=args.bucket,
        prefix=f"bench-{uuid.uuid4().hex[:8]}", part_size_bytes=part, max_concurrency=args.concurrency,
    ))
    client = boto3.client("s3", endpoint_url=endpoint, config=BotoConfig(
        s3={"addressing_style": "path"}, max_pool_connections=2 * args.concurrency + 4,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    ))
    transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=args.concurrency,
                              preferred_transfer_client="classic")
    samples: dict[str, list[float]] = {k: [] for k in ("boto3_upload_s", "ckptd_upload_s", "boto3_download_s",
                                                       "ckptd_restore_s")}
    try:
        if moto is not None:
            client.create_bucket(Bucket=args.bucket)
        nbytes = args.size_mib * MIB
        data = os.urandom(nbytes)
        view = memoryview(data)
        entry = shard_entry(view)
        dst = bytearray(nbytes)
        job = "bench"
        tier.conditional_put_supported()  # the daemon probes at start-up, not per save

        def boto3_side(key: str) -> None:
            samples["boto3_upload_s"].append(timed(
                lambda: client.upload_fileobj(io.BytesIO(data), args.bucket, key, Config=transfer)))
            out = io.BytesIO()
            samples["boto3_download_s"].append(timed(
                lambda: client.download_fileobj(args.bucket, key, out, Config=transfer)))
            if out.getbuffer() != view:
                raise SystemExit("boto3 download differs")
            client.delete_object(Bucket=args.bucket, Key=key)

        def ckptd_side(step: int) -> None:
            def upload() -> None:
                tier.put_shard(job, step, entry, view)
                tier.commit(Manifest(job, step, 1, (entry,), created_unix_s=time.time()))

            def restore() -> None:
                m = tier.read_manifest(job, step)
                tier.read_shard_into(job, step, m.shard(0), memoryview(dst))

            samples["ckptd_upload_s"].append(timed(upload))
            samples["ckptd_restore_s"].append(timed(restore))
            if memoryview(dst) != view:
                raise SystemExit("ckptd restore differs")
            tier.delete(job, step)

        for rep in range(args.reps):
            key = f"{tier.base}boto3/{rep}.bin"
            if rep % 2 == 0:
                boto3_side(key)
                ckptd_side(rep + 1)
            else:
                ckptd_side(rep + 1)
                boto3_side(key)
            if not args.json:
                print(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in samples.items()), file=sys.stderr)
    finally:
        tier.close()
        if moto is not None:
            moto.kill()
            moto.wait()
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "bytes": nbytes,
        "endpoint": "moto (loopback, child process)" if moto is not None else endpoint,
        "part_size_bytes": part,
        "max_concurrency": args.concurrency,
        "reps": args.reps,
        **{k: round(v, 4) for k, v in med.items()},
        "upload_ratio": round(med["ckptd_upload_s"] / med["boto3_upload_s"], 3),
        "restore_ratio": round(med["ckptd_restore_s"] / med["boto3_download_s"], 3),
        "ckptd_upload_MBps": round(nbytes / med["ckptd_upload_s"] / 1e6, 1),
        "ckptd_restore_MBps": round(nbytes / med["ckptd_restore_s"] / 1e6, 1),
        "samples": {k: [round(x, 4) for x in v] for k, v in samples.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "boto3": boto3.__version__},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
