"""RestorePremap hands a mapping only to the file it maps, once, and unmaps what is not taken.

The real path (a daemon's prepared slot, mapped ahead and used by that rank's restore) is
tests/integration/test_restore_prep.py; here a stand-in for the connection answers DaemonStatus
so the identity checks can be driven directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ckptd_client.restore.premap import RestorePremap

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb


class _Conn:
    def __init__(self, answers: list[pb.DaemonStatusResponse]) -> None:
        self.answers = answers
        self.calls = 0
        self.stub = SimpleNamespace(DaemonStatus=None)

    def call(self, method: Any, request: Any, timeout_s: float | None = None) -> pb.DaemonStatusResponse:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def _slot(tmp_path: Path, name: str, nbytes: int) -> Path:
    p = tmp_path / name
    p.write_bytes(bytes(range(256)) * (nbytes // 256))
    return p


def _status(preparing: bool, *slots: tuple[str, int, Path]) -> pb.DaemonStatusResponse:
    return pb.DaemonStatusResponse(preparing_restore=preparing, restore_slots=[
        pb.RestoreSlot(job=j, rank=r, slot_path=str(p), capacity_bytes=p.stat().st_size) for j, r, p in slots])


def test_the_mapping_goes_to_its_own_file_once(tmp_path: Path) -> None:
    mine, other = _slot(tmp_path, "mine", 8192), _slot(tmp_path, "other", 8192)
    conn = _Conn([_status(True), _status(False, ("j", 0, mine), ("j", 1, other))])  # ready on the 2nd ask
    pm = RestorePremap(conn, "j", 0)  # type: ignore[arg-type]
    assert pm.wait(10) and conn.calls == 2
    fd_other, fd_mine = os.open(other, os.O_RDONLY), os.open(mine, os.O_RDONLY)
    try:
        assert pm.take(fd_other, 8192) is None  # rank 1's slot was not mapped for rank 0
        assert pm.take(fd_mine, 8193) is None  # too small for what the restore needs: not used
        assert pm.taken == 0 and not pm.wait(0)  # and nothing is mapped after a restore asked
    finally:
        os.close(fd_other)
        os.close(fd_mine)
    pm2 = RestorePremap(_Conn([_status(False, ("j", 0, mine))]), "j", 0)  # type: ignore[arg-type]
    assert pm2.wait(10)
    fd = os.open(mine, os.O_RDONLY)
    try:
        mm = pm2.take(fd, 8192)
        assert mm is not None and mm[:256] == bytes(range(256)) and pm2.taken == 1
        assert pm2.take(fd, 8192) is None  # handed out once
        mm.close()
    finally:
        os.close(fd)


def test_nothing_prepared_or_closed_maps_nothing(tmp_path: Path) -> None:
    pm = RestorePremap(_Conn([_status(False)]), "j", 0)  # type: ignore[arg-type]
    assert not pm.wait(10)
    mine = _slot(tmp_path, "mine", 4096)
    pm = RestorePremap(_Conn([_status(False, ("j", 0, mine))]), "j", 0)  # type: ignore[arg-type]
    pm.wait(10)
    pm.close()
    fd = os.open(mine, os.O_RDONLY)
    try:
        assert pm.take(fd, 4096) is None and not pm.wait(0)
    finally:
        os.close(fd)
