"""ckptctl gc / rm / pin / unpin and the ``--bucket`` target, driven as a subprocess.

Against a running daemon: a pinned step survives automatic and by-hand retention and a daemon
restart; ``gc --dry-run`` lists and removes nothing; ``rm`` of the latest step refuses without
``--force`` (exit 1) and removes it with it; ``rm`` without ``--yes`` is a usage error (exit 2).
Against a bare disk root: the same pins, ``gc --max-to-keep``, and refusal while a daemon holds
the root. Against an object store (moto over HTTP) filled by a daemon with the object tier on:
``ls``/``show``/``restore``/``verify`` with ``--bucket``, a flipped byte in a shard object makes
``verify --read-data`` exit 5 naming the object key, and ``rm`` keeps the latest step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests.conftest import DaemonProc
from tests.state_factory import ramp_state
from tests.tiers._moto import MotoS3

CTL = [sys.executable, "-m", "ckptd.ctl.main"]
JOB = "adm"


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}  # AWS_* from moto_s3 kept
    env["NO_COLOR"] = "1"
    return subprocess.run([*CTL, *args], capture_output=True, text=True, env=env, timeout=120)


def ctl_rcs(*calls: list[str]) -> list[int]:
    """Exit codes of independent ckptctl calls, run side by side (each is mostly start-up time)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: ctl(*args).returncode, calls))


def ctl_json(*args: str, rc: int = 0) -> Any:
    res = ctl(*args, "-o", "json")
    assert res.returncode == rc, res.stderr
    return json.loads(res.stdout)


def state(step: int, rank: int = 0) -> dict[str, Any]:
    return ramp_state(20_000, np.float32, scale=step + 1, offset=rank, step=step)


def save(addr: str, steps: list[int], level: Level, world: int = 1) -> None:
    managers = [CheckpointManager(JOB, rank=r, world_size=world, addr=addr, on_error="raise") for r in range(world)]
    try:
        for step in steps:
            handles = [m.save(step, state(step, m.rank)) for m in managers]
            for h in handles:
                assert h.ok, h.error
            handles[-1].wait(level, timeout_s=120)
    finally:
        for m in managers:
            m.close()


def step_dir(d: DaemonProc, step: int) -> Path:
    return d.root / "data" / JOB / f"step-{step:012d}"


def disk_steps(d: DaemonProc) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (d.root / "data" / JOB).glob("step-*"))


# the documents of docs/cli.md: exact top-level keys, and a COPY's keys
GC_KEYS = {"schema", "source", "job", "dry_run", "policies", "deleted", "errors"}
RM_KEYS = {"schema", "source", "job", "step", "tier", "dry_run", "force", "deleted", "refused"}
PIN_KEYS = {"schema", "source", "job", "step", "pinned", "pins"}
COPY_KEYS = {"job", "step", "tier"}


def removals(doc: dict[str, Any]) -> list[tuple[str, int, str]]:
    """The (job, step, tier) of a gc/rm document's removals, checking the document's shape."""
    schema = doc["schema"]
    assert set(doc) == {"ckptctl.gc/v1": GC_KEYS, "ckptctl.rm/v1": RM_KEYS}[schema], doc
    assert all(set(r) == COPY_KEYS and isinstance(r["step"], int) for r in doc["deleted"])
    assert all(isinstance(m, str) for m in doc["errors" if schema == "ckptctl.gc/v1" else "refused"])
    return [(r["job"], r["step"], r["tier"]) for r in doc["deleted"]]


DISK_CONFIG = "[memory]\nchunk_bytes = \"64KiB\"\n[disk]\nmax_to_keep = 2\n"


