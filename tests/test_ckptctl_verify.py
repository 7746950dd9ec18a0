"""ckptctl ``verify`` driven as a subprocess: integrity failures on flipped bytes.

Protects integrity exit code 5: a byte flipped in a disk shard file (on a bare root, or through a
daemon with ``--tier disk``) or in a memory slot (``--tier memory``) fails ``verify --read-data``
naming exactly the bad copy (in the human output, on stderr and in the JSON ``bad_copies``); a
truncated file is caught without ``--read-data``; ``restore`` refuses the bad copy; an intact step
still verifies. The JSON result matches the documented schema.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests._ckptctl_kit import (
    JOB,
    VERIFY_SCHEMA,
    Saved,
    conforms,
    ctl,
    ctl_json,
)


def flip_byte(path: Path, offset: int = 37) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# -- verify --------------------------------------------------------------------------------
def test_verify_flipped_byte_on_bare_root(saved: Saved) -> None:
    doc = ctl_json("verify", f"{JOB}@20", "--read-data", *saved.addr())
    conforms(doc, VERIFY_SCHEMA)
    assert doc["ok"] and {(c["tier"], c["status"]) for c in doc["checks"]} == {("memory", "ok"), ("disk", "ok")}
    assert doc["nbytes_read"] > 0
    assert saved.daemon.terminate() == 0
    root = ["--root", str(saved.daemon.root)]
    assert ctl("verify", f"{JOB}@20", "--read-data", *root).returncode == 0
    bad = saved.shard(20, 1)
    flip_byte(bad)
    res = ctl("verify", f"{JOB}@20", "--read-data", *root)
    assert res.returncode == 5
    assert str(bad) in res.stdout and str(bad) in res.stderr and "crc32c mismatch" in res.stdout
    assert str(saved.shard(20, 0)) not in res.stderr
    res = ctl("verify", f"{JOB}@20", "--read-data", "-o", "json", *root)
    assert res.returncode == 5
    doc = json.loads(res.stdout)
    conforms(doc, VERIFY_SCHEMA)
    assert not doc["ok"] and doc["bad_copies"] == [str(bad)]
    # without --read-data only presence and sizes are checked
    assert ctl("verify", f"{JOB}@20", *root).returncode == 0
    # a truncated file is caught without reading data
    with open(saved.shard(20, 0), "r+b") as f:
        f.truncate(100)
    res = ctl("verify", f"{JOB}@20", *root)
    assert res.returncode == 5 and str(saved.shard(20, 0)) in res.stderr
    # restore refuses the bad copy
    assert ctl("restore", f"{JOB}@20", "--to", str(saved.daemon.root.parent / "bad-out"), *root).returncode == 5
    assert ctl("verify", f"{JOB}@10", "--read-data", *root).returncode == 0


def test_verify_flipped_bytes_through_daemon(saved: Saved) -> None:
    disk_copy = saved.shard(10, 0)
    flip_byte(disk_copy)
    res = ctl("verify", f"{JOB}@10", "--tier", "disk", "--read-data", *saved.addr())
    assert res.returncode == 5 and str(disk_copy) in res.stderr
    plan = ctl_json("restore", f"{JOB}@20", "--dry-run", "--rank", "1", *saved.addr())
    slot = Path(plan["shards"][0]["plan"][0]["detail"])
    assert plan["shards"][0]["plan"][0]["tier"] == "memory"
    flip_byte(slot, offset=5)
    res = ctl("verify", f"{JOB}@20", "--tier", "memory", "--read-data", "-o", "json", *saved.addr())
    assert res.returncode == 5, res.stderr
    doc = json.loads(res.stdout)
    conforms(doc, VERIFY_SCHEMA)
    assert doc["bad_copies"] == [str(slot)]
    assert [c["status"] for c in doc["checks"]] == ["ok", "bad"]
