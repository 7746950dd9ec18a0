"""Running the framework examples' trainer processes from the tests (tests/integrations).

``run_ranks`` starts one ``examples/<script> worker`` process per rank (for 2 ranks with the
RANK/WORLD_SIZE/MASTER_* variables torchrun would set, gloo on CPU), waits for all of them and
returns the JSON report each printed last, with its exit status. No hub access: HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

from typing import Any

from tests._ckptd_helpers import PYTHON, REPO, clean_env, free_port, run_rank_processes


def run_ranks(script: str, addr: str, job: str, world_size: int, extra: list[str],
              timeout_s: float = 240) -> list[dict[str, Any]]:
    port = free_port()
    envs = []
    for rank in range(world_size):
        env = clean_env({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if world_size > 1:
            env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        envs.append(env)
    cmd = [PYTHON, str(REPO / "examples" / script), "worker", "--addr", addr, "--job", job, *extra]
    return run_rank_processes([cmd] * world_size, timeout_s, envs, check=False)  # a crashing rank exits non-zero