def test_pins_gc_and_rm_against_a_daemon(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(config_text=DISK_CONFIG)
    addr = ["--addr", d.addr]
    save(d.addr, [1], Level.LOCAL_DURABLE)
    doc = ctl_json("pin", f"{JOB}@1", *addr)
    assert doc["schema"] == "ckptctl.pin/v1" and set(doc) == PIN_KEYS and doc["pinned"] and doc["pins"] == [1]
    assert (d.root / "pins" / f"{JOB}.json").is_file()
    assert ctl_rcs(["pin", f"{JOB}@99", *addr], ["pin", "nojob@1", *addr]) == [4, 4]  # not committed
    save(d.addr, [2, 3, 4], Level.LOCAL_DURABLE)
    assert disk_steps(d) == [1, 3, 4]  # automatic retention kept the pinned step
    ls = ctl_json("ls", JOB, *addr)
    assert {s["step"]: s["pinned"] for s in ls["steps"] if s["tiers"]["disk"] == "committed"} == \
        {1: True, 3: False, 4: False}
    assert "PINNED" in ctl("ls", *addr).stdout
    doc = ctl_json("gc", *addr)
    assert removals(doc) == [] and doc["errors"] == [] and doc["job"] is None
    assert doc["policies"]["disk"] == {"max_to_keep": 2, "keep_period": 0}

    # pins survive a restart (same root, same shm)
    assert d.terminate() == 0
    d = daemon_factory(root=d.root, shm_dir=d.shm_dir, config_text=DISK_CONFIG)
    addr = ["--addr", d.addr]
    assert {s["step"] for s in ctl_json("ls", JOB, *addr)["steps"] if s["pinned"]} == {1}
    assert ctl_json("unpin", f"{JOB}@1", *addr)["pins"] == []
    assert not (d.root / "pins" / f"{JOB}.json").exists()
    dry = ctl_json("gc", JOB, "--dry-run", *addr)
    assert dry["dry_run"] and removals(dry) == [(JOB, 1, "disk")]
    assert step_dir(d, 1).is_dir()  # a dry run removes nothing
    assert removals(ctl_json("gc", "--tier", "disk", *addr)) == [(JOB, 1, "disk")]
    assert disk_steps(d) == [3, 4]

    # rm: --yes is required; the latest step keeps its last copy unless --force
    res = ctl("rm", f"{JOB}@4", *addr)
    assert res.returncode == 2 and "--yes" in res.stderr
    res = ctl("rm", f"{JOB}@4", "--yes", *addr)
    assert res.returncode == 1 and "latest" in res.stderr and "--force" in res.stderr
    assert step_dir(d, 4).is_dir()
    plan = ctl_json("rm", f"{JOB}@4", "--dry-run", "--force", *addr)
    assert removals(plan) == [(JOB, 4, "memory"), (JOB, 4, "disk")] and step_dir(d, 4).is_dir()
    assert removals(ctl_json("rm", f"{JOB}@4", "--tier", "memory", "--yes", *addr)) == [(JOB, 4, "memory")]
    res = ctl("rm", f"{JOB}@4", "--tier", "disk", "--yes", *addr)  # now the last copy
    assert res.returncode == 1 and "latest" in res.stderr
    doc = ctl_json("rm", f"{JOB}@4", "--yes", "--force", *addr)
    assert removals(doc) == [(JOB, 4, "disk")] and doc["refused"] == [] and doc["tier"] is None and doc["force"]
    assert not step_dir(d, 4).exists()
    tiers = {s["step"]: s["tiers"] for s in ctl_json("ls", JOB, *addr)["steps"]}
    assert tiers[4] == {"memory": "removed", "disk": "removed"}
    # nothing left to remove; the memory tier has no policy
    assert ctl_rcs(["rm", f"{JOB}@4", "--yes", *addr], ["gc", "--tier", "memory", *addr]) == [4, 2]


def test_pins_gc_and_rm_on_a_bare_root(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(config_text=DISK_CONFIG.replace("max_to_keep = 2", "max_to_keep = 10"))
    save(d.addr, [1, 2, 3, 4], Level.LOCAL_DURABLE)
    root = ["--root", str(d.root)]
    res = ctl("pin", f"{JOB}@2", *root)  # the daemon holds the root: no changes behind its back
    assert res.returncode == 1 and "--addr" in res.stderr
    assert d.terminate() == 0
    assert ctl_json("pin", f"{JOB}@2", *root)["pins"] == [2]
    assert ctl_json("pin", f"{JOB}@latest", *root)["pins"] == [2, 4]
    assert ctl_json("unpin", f"{JOB}@4", *root)["pins"] == [2]
    assert ctl_json("pin", f"{JOB}@3", *root)["pins"] == [2, 3]
    assert [s["pinned"] for s in ctl_json("ls", *root)["steps"]] == [False, True, True, False]
    dry = ctl_json("gc", "--max-to-keep", "1", "--dry-run", *root)
    assert removals(dry) == [(JOB, 1, "disk")] and disk_steps(d) == [1, 2, 3, 4]
    assert removals(ctl_json("gc", JOB, "--max-to-keep", "1", *root)) == [(JOB, 1, "disk")]
    assert disk_steps(d) == [2, 3, 4]
    assert ctl("rm", f"{JOB}@4", "--yes", *root).returncode == 1  # latest
    res = ctl("rm", f"{JOB}@2", "--yes", "--root", str(d.root / "data"))  # pinned
    assert res.returncode == 1 and "pinned" in res.stderr
    assert ctl("rm", f"{JOB}@2", "--tier", "memory", "--yes", *root).returncode == 2
    assert removals(ctl_json("rm", f"{JOB}@3", "--yes", "--force", *root)) == [(JOB, 3, "disk")]
    assert disk_steps(d) == [2, 4]
    pins_file = d.root / "pins" / f"{JOB}.json"
    assert json.loads(pins_file.read_text())["steps"] == [2]  # the removed step's pin went with it
    # the daemon starts again on the pins the root now holds
    d = daemon_factory(root=d.root, shm_dir=d.shm_dir)
    addr = ["--addr", d.addr]
    assert {s["step"] for s in ctl_json("ls", JOB, *addr)["steps"] if s["pinned"]} == {2}
    assert ctl("rm", f"{JOB}@2", "--yes", *addr).returncode == 1
    assert (JOB, 2, "disk") in removals(ctl_json("rm", f"{JOB}@2", "--yes", "--force", *addr))
    assert not pins_file.exists() and not step_dir(d, 2).exists()


def _object_config(endpoint: str, bucket: str, prefix: str) -> str:
    return (f'[memory]\nchunk_bytes = "64KiB"\n[object]\nenabled = true\npreset = "minio"\n'
            f'endpoint_url = "{endpoint}"\nregion = "us-east-1"\nbucket = "{bucket}"\nprefix = "{prefix}"\n'
            'part_size_bytes = "5MiB"\nmax_to_keep = 3\n')


def test_bucket_target(daemon_factory: Callable[..., DaemonProc], moto_s3: MotoS3,
                       tmp_path: Path) -> None:
    prefix = f"ctl-{uuid.uuid4().hex[:8]}"
    d = daemon_factory(config_text=_object_config(moto_s3.endpoint_url, moto_s3.bucket, prefix))
    save(d.addr, [1], Level.PERSISTED, world=2)
    save(d.addr, [2], Level.PERSISTED, world=2)
    d.kill()  # no daemon from here on: the store alone
    b = ["--bucket", moto_s3.bucket, "--endpoint", moto_s3.endpoint_url, "--prefix", prefix]

    ls = ctl_json("ls", *b)
    assert ls["source"] == {"kind": "object", "bucket": moto_s3.bucket, "prefix": prefix,
                            "endpoint": moto_s3.endpoint_url}
    assert [(s["step"], s["world_size"], s["committed"], s["tiers"]) for s in ls["steps"]] == \
        [(1, 2, True, {"object": "committed"}), (2, 2, True, {"object": "committed"})]
    show = ctl_json("show", f"{JOB}@latest", "--tensors", *b)
    assert show["step"] == 2 and show["tiers"] == ["object"]
    keys = [s["locations"][0]["location"] for s in show["shards"]]
    assert keys == [f"s3://{moto_s3.bucket}/{prefix}/{JOB}/step-000000000002/rank-{r:06d}.shard.c*" for r in (0, 1)]
    storage = show["storage"]
    assert storage["logical_bytes"] == show["nbytes"] == sum(s["nbytes"] for s in show["shards"])
    assert storage["stored_bytes"] == sum(s["stored_bytes"] for s in show["shards"]) > 0
    assert storage["compression_ratio"] == round(storage["logical_bytes"] / storage["stored_bytes"], 3)
    assert ctl_rcs(["show", f"{JOB}@7", *b], ["verify", f"{JOB}@2", "--tier", "disk", *b],
                   ["pin", f"{JOB}@2", *b], ["status", *b]) == [4, 2, 2, 0]

    out = tmp_path / "restored"
    doc = ctl_json("restore", f"{JOB}@2", "--to", str(out), *b)
    assert {f["served_from"] for f in doc["files"]} == {"object"}
    from safetensors.numpy import load_file

    for rank in (0, 1):
        got = load_file(str(out / f"rank-{rank:06d}.safetensors"))
        assert got["w"].tobytes() == state(2, rank)["w"].tobytes()

    ok = ctl_json("verify", f"{JOB}@2", "--read-data", *b)
    assert ok["ok"] and [c["status"] for c in ok["checks"]] == ["ok", "ok", "ok"]
    assert ok["nbytes_read"] == sum(s["nbytes"] for s in show["shards"])
    # flip one byte of rank 1's first chunk object
    s3 = moto_s3.client()
    key = keys[1].removeprefix(f"s3://{moto_s3.bucket}/").removesuffix("*") + "000000"
    body = bytearray(s3.get_object(Bucket=moto_s3.bucket, Key=key)["Body"].read())
    body[1000] ^= 0x40
    s3.put_object(Bucket=moto_s3.bucket, Key=key, Body=bytes(body))
    res = ctl("verify", f"{JOB}@2", "--read-data", "--tier", "object", *b, "-o", "json")
    assert res.returncode == 5, res.stderr
    assert key in res.stderr and "crc32c mismatch" in res.stderr and keys[0] not in res.stderr
    bad = json.loads(res.stdout)
    assert bad["bad_copies"] == [keys[1]] and [c["status"] for c in bad["checks"]] == ["ok", "ok", "bad"]
    # sizes only: still fine; restore refuses the bad copy; the latest step stays without --force
    assert ctl_rcs(["verify", f"{JOB}@2", *b], ["restore", f"{JOB}@2", "--to", str(tmp_path / "bad"), *b],
                   ["rm", f"{JOB}@2", "--yes", *b]) == [0, 5, 1]

    assert removals(ctl_json("rm", f"{JOB}@1", "--yes", *b)) == [(JOB, 1, "object")]
    listed = s3.list_objects_v2(Bucket=moto_s3.bucket, Prefix=f"{prefix}/{JOB}/")["Contents"]
    assert {o["Key"].split("/")[2] for o in listed} == {"step-000000000002"}


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    none = ["--addr", str(tmp_path / "none.sock")]  # usage is checked before any connection
    assert ctl_rcs(["rm", f"{JOB}@1", *none], ["rm", f"{JOB}@1", "--tier", "tape", "--yes", *none],
                   ["gc", "../x", *none], ["gc", "--max-to-keep", "0", *none], ["pin", *none],
                   ["unpin", "a@b@c", *none], ["rm", f"{JOB}@latest", "--yes", *none],
                   ["ls", "--endpoint", "http://127.0.0.1:9"],  # --endpoint needs --bucket
                   ["ls", "--bucket", "b-1", "--root", str(tmp_path)]) == [2] * 9


def test_root_gc_uses_the_roots_retention_and_dry_run_needs_no_lock(daemon_factory: Callable[..., DaemonProc]) -> None:
    """`gc --root` applies the retention the root's daemon was configured with (recorded in
    {root}/retention.json at start), not the built-in max_to_keep=3; a dry run is read-only, so it
    is allowed while the daemon serves the root (a real gc still is not)."""
    d = daemon_factory(config_text=DISK_CONFIG.replace("max_to_keep = 2", "max_to_keep = 10"))
    save(d.addr, [1, 2, 3, 4, 5], Level.LOCAL_DURABLE)
    recorded = json.loads((d.root / "retention.json").read_text())
    assert recorded["schema"] == "ckptd.retention/v1" and recorded["disk"]["max_to_keep"] == 10
    root = ["--root", str(d.root)]
    dry = ctl_json("gc", "--dry-run", *root)  # the daemon holds the root: read-only is fine
    assert removals(dry) == [] and dry["policies"]["disk"] == {"max_to_keep": 10, "keep_period": 0}
    dry = ctl_json("gc", "--dry-run", "--max-to-keep", "2", *root)  # a flag still overrides
    assert removals(dry) == [(JOB, 1, "disk"), (JOB, 2, "disk"), (JOB, 3, "disk")]
    assert disk_steps(d) == [1, 2, 3, 4, 5]
    res = ctl("gc", *root)  # changing the root under a live daemon stays refused
    assert res.returncode == 1 and "--addr" in res.stderr
    assert d.terminate() == 0
    doc = ctl_json("gc", *root)
    assert removals(doc) == [] and doc["policies"]["disk"]["max_to_keep"] == 10
    assert disk_steps(d) == [1, 2, 3, 4, 5]
    assert removals(ctl_json("gc", "--root", str(d.root / "data"), "--max-to-keep", "4")) == [(JOB, 1, "disk")]


def test_bucket_without_the_right_prefix_says_where_it_looked_and_suggests(
        moto_s3: MotoS3) -> None:  # noqa: F811
    """`ckptctl --bucket B` (no --prefix, or a wrong one) on a store whose checkpoints live under a
    prefix names the prefix it listed and the prefixes that hold checkpoints."""
    bucket = f"sugg-{uuid.uuid4().hex[:8]}"
    s3 = moto_s3.client()
    s3.create_bucket(Bucket=bucket)
    for key in ("cluster-a/gpt/step-000000000001/manifest.json", "cluster-b/team/llama/step-000000000007/x",
                "other/notes.txt", "logs/2024/app.log"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    b = ["--bucket", bucket, "--endpoint", moto_s3.endpoint_url]
    res = ctl("ls", *b)
    assert res.returncode == 0, res.stderr
    assert f"s3://{bucket}/" in res.stderr and "no --prefix" in res.stderr, res.stderr
    assert "--prefix cluster-a" in res.stderr and "--prefix other" not in res.stderr, res.stderr
    assert "--prefix logs" not in res.stderr, res.stderr
    res = ctl("ls", *b, "--prefix", "cluster-b")  # one level above the checkpoints
    assert f"s3://{bucket}/cluster-b/" in res.stderr and "--prefix cluster-b/team" in res.stderr, res.stderr
    res = ctl("ls", *b, "--prefix", "cluster-a", "-o", "json")
    assert res.returncode == 0 and json.loads(res.stdout)["jobs"] == ["gpt"]
