"""Security properties of a running ckptd: private files, an owner-only socket and peer authentication.

* Shared memory: the slot directory is 0700 and every file in it (slots, sidecars, replicas,
  scratch slots) is 0600, even for a daemon started under umask 0 (so the modes are the daemon's
  own doing). The Unix socket is 0600 (the trainer runs as the daemon's user; nothing else may
  talk to it) in a 0700 directory the daemon creates, also under umask 0. A regular file at the
  socket path is never replaced.
* PeerService: every RPC called without the peer token, or with a wrong one (any near miss), is
  refused UNAUTHENTICATED before any handler runs: its request bytes are not even parsed (garbage
  gets UNAUTHENTICATED, not INVALID_ARGUMENT), a refused push keeps nothing, a refused readiness
  report never reaches the board, and a refused fetch returns no byte.

That no secret reaches any log or client output is checked by tests/test_security_logs.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.errors import ERROR_METADATA_KEY
from ckptd.core.integrity import chunk_crcs, crc32c
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import ReplicaHeader, ShardEntry
from ckptd.peers.wire import header_to_pb
from tests._ckptd_helpers import clean_env, free_port, peer_config, replica_round_trip, unique_job

C = grpc.StatusCode
PEER = "ckptd.v1.PeerService"
TOKEN = "security-peer-token-3b8e61f0c2"
PEER_RPCS = [m.name for m in ppb.DESCRIPTOR.services_by_name["PeerService"].methods]


@dataclass
class Node:
    root: Path
    shm_dir: Path
    socket: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    peer_target: str
    peer_ch: grpc.Channel

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A disk + peer daemon started under umask 0, its socket in a directory it must create."""
    work = tmp_path_factory.mktemp("security")
    port = free_port()
    cfg = peer_config(work, port, TOKEN)
    sock_base = Path(tempfile.mkdtemp(prefix="ckt-sec-", dir="/tmp"))
    os.chmod(sock_base, 0o755)
    sock = sock_base / "run" / "ckptd.sock"  # "run" does not exist yet
    shm = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:10]}"
    root = work / "root"
    log_path = work / "daemon.log"
    old = os.umask(0)  # the child inherits it: every mode checked below is the daemon's own doing
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--config", str(cfg), "--root",
                                     str(root), "--socket", str(sock), "--shm-dir", str(shm), "--budget-bytes",
                                     "64MiB"], stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    finally:
        os.umask(old)
    try:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as peer_ch:
            yield Node(root, shm, sock, log_path, proc, f"127.0.0.1:{port}", peer_ch)
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(sock_base, ignore_errors=True)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# -- files and the socket ----------------------------------------------------------------------


def test_shm_directory_and_every_slot_file_are_private(node: Node) -> None:
    job = unique_job("shm")
    with CheckpointManager(job, rank=0, world_size=1, addr=str(node.socket), on_error="raise") as m:
        m.save(1, {"w": np.arange(50_000, dtype=np.float32)}).wait(Level.LOCAL_DURABLE, timeout_s=60)
        m.save(2, {"w": np.arange(50_000, dtype=np.float32) + 1}).wait(Level.LOCAL_DURABLE, timeout_s=60)
        out: dict[str, Any] = {}
        assert m.restore(out, step=1) == 1  # may be served through a scratch slot
    data = os.urandom(70_000)
    _push(node, "shm-replica", data, TOKEN)  # a replica slot and its sidecar
    assert _mode(node.shm_dir) == 0o700
    entries = list(node.shm_dir.iterdir())
    assert len(entries) >= 4, entries  # slots of two steps, their sidecars, the replica
    for p in entries:
        st = os.lstat(p)
        assert stat.S_ISREG(st.st_mode), p  # no links, fifos or directories to follow
        assert stat.S_IMODE(st.st_mode) == 0o600, (p, oct(st.st_mode))
        assert st.st_uid == os.getuid()


