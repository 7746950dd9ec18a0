"""Membership from the job: with a torch.distributed group, the clients gather their daemons'
peer identities and hand the list to every daemon (SetPeers); replication then works without
any static peer list. SetPeers is refused clearly where it does not apply."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from tests.conftest import DaemonProc

TOKEN = "test-peer-token-membership-0123"

WORKER = r'''
import json, sys
import numpy as np
import torch.distributed as dist
from ckptd_client import CheckpointManager, Level
rank, addr, init = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
with CheckpointManager("member", rank=rank, world_size=2, addr=addr, node_ranks=[rank]) as m:
    h = m.save(1, {"w": np.full(4096, rank, dtype=np.int32)})
    dist.barrier()
    h.wait(Level.REPLICATED, timeout_s=60)
    print(json.dumps({"rank": rank, "members": m.peer_members, "ok": h.ok}))
dist.destroy_process_group()
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(node: str, port: int, static: str = "") -> str:
    text = (f'[peers]\nlisten = "127.0.0.1:{port}"\nnode_id = "{node}"\ntoken = "{TOKEN}"\n'
            "replication_factor = 1\npush_timeout_s = 5.0\n")
    return text + (f'peers = "{static}"\n' if static else "")


def _set_peers(d: DaemonProc, entries: list[str]) -> tuple[grpc.StatusCode, list[str]]:
    with grpc.insecure_channel(f"unix:{d.addr}") as ch:
        try:
            resp = pb_grpc.CheckpointServiceStub(ch).SetPeers(pb.SetPeersRequest(peers=entries), timeout=10)
        except grpc.RpcError as err:
            return err.code(), []
    return grpc.StatusCode.OK, list(resp.members)


def test_clients_gather_membership_and_replication_follows(daemon_factory: Callable[..., DaemonProc],
                                                            tmp_path: Path) -> None:
    ports = [_port(), _port()]
    nodes = [daemon_factory(config_text=_config(f"n{i + 1}", ports[i])) for i in range(2)]
    init = f"file://{tmp_path / 'pg-init'}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), nodes[r].addr, init],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    outs = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert [o["members"] for o in outs] == [["n1", "n2"], ["n1", "n2"]]
    assert all(o["ok"] for o in outs)
    for d in nodes:  # each daemon took the job's list and saw step 1 replicated on every rank
        log = d.log_path.read_text()
        assert f"peer membership set by the job: n1=127.0.0.1:{ports[0]}, n2=127.0.0.1:{ports[1]}" in log
        assert "REPLICATED on all 2 ranks" in log, log[-2000:]


def test_set_peers_is_refused_where_it_does_not_apply(daemon_factory: Callable[..., DaemonProc]) -> None:
    plain = daemon_factory()  # no [peers]
    assert _set_peers(plain, ["n1=127.0.0.1:1", "n2=127.0.0.1:2"])[0] == grpc.StatusCode.FAILED_PRECONDITION
    p1, p2 = _port(), _port()
    static = daemon_factory(config_text=_config("n1", p1, static=f"n1=127.0.0.1:{p1},n2=127.0.0.1:{p2}"))
    assert _set_peers(static, [f"n1=127.0.0.1:{p1}", "n3=127.0.0.1:9"])[0] == grpc.StatusCode.FAILED_PRECONDITION
    dynamic = daemon_factory(config_text=_config("n1", _port()))
    assert _set_peers(dynamic, ["n2=127.0.0.1:2", "n3=127.0.0.1:3"])[0] == grpc.StatusCode.INVALID_ARGUMENT
    for bad in (["n1=127.0.0.1:1", "n1=127.0.0.1:2"], ["n1=nohostport"], ["../x=127.0.0.1:1"], ["n1=127.0.0.1:99999"]):
        assert _set_peers(dynamic, bad)[0] == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert _set_peers(dynamic, ["n1=127.0.0.1:1", "n2=127.0.0.1:2@rack-2"]) == (grpc.StatusCode.OK, ["n1", "n2"])
