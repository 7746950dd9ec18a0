"""Running the framework examples' trainer processes from the tests (tests/integrations).

``run_ranks`` starts one ``examples/<script> worker`` process per rank (for 2 ranks with the
RANK/WORLD_SIZE/MASTER_* variables torchrun would set, gloo on CPU), waits for all of them and
returns the JSON report each printed last, with its exit status. No hub access: HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests._ckptd_helpers import PYTHON, REPO, clean_env, free_port


def run_ranks(script: str, addr: str, job: str, world_size: int, extra: list[str],
              timeout_s: float = 240) -> list[dict[str, Any]]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = clean_env({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if world_size > 1:
            env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        cmd = [PYTHON, str(REPO / "examples" / script), "worker", "--addr", addr, "--job", job, *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=REPO))
    reports = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout_s)
            lines = out.strip().splitlines()
            assert lines, f"rank {rank} exited {proc.returncode} without a report:\n{err[-4000:]}"
            reports.append({"returncode": proc.returncode, **json.loads(lines[-1])})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return reports