def test_socket_is_owner_only_in_a_private_directory(node: Node) -> None:
    st = os.lstat(node.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)  # not the 0777 that umask 0 would give
    assert _mode(node.socket.parent) == 0o700  # created by the daemon
    assert _mode(node.root / "ckptd.lock") == 0o600


@pytest.mark.parametrize("kind", ["regular-file", "symlink-to-file"])
def test_a_file_at_the_socket_path_is_never_replaced(tmp_path: Path, kind: str) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    target = precious if kind == "regular-file" else tmp_path / "link.sock"
    if kind == "symlink-to-file":
        target.symlink_to(precious)
    shm = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:10]}"
    try:
        res = subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--root", str(tmp_path / "root"),
                              "--socket", str(target), "--shm-dir", str(shm), "--budget-bytes", "16MiB"],
                             capture_output=True, text=True, timeout=60, env=clean_env())
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    assert res.returncode == 1, res
    assert "not a socket" in res.stderr and "Traceback" not in res.stderr
    assert precious.read_text() == "keep me" and target.exists()


def test_no_directory_of_the_root_is_writable_by_others_under_umask_0(node: Node) -> None:
    root = node.root
    job = unique_job("perm")
    with CheckpointManager(job, rank=0, world_size=1, addr=str(node.socket), on_error="raise") as m:
        m.save(1, {"w": np.zeros(100, dtype=np.float32)}).wait(Level.LOCAL_DURABLE, timeout_s=60)
    paths = [root, *root.rglob("*")]
    assert any(p.name == "manifest.json" for p in paths)
    loose = [(str(p), oct(_mode(p))) for p in paths if not p.is_symlink() and _mode(p) & 0o022]
    assert loose == []


# -- the peer API needs the token --------------------------------------------------------------


def _entry(rank: int, data: bytes) -> ShardEntry:
    return ShardEntry(rank, len(data), 65536, tuple(chunk_crcs(data, 65536)),
                      (TensorEntry("w", "uint8", (len(data),), 0, len(data)),), {"d": [["w", {"t": 0}]]})


def _push_msgs(job: str, data: bytes) -> list[bytes]:
    h = header_to_pb(ReplicaHeader(job, 1, 1, _entry(0, data), "n9"))
    chunk = ppb.ReplicaChunk(offset=0, data=data, crc32c=crc32c(data))
    return [ppb.PushReplicaRequest(header=h).SerializeToString(),
            ppb.PushReplicaRequest(chunk=chunk).SerializeToString()]


def _peer_call(node: Node, rpc: str, payload: bytes | list[bytes],
               md: tuple[tuple[str, str], ...] | None) -> tuple[grpc.StatusCode, str | None, list[bytes]]:
    method = f"/{PEER}/{rpc}"
    try:
        if rpc == "PushReplica":
            assert isinstance(payload, list)
            out = [node.peer_ch.stream_unary(method, request_serializer=None, response_deserializer=None)(
                iter(payload), metadata=md, timeout=10)]
        elif rpc == "FetchShard":
            assert isinstance(payload, bytes)
            out = list(node.peer_ch.unary_stream(method, request_serializer=None, response_deserializer=None)(
                payload, metadata=md, timeout=10))
        else:
            assert isinstance(payload, bytes)
            out = [node.peer_ch.unary_unary(method, request_serializer=None, response_deserializer=None)(
                payload, metadata=md, timeout=10)]
        return C.OK, None, out
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        name = dict(err.trailing_metadata() or ()).get(ERROR_METADATA_KEY)
        return err.code(), str(name) if name is not None else None, []


def _push(node: Node, job: str, data: bytes, token: str) -> None:
    code, _, _ = _peer_call(node, "PushReplica", _push_msgs(job, data), (("authorization", f"Bearer {token}"),))
    assert code == C.OK


