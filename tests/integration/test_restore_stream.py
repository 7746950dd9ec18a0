"""The streamed restore (rpc Restore): verified prefixes, a source failing part-way, a client leaving,
the memory copy the client checks itself, and its slot file removed behind the daemon's back.

A 40 MiB shard spans three 16 MiB integrity chunks, so the daemon reports progress more than once
and the client copies the big tensor piece by piece behind it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import CkptdError
from ckptd.core.types import Level
from tests.fault.faultkit import JOB, Raw, flip_byte, manager, restore_checked, slot_of, wait_until
from tests.state_factory import MiB, fault_state

NBYTES = 40 * MiB
CHUNK = 16 * MiB


def _request(step: int, **extra) -> pb.PrepareRestoreRequest:
    return pb.PrepareRestoreRequest(job=JOB, rank=0, world_size=1, step=step, client_pid=os.getpid(), **extra)


def _events(raw: Raw, step: int, **extra) -> list[pb.RestoreEvent]:
    evs = list(raw.stub.Restore(_request(step, **extra), timeout=60))
    assert evs and evs[-1].WhichOneof("event") == "done", evs
    raw.stub.ReleaseRestore(pb.ReleaseRestoreRequest(lease_id=evs[-1].done.lease_id), timeout=10)
    return evs


def _saved(daemon_factory, steps=(1,)):
    d = daemon_factory()
    with manager(d.addr) as m:
        for step in steps:
            assert m.save(step, fault_state(step, 0, NBYTES)).wait(Level.LOCAL_DURABLE, timeout_s=60).step == step
    return d


def _without_shm(daemon_factory, d):
    d.kill()
    shutil.rmtree(d.shm_dir)
    return daemon_factory(root=d.root, shm_dir=d.shm_dir)


def test_disk_restore_streams_verified_prefixes(daemon_factory):
    d = _without_shm(daemon_factory, _saved(daemon_factory))
    with Raw(d.addr) as raw:
        evs = _events(raw, 1)
        kinds = [e.WhichOneof("event") for e in evs]
        assert kinds[0] == "start" and evs[0].start.served_from == "disk", kinds
        assert "restart" not in kinds
        nbytes = evs[0].start.nbytes
        ready = [e.ready_bytes for e in evs if e.WhichOneof("event") == "ready_bytes"]
        assert ready and ready == sorted(set(ready)) and ready[-1] == nbytes, ready
        assert all(r % CHUNK == 0 or r == nbytes for r in ready), ready  # whole verified chunks only
        assert evs[-1].done.served_from == "disk" and evs[-1].done.step == 1
    with manager(d.addr) as m:  # memory was re-warmed by the streamed read; drop it again
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "memory")
    d2 = _without_shm(daemon_factory, d)
    with manager(d2.addr) as m:  # the client's piecewise copy of the 40 MiB tensor, behind the read
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "disk")


def test_memory_copy_failing_part_way_restarts_from_disk(daemon_factory):
    d = _saved(daemon_factory, steps=(1, 2))
    slot, _ = slot_of(d.shm_dir, 2)
    flip_byte(slot, 2 * CHUNK + 5)  # chunks 0 and 1 verify, chunk 2 does not
    with Raw(d.addr) as raw:
        evs = _events(raw, 2)
    kinds = [e.WhichOneof("event") for e in evs]
    starts = [e.start.served_from for e in evs if e.WhichOneof("event") == "start"]
    assert starts == ["memory", "disk"], kinds
    restart = kinds.index("restart")
    before = [e.ready_bytes for e in evs[:restart] if e.WhichOneof("event") == "ready_bytes"]
    assert all(r <= 2 * CHUNK for r in before), before  # never past the bad chunk
    assert "memory" in evs[restart].restart and "crc32c" in evs[restart].restart
    assert evs[-1].done.served_from == "disk" and any("memory" in r for r in evs[-1].done.rejected)


def test_client_restart_path_gives_exact_bytes(daemon_factory, caplog):
    d = _saved(daemon_factory, steps=(1, 2))
    slot, meta = slot_of(d.shm_dir, 2)
    flip_byte(slot, meta["shard"]["nbytes"] - 3)  # the last chunk: the client has copied most of it already
    with manager(d.addr) as m, caplog.at_level("WARNING", logger="ckptd_client"):
        restore_checked(m, 2, fault_state(2, 0, NBYTES), "disk")
        assert m.last_restore is not None and any("memory" in r for r in m.last_restore.rejected)
    # the client's own check caught it (chunk 2), then the daemon's check rejected the memory copy
    assert any("crc32c mismatch in chunk 2" in r.getMessage() and "daemon checking" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_client_checked_memory_restore_gets_the_slot_unread_with_its_crc32c_list(daemon_factory):
    d = _saved(daemon_factory, steps=(1,))
    with Raw(d.addr) as raw:
        crcs = json.loads(raw.stub.GetManifest(pb.GetManifestRequest(job=JOB, step=1), timeout=10).manifest_json)
        want = crcs["shards"][0]["chunk_crc32c"]
        evs = _events(raw, 1, client_verifies=True)
        kinds = [e.WhichOneof("event") for e in evs]
        assert kinds == ["start", "ready_bytes", "done"], kinds  # all of it at once: nothing read first
        start = evs[0].start
        assert start.served_from == "memory" and start.client_verifies and start.chunk_bytes == CHUNK
        assert list(start.chunk_crc32c) == want and len(want) == 3
        assert evs[1].ready_bytes == start.nbytes
        plain = _events(raw, 1)  # without the flag the daemon checks, chunk by chunk
        assert not plain[0].start.client_verifies and not plain[0].start.chunk_crc32c
        ranged = _events(raw, 1, client_verifies=True, ranges=[pb.ByteRange(offset=0, length=4096)])
        assert not ranged[0].start.client_verifies  # a ranged read is always checked by the daemon
    d2 = _without_shm(daemon_factory, d)
    with Raw(d2.addr) as raw:
        evs = _events(raw, 1, client_verifies=True)
        assert evs[0].start.served_from == "disk" and not evs[0].start.client_verifies  # only memory skips its read


def test_client_leaving_mid_stream_leaks_nothing(daemon_factory):
    d = _without_shm(daemon_factory, _saved(daemon_factory))
    with Raw(d.addr) as raw:
        assert raw.status().slots_busy == 0
        call = raw.stub.Restore(_request(1), timeout=60)
        first = next(call)
        assert first.WhichOneof("event") == "start" and first.start.served_from == "disk"
        assert raw.status().slots_busy >= 1  # the scratch slot being filled
        call.cancel()
        # the read is cancelled (its slot freed) or it finished and was never leased: no pin stays
        wait_until(lambda: raw.status().slots_busy == 0, 20, "the cancelled restore released its slot")
        _events(raw, 1)  # and the daemon serves the next restore
        assert raw.status().slots_busy == 0
    with manager(d.addr) as m:  # the last streamed read re-warmed memory
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "memory")


def test_the_restore_slot_is_unmapped_after_the_restore_returns(daemon_factory):
    """The client closes its mapping of the restore slot in a thread (munmap of a large shared
    mapping takes tens of ms); once that thread ends, no page of the daemon's shm dir is mapped
    in this process (this manager only restored, so it never mapped a save slot)."""
    import threading

    d = _saved(daemon_factory)

    def mapped() -> list[str]:
        with open("/proc/self/maps") as f:
            return [line for line in f if str(d.shm_dir) in line]

    with manager(d.addr) as m:
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "memory")
        for t in [t for t in threading.enumerate() if t.name == "ckptd-unmap"]:
            t.join(10)
        assert mapped() == []


def test_the_lease_is_released_behind_the_restore_and_before_the_next_call(daemon_factory, caplog):
    """The restore returns without waiting for its ReleaseRestore; the client's next call waits
    for it, so the daemon has freed the scratch slot by then. A release that fails is logged."""
    d = _without_shm(daemon_factory, _saved(daemon_factory))
    with manager(d.addr) as m:
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "disk")
        assert m.conn._later, "the release was sent without waiting for its answer"
        status = m.conn.call(m.conn.stub.DaemonStatus, pb.DaemonStatusRequest())
        assert not m.conn._later and status.slots_busy == 0
        m.conn.call_later(m.conn.stub.ReleaseRestore, pb.ReleaseRestoreRequest(lease_id="no-such-lease"),
                          "releasing a lease that does not exist")
        with caplog.at_level("WARNING", logger="ckptd_client"):
            assert m.latest_step() == 1
        assert "releasing a lease that does not exist failed" in caplog.text


def test_a_slot_file_removed_behind_the_daemon_fails_the_restore_saying_so_and_rm_clears_the_way(daemon_factory):
    d = _saved(daemon_factory, steps=(1,))
    slot, _ = slot_of(d.shm_dir, 1)
    slot.unlink()  # an operator's cleanup of /dev/shm: the daemon still holds the slot as step 1's memory copy
    state = fault_state(1, 0, NBYTES)
    removed = r"was removed before this client could map it.*ckptctl rm"
    with manager(d.addr) as m, pytest.raises(CkptdError, match=removed):
        m.restore(state)
    with Raw(d.addr) as raw:
        assert raw.status().slots_busy == 0  # the lease of the failed restore was released
    rm = [sys.executable, "-m", "ckptd.ctl.main", "--addr", d.addr, "rm", f"{JOB}@1", "--tier", "memory", "--yes"]
    res = subprocess.run(rm, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    with manager(d.addr) as m:  # what the message advises: the disk copy serves the restore
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "disk")
