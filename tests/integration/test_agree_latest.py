"""With a torch.distributed process group, "latest" is agreed by all ranks: a job whose nodes
hold different newest steps resumes every rank from the same (the oldest newest) step."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests.conftest import DaemonProc

WORKER = r'''
import json, sys
import numpy as np
import torch.distributed as dist
from ckptd_client import CheckpointManager
rank, addr, init = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
with CheckpointManager("agree", addr=addr, node_ranks=[rank]) as m:
    state = {"x": np.zeros(16, dtype=np.int64)}
    step = m.restore(state)
    print(json.dumps({"rank": rank, "step": step, "x0": int(state["x"][0])}))
dist.destroy_process_group()
'''


def test_ranks_agree_on_the_step_every_rank_can_restore(daemon_factory: Callable[..., DaemonProc],
                                                        tmp_path: Path) -> None:
    nodes = [daemon_factory(), daemon_factory()]
    ms = [CheckpointManager("agree", rank=r, world_size=2, addr=nodes[r].addr, node_ranks=[r]) for r in range(2)]
    for step in (1, 2):
        for m in ms:
            if step == 2 and m.rank == 1:
                continue  # node 2 never got step 2 (its rank died before saving it)
            assert m.save(step, {"x": np.full(16, step * 10 + m.rank, dtype=np.int64)}).ok
    for m in ms:  # each node's newest save committed (its crc pass done) before asking for "latest"
        m.handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=30)
    assert ms[0].latest_step() == 2 and ms[1].latest_step() == 1
    for m in ms:
        m.close()
    init = f"file://{tmp_path / 'pg-init'}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), nodes[r].addr, init],
                              stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [(o["rank"], o["step"], o["x0"]) for o in outs] == [(0, 1, 10), (1, 1, 11)]