def _requests(job: str) -> dict[str, bytes | list[bytes]]:
    return {
        "PushReplica": _push_msgs(f"{job}-push", b"stolen?" * 1000),
        "FetchShard": ppb.FetchShardRequest(job=job, step=1, rank=0, requester_node="n6").SerializeToString(),
        "ListHoldings": ppb.ListHoldingsRequest(job=job, requester_node="n6").SerializeToString(),
        "ReportReady": ppb.ReportReadyRequest(job=f"{job}-rr", step=1, world_size=2, tier="disk", node_id="n6",
                                              ranks=[0]).SerializeToString(),
        "Ping": ppb.PingRequest(node_id="n6").SerializeToString(),
    }


BAD_CREDENTIALS: dict[str, tuple[tuple[str, str], ...] | None] = {
    "none": None,
    "empty-bearer": (("authorization", "Bearer "),),
    "wrong": (("authorization", "Bearer not-the-token-but-long-enough"),),
    "prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "suffix": (("authorization", f"Bearer {TOKEN}0"),),
    "upper-case": (("authorization", f"Bearer {TOKEN.upper()}"),),
    "basic-scheme": (("authorization", f"Basic {TOKEN}"),),
    "no-scheme": (("authorization", TOKEN),),
    "wrong-key": (("x-ckptd-peer-token", TOKEN),),
    "other-cluster": (("ckptd-peer-token", "security-peer-token-of-another-job"),),
}


