"""Corrupted copies are detected and rejected, never served (DESIGN.md sections 3 and 6).

crc32c is verified on every read: a flipped byte or a wrong size in a shard file, a flipped
byte in a shm slot, a broken manifest: each makes that copy invalid. Restore falls to the next
valid source of the same step, or fails with IntegrityError naming the file; it never succeeds
silently with bad bytes, and the daemon keeps serving.
"""

from __future__ import annotations

import json
import shutil

import pytest
from ckptd_client import IntegrityError

from ckptd.core.types import Level
from tests.fault.faultkit import (
    JOB,
    Raw,
    assert_bit_exact,
    flip_byte,
    manager,
    restore_checked,
    shard_file,
    slot_of,
    step_dir,
)
from tests.state_factory import MiB, blank_like, fault_state

NBYTES = 1 * MiB


def saved_node(daemon_factory, steps=(1, 2)):
    """A daemon with ``steps`` saved and each LOCAL_DURABLE."""
    d = daemon_factory()
    with manager(d.addr) as m:
        for step in steps:
            m.save(step, fault_state(step, 0, NBYTES)).wait(Level.LOCAL_DURABLE, timeout_s=60)
    return d


def restart_without_shm(daemon_factory, d):
    d.kill()
    shutil.rmtree(d.shm_dir)
    return daemon_factory(root=d.root, shm_dir=d.shm_dir)


def expect_integrity_error(m, step, needle: str) -> str:
    want = fault_state(2, 0, NBYTES)
    state = blank_like(want)
    with pytest.raises(IntegrityError) as info:
        m.restore(state, step=step, strict_latest=True)  # "latest" strictly: no fallback to an older step
    assert needle in str(info.value), str(info.value)
    assert m.last_restore is None, "a failed restore left a restore record"
    assert_bit_exact(state, blank_like(want))  # nothing was written into the caller's state
    return str(info.value)


def test_flipped_byte_on_disk_without_memory_copy(daemon_factory):
    d = saved_node(daemon_factory)
    bad = shard_file(d.root, 2)
    flip_byte(bad, NBYTES // 3)
    d2 = restart_without_shm(daemon_factory, d)
    with manager(d2.addr) as m, Raw(d2.addr) as raw:
        msg = expect_integrity_error(m, "latest", str(bad))
        assert "crc32c mismatch" in msg
        expect_integrity_error(m, 2, str(bad))  # rejected again: never cached as good
        assert raw.status().slots == 0, "the rejected copy's scratch slot leaked"
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "disk")  # the older step is intact
        # by default "latest" falls back to that older step, bit-exact, and says which it skipped
        state = blank_like(fault_state(1, 0, NBYTES))
        assert m.restore(state) == 1
        assert_bit_exact(state, fault_state(1, 0, NBYTES))
        assert m.last_restore is not None and m.last_restore.unusable_steps == [2]
        assert d2.alive()


def test_flipped_byte_on_disk_while_memory_copy_exists(daemon_factory):
    d = saved_node(daemon_factory)
    bad = shard_file(d.root, 2)
    flip_byte(bad, 0)
    with manager(d.addr) as m:
        restore_checked(m, "latest", fault_state(2, 0, NBYTES), "memory")
        assert m.last_restore is not None and m.last_restore.rejected == []
    # once the memory copy is gone, the damaged disk copy is the only one, and is refused
    d2 = restart_without_shm(daemon_factory, d)
    with manager(d2.addr) as m:
        expect_integrity_error(m, 2, str(bad))


def test_flipped_byte_in_live_slot_falls_back_to_disk(daemon_factory):
    d = saved_node(daemon_factory)
    slot, meta = slot_of(d.shm_dir, 2)
    flip_byte(slot, meta["shard"]["nbytes"] - 1)  # the daemon's own mapping sees it too
    with manager(d.addr) as m:
        restore_checked(m, "latest", fault_state(2, 0, NBYTES), "disk")
        assert m.last_restore is not None
        assert len(m.last_restore.rejected) == 1
        assert m.last_restore.rejected[0].startswith("memory:")
        assert "crc32c mismatch" in m.last_restore.rejected[0]
        # the verified disk copy re-warmed the memory tier
        restore_checked(m, "latest", fault_state(2, 0, NBYTES), "memory")
    assert d.alive()


@pytest.mark.parametrize("how", ["truncated", "extended"])
def test_wrong_size_shard_file(daemon_factory, how):
    d = saved_node(daemon_factory)
    bad = shard_file(d.root, 2)
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        if how == "truncated":
            f.truncate(size // 2)
        else:
            f.seek(size)
            f.write(b"\0" * 4096)
    d2 = restart_without_shm(daemon_factory, d)
    with manager(d2.addr) as m:
        msg = expect_integrity_error(m, "latest", str(bad))
        assert "size" in msg
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "disk")
    assert d2.alive()


@pytest.mark.parametrize("damage", ["invalid-json", "wrong-schema", "other-step"])
def test_corrupted_manifest_is_reported(daemon_factory, damage):
    d = saved_node(daemon_factory)
    path = step_dir(d.root, 2) / "manifest.json"
    obj = json.loads(path.read_bytes())
    if damage == "invalid-json":
        data = path.read_bytes()[: len(path.read_bytes()) // 2]
    elif damage == "wrong-schema":
        data = json.dumps({**obj, "schema_version": 99}).encode()
    else:
        data = json.dumps({**obj, "step": 1}).encode()
    path.write_bytes(data)

    d2 = restart_without_shm(daemon_factory, d)
    assert d2.alive()
    assert f"ignoring {JOB}@2 on disk" in d2.log()
    with manager(d2.addr) as m:
        msg = expect_integrity_error(m, 2, str(path))
        assert "manifest" in msg
        assert 2 not in m.all_steps()
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "disk")
        # "latest" is never served from the broken step: strictly it is reported, by default the
        # restore falls back to the newest valid step, bit-exact
        with pytest.raises(IntegrityError) as info:
            m.restore(blank_like(fault_state(1, 0, NBYTES)), strict_latest=True)
        assert str(path) in str(info.value)
        state = blank_like(fault_state(1, 0, NBYTES))
        assert m.restore(state) == 1
        assert_bit_exact(state, fault_state(1, 0, NBYTES))
        assert m.last_restore is not None and m.last_restore.unusable_steps == [2]
        # the daemon keeps serving: a new step saves, drains and restores
        m.save(3, fault_state(3, 0, NBYTES)).wait(Level.LOCAL_DURABLE, timeout_s=60)
        restore_checked(m, "latest", fault_state(3, 0, NBYTES), "memory")
    assert d2.alive()
