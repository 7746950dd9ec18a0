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

The same bytes also go through real daemons (``ckptd serve`` subprocesses, ``--no-disk``, an
``[object]`` section naming the same endpoint, bucket, part size and concurrency, their own
prefix), so the figures include everything the pipeline adds around the tier:

  ckptd_daemon_upload_s    ``CheckpointManager.save`` of the bytes (one uint8 array, so the shard
                           is exactly ``bytes`` long) to a daemon with the disk tier off, then the
                           time from ``save`` returning (STAGED) to ``wait(Level.PERSISTED)``
                           returning: the daemon's crc32c pass over the slot, the uploader's
                           verification of the slot, the multipart upload from shared memory, the
                           per-rank record, the coordinator's record listing, shard HEAD and
                           create-only manifest put. A fresh step per rep.
  ckptd_daemon_restore_s   ``CheckpointManager.restore`` of that step on a second daemon started
                           empty for this rep (its own root, socket and shm dir; same bucket and
                           prefix): listing, manifest reads, a scratch slot, parallel ranged GETs
                           with crc32c checks into it, then the client's copy into a preallocated
                           array. ``served_from`` must be "object" and the bytes exact.

Per daemon step the JSON also splits the upload at the daemon's own log lines ("STAGED on all",
"PERSISTED"): ``daemon_checksum_s`` (save return to STAGED logged), ``daemon_upload_commit_s``
(STAGED to PERSISTED logged), and gives the daemon's own ``daemon_restore_read_s``.

``--state`` chooses the bytes (bench/_object_state.py): ``random`` (incompressible, new bytes every step), ``gpt`` (a
mixed-precision GPT-like state, tests/state_factory.gpt_state: bf16 weights, fp32 master weights
and Adam moments, new values every step) or ``finetune`` (a frozen bf16 base and small adapters
that change every step, tests/state_factory.finetune_state). The tier-level side stores the state
as one shard with its tensors' dtypes (what the codecs see); the daemons get the torch state.
``--link-mbit M`` puts a rate-limited link with ``--link-latency-ms`` one-way delay
(tests/linkproxy.py) between every client (boto3, the tier, the daemons) and the store;
``--compression`` sets ``object.compression`` on the tier and the daemons.

