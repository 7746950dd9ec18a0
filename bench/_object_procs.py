"""Processes of bench/object.py: moto's standalone S3 server and ``ckptd serve`` daemons.

``start_moto`` runs moto's ThreadedMotoServer in a child process (its port read from stdout,
stopped by closing its stdin); ``Daemon`` runs ``ckptd serve --no-disk`` in its own session with
its own root, socket and shm dir, and reads the times of a step's log lines (staged, uploaded,
persisted). Nothing here measures: bench/object.py times and reports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from _util import ServeProcess

CHUNK_BYTES = 16 * 2**20  # ckptd's default crc32c chunk (memory.chunk_bytes)
JOB = "bench"
_UPLOADED_RE = re.compile(r" in (?P<s>[0-9.]+)s$")
MOTO_CHILD = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


def start_moto() -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-c", MOTO_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        raise SystemExit("moto server did not start")
    return proc, f"http://127.0.0.1:{port}"



# -- real daemons ---------------------------------------------------------------------------------
def daemon_config(endpoint: str, bucket: str, prefix: str, part: int, concurrency: int,
                  compression: str = "auto") -> str:
    """The ``[object]`` section of both daemons: the tier-level side's settings, its own prefix."""
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return "\n".join([
        "[memory]", f"chunk_bytes = {CHUNK_BYTES}",
        "[object]", "enabled = true", 'preset = "minio"', f'endpoint_url = "{endpoint}"', f'region = "{region}"',
        f'bucket = "{bucket}"', f'prefix = "{prefix}"', f"part_size_bytes = {part}",
        f"max_concurrency = {concurrency}", f'compression = "{compression}"',
        "max_to_keep = 1",  # retention keeps the newest step only: the store holds one copy at a time
    ]) + "\n"


class Daemon(ServeProcess):
    """``ckptd serve --no-disk`` as a subprocess in its own session, with its own root, socket
    (short path under /tmp) and shm dir; ``stop`` ends it and removes all three."""

    def __init__(self, name: str, workdir: Path, sockdir: Path, config: Path, budget: int) -> None:
        self.root = workdir / f"root-{name}"
        self.shm_dir = Path("/dev/shm") / f"ckptd-objbench-{uuid.uuid4().hex[:10]}"
        super().__init__(name, sockdir / f"{name}.sock", workdir / f"{name}.log", [
            "--config", str(config), "--root", str(self.root), "--shm-dir", str(self.shm_dir),
            "--budget-bytes", str(budget), "--no-disk",
            "--log-level", "DEBUG"])  # DEBUG: the tier's "uploaded ... in Xs" line

    @property
    def addr(self) -> str:
        return str(self.socket)

    def log_times(self, step: int) -> dict[str, float]:
        """Wall-clock times of the daemon's "STAGED on all", "uploaded ... in Xs" (the end of
        ``ObjectTier.put_shard``, and its duration) and "PERSISTED" lines for ``step``."""
        out: dict[str, float] = {}
        shard = f"/{JOB}/step-{step:012d}/rank-"
        for msg, ts in self.log_messages():
            if ts is None:
                continue
            if msg.startswith(f"step {JOB}@{step} STAGED on all"):
                out["staged"] = ts
            elif msg == f"step {JOB}@{step} PERSISTED":
                out["persisted"] = ts
            elif msg.startswith("uploaded ") and shard in msg and (m := _UPLOADED_RE.search(msg)):
                out["put_end"], out["put_s"] = ts, float(m["s"])
        return out

    def stop(self, stop_wait_s: float = 60) -> None:
        try:
            super().stop(stop_wait_s)
        finally:
            shutil.rmtree(self.shm_dir, ignore_errors=True)
            shutil.rmtree(self.root, ignore_errors=True)
            self.socket.unlink(missing_ok=True)