@pytest.mark.parametrize("cred", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
def test_every_peer_rpc_refuses_a_missing_or_wrong_token(node: Node, cred: str) -> None:
    md = BAD_CREDENTIALS[cred]
    reqs = _requests(unique_job("auth"))
    assert set(reqs) == set(PEER_RPCS)
    for rpc, payload in reqs.items():
        code, name, out = _peer_call(node, rpc, payload, md)
        assert (code, name, out) == (C.UNAUTHENTICATED, "Unauthenticated", []), (rpc, code, name)
        # garbage is not even parsed: still UNAUTHENTICATED, never INVALID_ARGUMENT
        junk: bytes | list[bytes] = [b"\xff\xff\xff"] if rpc == "PushReplica" else b"\xff\xff\xff"
        code, name, _ = _peer_call(node, rpc, junk, md)
        assert (code, name) == (C.UNAUTHENTICATED, "Unauthenticated"), (rpc, code)


def test_refused_calls_ran_no_handler(node: Node) -> None:
    job = unique_job("sec")
    with CheckpointManager(job, rank=0, world_size=1, addr=str(node.socket), on_error="raise") as m:
        m.save(1, {"w": np.arange(1000, dtype=np.int64)}).wait(Level.LOCAL_DURABLE, timeout_s=60)
    good = (("authorization", f"Bearer {TOKEN}"),)
    for md in BAD_CREDENTIALS.values():
        for rpc, payload in _requests(job).items():
            assert _peer_call(node, rpc, payload, md)[0] == C.UNAUTHENTICATED
    # the refused push kept nothing, the refused report never reached the board
    code, _, out = _peer_call(node, "ListHoldings", ppb.ListHoldingsRequest(job=f"{job}-push").SerializeToString(),
                              good)
    assert code == C.OK and list(ppb.ListHoldingsResponse.FromString(out[0]).holdings) == []
    code, _, out = _peer_call(node, "ReportReady", ppb.ReportReadyRequest(
        job=f"{job}-rr", step=1, world_size=3, tier="disk", node_id="n6", ranks=[1]).SerializeToString(), good)
    assert code == C.OK, code  # a world_size 2 report (refused above) would make this FAILED_PRECONDITION
    assert list(ppb.ReportReadyResponse.FromString(out[0]).ready_ranks) == [1]
    # with the token, in either metadata form, the same shard is served
    for md in (good, (("ckptd-peer-token", TOKEN),)):
        code, _, out = _peer_call(node, "FetchShard", _requests(job)["FetchShard"], md)
        assert code == C.OK and ppb.FetchShardResponse.FromString(out[0]).header.nbytes == 8000
    log = node.log()
    assert f"{job}-push" not in log and f"{job}-rr" not in log  # no handler logged anything about them


def test_bulk_port_serves_no_one_without_a_live_ticket(node: Node) -> None:
    """The plain-TCP bulk port (next to the peer port) takes a connection only with a ticket the
    authenticated gRPC call just handed out; guessed, replayed and garbage hellos are cut off."""
    import re

    from ckptd.peers.bulk import MAGIC, TICKET_BYTES

    m = re.search(r"bulk port (\d+)", node.log())
    assert m, node.log()[-2000:]
    port = int(m.group(1))
    hellos = (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", MAGIC + secrets.token_bytes(TICKET_BYTES),
              MAGIC + b"\0" * TICKET_BYTES, b"XXXX" + secrets.token_bytes(TICKET_BYTES))
    for hello in hellos:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(hello)
            try:
                got = s.recv(1)
            except ConnectionResetError:  # closed with our extra bytes unread
                got = b""
            assert got == b""  # closed by the daemon, nothing served
    data = os.urandom(300_000)
    h = ReplicaHeader("bulk-ok", 1, 1, _entry(0, data), "n2")
    assert replica_round_trip(node.peer_target, TOKEN, h, data, bulk=True) == data  # the listener still serves


# -- a trainer of another user: group access, on request ---------------------------------------


def _other_group() -> int:
    """A group to hand the socket to: another one than ours when we may chgrp to it (root)."""
    import grp

    if os.geteuid() == 0:
        for g in grp.getgrall():
            if g.gr_gid != os.getgid():
                return g.gr_gid
    return os.getgid()


def test_socket_and_shm_dir_get_the_configured_group_access(tmp_path: Path) -> None:
    gid = _other_group()
    cfg = tmp_path / "ckptd.toml"
    cfg.write_text(f'[daemon]\nsocket_mode = "0660"\nsocket_group = "{gid}"\n')
    sock_base = Path(tempfile.mkdtemp(prefix="ckt-grp-", dir="/tmp"))
    sock = sock_base / "run" / "ckptd.sock"
    shm = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:10]}"
    log_path = tmp_path / "daemon.log"
    old = os.umask(0o077)  # the strictest umask: the modes below are the daemon's own doing
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--config", str(cfg),
                                     "--root", str(tmp_path / "root"), "--socket", str(sock), "--shm-dir", str(shm),
                                     "--budget-bytes", "64MiB"], stdout=log, stderr=subprocess.STDOUT,
                                    env=clean_env())
    finally:
        os.umask(old)
    try:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        with CheckpointManager(unique_job("grp"), rank=0, world_size=1, addr=str(sock), on_error="raise") as m:
            m.save(1, {"w": np.arange(50_000, dtype=np.float32)}).wait(Level.LOCAL_DURABLE, timeout_s=60)
        st = os.lstat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid), (oct(st.st_mode), st.st_gid)
        st = os.lstat(sock.parent)  # the directory the daemon made for its socket: the group may enter
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, gid), (oct(st.st_mode), st.st_gid)
        st = os.lstat(shm)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2750, gid), (oct(st.st_mode), st.st_gid)
        slots = [p for p in shm.iterdir() if p.name.endswith(".bin")]
        assert slots
        for p in slots:
            st = os.lstat(p)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid), (p, oct(st.st_mode), st.st_gid)
        assert _mode(tmp_path / "root") == 0o700  # the root itself stays private
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(sock_base, ignore_errors=True)


@pytest.mark.parametrize("text, match", [
    ('socket_mode = "0666"', "daemon.socket_mode must be"),
    ('socket_mode = "0644"', "daemon.socket_mode must be"),
    ('socket_mode = "rw"', "daemon.socket_mode must be"),
    ('socket_mode = "0660"\nsocket_group = "no-such-group-ckptd"', "daemon.socket_group: no group"),
    ('socket_group = "0"', "daemon.socket_group needs daemon.socket_mode"),  # a group without group access
])
def test_group_access_options_are_validated(tmp_path: Path, text: str, match: str) -> None:
    from ckptd.core.config import load
    from ckptd.core.errors import InvalidArgument

    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[daemon]\n{text}\n")
    with pytest.raises(InvalidArgument, match=match):
        load(cfg, env={})