For ``finetune``, step 1 uploads everything and later steps only what changed: the ckptd medians
are over steps 2.. (``--reps`` >= 2), boto3 uploads the raw bytes every time. The JSON's last line
also holds ``raw_bytes`` (one step), ``stored_bytes`` (what the tier-level side's last step
stored under its own keys), ``ckptd_persist_s`` (the daemon's STAGED -> PERSISTED median) and
``persist_ratio`` (over ``boto3_upload_s``), ``compress_cpu_s`` (thread CPU seconds the tier-level
side spent encoding, per step) and, for ``finetune``, ``later_step_upload_fraction`` (bytes the
daemon's steps 2.. stored under their own keys over their raw bytes; the tier-level side's is
``tier_later_step_upload_fraction``).

Figures are medians over the reps (every sample is in the JSON); ratios are ckptd / boto3
(lower is better; the contract is <= 1.25). Every download and restore is checked bit-exact.
Each rep runs the three sides in a rotated order. A table goes to stderr; the last line of
stdout is one JSON object. Daemons, their shm dirs and temp dirs are removed on exit, also after
an error or SIGTERM.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
from _object_procs import JOB, Daemon, daemon_config, start_moto  # noqa: E402
from _object_state import build_step, raw, tensors_of, zeros_like  # noqa: E402
from _util import Cleanup, raise_on_signals  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config as BotoConfig  # noqa: E402
from ckptd_client import CheckpointManager, Level  # noqa: E402

from ckptd.core.config import ObjectSection  # noqa: E402
from ckptd.core.manifest import Manifest  # noqa: E402
from ckptd.ctl.inspect import storage_json  # noqa: E402
from ckptd.tiers.object import ObjectTier  # noqa: E402
from tests.linkproxy import LinkProxy  # noqa: E402

MIB = 2**20
SLOT_ALIGN = 2 * MIB  # ckptd.memory.slots.SLOT_ALIGN_BYTES
SLOTS_PER_RANK = 3  # ckptd's default memory.slots_per_rank


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def print_table(res: dict[str, Any]) -> None:
    n = res["bytes"]
    rows = [
        ("upload", "boto3 upload_fileobj", "boto3_upload_s", None),
        ("", "ckptd ObjectTier put_shard+commit", "ckptd_upload_s", "upload_ratio"),
        ("", "ckptd daemon STAGED->PERSISTED", "ckptd_daemon_upload_s", "daemon_upload_ratio"),
        ("download", "boto3 download_fileobj", "boto3_download_s", None),
        ("", "ckptd ObjectTier read_shard_into", "ckptd_restore_s", "restore_ratio"),
        ("", "ckptd daemon restore (empty node)", "ckptd_daemon_restore_s", "daemon_restore_ratio"),
    ]
    out = [f"bench/object.py: {n / MIB:g} MiB, part {res['part_size_bytes'] / MIB:g} MiB, concurrency "
           f"{res['max_concurrency']}, {res['reps']} reps, endpoint {res['endpoint']}",
           f"{'':9} {'method':36} {'median s':>9} {'MB/s':>8} {'vs boto3':>9}"]
    for what, label, key, ratio in rows:
        v = res[key]
        r = f"{res[ratio]:.3f}" if ratio else ""
        out.append(f"{what:9} {label:36} {v:9.3f} {n / v / 1e6:8.1f} {r:>9}")
    d = res["daemon_diagnostics"]
    out.append(f"daemon upload, medians from its log: checksum {d['daemon_checksum_s']}s, verify+wake "
               f"{d['daemon_verify_s']}s, put_shard {d['daemon_put_shard_s']}s, record+commit {d['daemon_commit_s']}s, "
               f"PERSISTED logged to wait() return {d['daemon_wait_return_s']}s")
    out.append(f"daemon restore, medians: daemon read (manifest, scratch slot, ranged GETs) "
               f"{d['daemon_restore_read_s']}s, the rest (planning listings, client copy, RPCs) "
               f"{d['daemon_restore_rest_s']}s")
    print("\n".join(out), file=sys.stderr)


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--endpoint", default="", help="S3 endpoint URL (default: a moto server on loopback)")
    ap.add_argument("--bucket", default="ckptd-bench")
    ap.add_argument("--part-size-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="only the JSON line on stdout (the table goes to stderr)")
    ap.add_argument("--state", choices=("random", "gpt", "finetune"), default="random")
    ap.add_argument("--link-mbit", type=float, default=0.0, help="a link of this rate to the store (0: loopback)")
    ap.add_argument("--link-latency-ms", type=float, default=0.5, help="one-way delay of that link")
    ap.add_argument("--compression", choices=("auto", "on", "off"), default="auto")
    args = ap.parse_args()
    if args.state == "finetune" and args.reps < 2:
        ap.error("--state finetune needs --reps >= 2 (step 1 uploads everything)")
    raise_on_signals()
    load_before = [round(x, 2) for x in os.getloadavg()]

    cleanup = Cleanup()
    workdir = Path(tempfile.mkdtemp(prefix="ckptd-objbench-"))
    cleanup.add("work dir", lambda: shutil.rmtree(workdir, ignore_errors=True))
    part = args.part_size_mib * MIB
    run_id = uuid.uuid4().hex[:8]
    samples: dict[str, list[float]] = {k: [] for k in (
        "boto3_upload_s", "ckptd_upload_s", "boto3_download_s", "ckptd_restore_s",
        "ckptd_daemon_upload_s", "ckptd_daemon_restore_s", "compress_cpu_s")}
    fractions: dict[str, list[float]] = {"tier": [], "daemon": []}
    stored_last = 0
    diag: dict[str, list[float]] = {k: [] for k in (
        "daemon_checksum_s", "daemon_upload_commit_s", "daemon_verify_s", "daemon_put_shard_s", "daemon_commit_s",
        "daemon_wait_return_s", "daemon_restore_read_s", "daemon_restore_rest_s", "daemon_save_stall_s")}
    nbytes = args.size_mib * MIB
    moto: subprocess.Popen[str] | None = None
    try:
        sockdir = Path(tempfile.mkdtemp(prefix="ckob-", dir="/tmp"))  # Unix socket paths must be short
        cleanup.add("socket dir", lambda: shutil.rmtree(sockdir, ignore_errors=True))
        if args.endpoint:
            endpoint = args.endpoint
        else:
            for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
                         ("AWS_DEFAULT_REGION", "us-east-1")):
                os.environ.setdefault(k, v)
            moto, endpoint = start_moto()

            def stop_moto(p: subprocess.Popen[str] = moto) -> None:
                p.kill()
                p.wait()

            cleanup.add("moto server", stop_moto)
        store_endpoint = endpoint
        if args.link_mbit > 0:
            host, _, port = endpoint.removeprefix("http://").rstrip("/").partition(":")
            link = LinkProxy(host, int(port), args.link_mbit, args.link_latency_ms / 1000).start()
            cleanup.add("link proxy", link.stop)
            endpoint = link.url
        tier = ObjectTier(ObjectSection(
            enabled=True, preset="minio", endpoint_url=endpoint, bucket=args.bucket,
            prefix=f"bench-{run_id}", part_size_bytes=part, max_concurrency=args.concurrency,
            compression=args.compression,
        ))
        reader = ObjectTier(ObjectSection(
            enabled=True, preset="minio", endpoint_url=store_endpoint, bucket=args.bucket,
            prefix=f"bench-{run_id}-daemon"))  # reads the daemons' manifests, off the link
        cleanup.add("manifest reader", reader.close)
        cleanup.add("object tier", tier.close)
        client = boto3.client("s3", endpoint_url=endpoint, config=BotoConfig(
            s3={"addressing_style": "path"}, max_pool_connections=2 * args.concurrency + 4,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        ))
        transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=args.concurrency,
                                  preferred_transfer_client="classic")
        if moto is not None:
            client.create_bucket(Bucket=args.bucket)
        steps = {step: build_step(args.state, step, nbytes) for step in range(1, args.reps + 1)}
        nbytes = len(steps[1][2])
        tier.conditional_put_supported()  # the daemon probes at start-up, not per save

        # the daemons: A saves and uploads, a fresh empty B per rep restores
        config = workdir / "ckptd.toml"
        config.write_text(daemon_config(endpoint, args.bucket, f"bench-{run_id}-daemon", part, args.concurrency,
                                        args.compression))
        slot = -(-(nbytes + MIB) // SLOT_ALIGN) * SLOT_ALIGN  # + the daemon's own layout (alignment, tree)
        budget = (SLOTS_PER_RANK + 1) * slot
        node_a = Daemon("a", workdir, sockdir, config, budget)
        cleanup.add("daemon a", node_a.stop)
        node_a.start()
        saver = CheckpointManager(JOB, rank=0, world_size=1, addr=node_a.addr, on_error="raise")
        cleanup.add("client of daemon a", saver.close)

        def boto3_side(rep: int) -> None:
            data = steps[rep + 1][2]
            view = memoryview(data)
            key = f"{tier.base}boto3/{rep}.bin"
            samples["boto3_upload_s"].append(timed(
                lambda: client.upload_fileobj(io.BytesIO(data), args.bucket, key, Config=transfer)))
            out = io.BytesIO()
            samples["boto3_download_s"].append(timed(
                lambda: client.download_fileobj(args.bucket, key, out, Config=transfer)))
            if out.getbuffer() != view:
                raise SystemExit("boto3 download differs")
            client.delete_object(Bucket=args.bucket, Key=key)

        def ckptd_side(rep: int) -> None:
            nonlocal stored_last
            step = rep + 1
            _, entry, data = steps[step]
            view = memoryview(data)
            dst = bytearray(len(data))
            cpu0 = tier.stats.compress_cpu_s

            def upload() -> None:
                tier.put_shard(JOB, step, entry, view)
                tier.commit(Manifest(JOB, step, 1, (entry,), created_unix_s=time.time()))

            def restore() -> None:
                m = tier.read_manifest(JOB, step)
                tier.read_shard_into(JOB, step, m.shard(0), memoryview(dst))

            samples["ckptd_upload_s"].append(timed(upload))
            samples["compress_cpu_s"].append(tier.stats.compress_cpu_s - cpu0)
            storage = storage_json(tier.read_manifest(JOB, step))
            stored_last = storage["own_stored_bytes"]
            if step > 1:
                fractions["tier"].append(storage["own_stored_bytes"] / storage["logical_bytes"])
            samples["ckptd_restore_s"].append(timed(restore))
            if memoryview(dst) != view:
                raise SystemExit("ckptd restore differs")
            if args.state != "finetune":
                tier.delete(JOB, step)  # each step stands alone
            elif step > 1:
                tier.delete(JOB, step - 1)  # retention keeps the newest; its chunks stay referenced

        def daemon_side(rep: int) -> None:
            step = rep + 1
            src_state = steps[step][0]
            h = saver.save(step, src_state)
            t_staged_wall, t0 = time.time(), time.perf_counter()
            status = h.wait(Level.PERSISTED, timeout_s=1800)
            t_wait = time.perf_counter() - t0
            t_back_wall = time.time()
            if status.level != Level.PERSISTED:
                raise SystemExit(f"daemon step {step} reached {status.level}, not PERSISTED")
            samples["ckptd_daemon_upload_s"].append(t_wait)
            diag["daemon_save_stall_s"].append(h.stall_s)
            times = node_a.log_times(step)
            if "staged" in times and "persisted" in times:
                diag["daemon_checksum_s"].append(times["staged"] - t_staged_wall)
                diag["daemon_upload_commit_s"].append(times["persisted"] - times["staged"])
                diag["daemon_wait_return_s"].append(t_back_wall - times["persisted"])
                if "put_end" in times:
                    put_start = times["put_end"] - times["put_s"]
                    diag["daemon_verify_s"].append(put_start - times["staged"])
                    diag["daemon_put_shard_s"].append(times["put_s"])
                    diag["daemon_commit_s"].append(times["persisted"] - times["put_end"])
            if step > 1:
                storage = storage_json(reader.read_manifest(JOB, step))
                fractions["daemon"].append(storage["own_stored_bytes"] / storage["logical_bytes"])

            node_b = Daemon(f"b{rep}", workdir, sockdir, config, budget)  # an empty node
            try:
                node_b.start()
                state = zeros_like(src_state)
                with CheckpointManager(JOB, rank=0, world_size=1, addr=node_b.addr, on_error="raise") as m:
                    t0 = time.perf_counter()
                    got = m.restore(state)
                    samples["ckptd_daemon_restore_s"].append(time.perf_counter() - t0)
                    info = m.last_restore
                if got != step or info is None or info.served_from != "object":
                    raise SystemExit(f"daemon restore: step {got} served from "
                                     f"{info.served_from if info else None}, expected step {step} from object")
                got_t, want_t = tensors_of(state), tensors_of(src_state)
                if got_t.keys() != want_t.keys() or any(raw(got_t[k]) != raw(want_t[k]) for k in want_t):
                    raise SystemExit("daemon restore differs")
                diag["daemon_restore_read_s"].append(info.daemon_read_s)
                diag["daemon_restore_rest_s"].append(samples["ckptd_daemon_restore_s"][-1] - info.daemon_read_s)
            finally:
                node_b.stop()

        sides = [boto3_side, ckptd_side, daemon_side]
        for rep in range(args.reps):
            k = rep % len(sides)
            for side in sides[k:] + sides[:k]:
                side(rep)
            if not args.json:
                print(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in samples.items()), file=sys.stderr)
    except BaseException:
        for path in sorted(workdir.glob("*.log")):
            print(f"--- {path.name} (tail)\n{path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        cleanup.run()
    if args.state == "finetune":  # step 1 uploads everything: the ckptd figures are of the later steps
        for k in ("ckptd_upload_s", "ckptd_restore_s", "ckptd_daemon_upload_s", "ckptd_daemon_restore_s",
                  "compress_cpu_s"):
            samples[k] = samples[k][1:]
    medians = {k: statistics.median(v) for k, v in samples.items()}
    result: dict[str, Any] = {
        "bytes": nbytes,
        "state": args.state,
        "link_mbit": args.link_mbit,
        "link_latency_ms": args.link_latency_ms if args.link_mbit > 0 else 0.0,
        "compression": args.compression,
        "raw_bytes": nbytes,
        "stored_bytes": stored_last,
        "ckptd_persist_s": round(medians["ckptd_daemon_upload_s"], 4),
        "persist_ratio": round(medians["ckptd_daemon_upload_s"] / medians["boto3_upload_s"], 3),
        **({"later_step_upload_fraction": round(statistics.mean(fractions["daemon"]), 4),
            "tier_later_step_upload_fraction": round(statistics.mean(fractions["tier"]), 4)}
           if args.state == "finetune" else {}),
        "endpoint": ("moto (loopback, child process)" if moto is not None else store_endpoint)
        + (f" behind a {args.link_mbit:g} Mbit/s link" if args.link_mbit > 0 else ""),
        "part_size_bytes": part,
        "max_concurrency": args.concurrency,
        "reps": args.reps,
        **{k: round(v, 4) for k, v in medians.items()},
        "upload_ratio": round(medians["ckptd_upload_s"] / medians["boto3_upload_s"], 3),
        "restore_ratio": round(medians["ckptd_restore_s"] / medians["boto3_download_s"], 3),
        "daemon_upload_ratio": round(medians["ckptd_daemon_upload_s"] / medians["boto3_upload_s"], 3),
        "daemon_restore_ratio": round(medians["ckptd_daemon_restore_s"] / medians["boto3_download_s"], 3),
        "daemon_over_tier_upload": round(medians["ckptd_daemon_upload_s"] / medians["ckptd_upload_s"], 3),
        "daemon_over_tier_restore": round(medians["ckptd_daemon_restore_s"] / medians["ckptd_restore_s"], 3),
        "ckptd_upload_MBps": round(nbytes / medians["ckptd_upload_s"] / 1e6, 1),
        "ckptd_restore_MBps": round(nbytes / medians["ckptd_restore_s"] / 1e6, 1),
        "ckptd_daemon_upload_MBps": round(nbytes / medians["ckptd_daemon_upload_s"] / 1e6, 1),
        "ckptd_daemon_restore_MBps": round(nbytes / medians["ckptd_daemon_restore_s"] / 1e6, 1),
        "daemon_diagnostics": {k: med(v) for k, v in diag.items()},
        "samples": {k: [round(x, 4) for x in v] for k, v in {**samples, **diag}.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "boto3": boto3.__version__,
                    "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
