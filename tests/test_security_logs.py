"""Security property of a running ckptd: no secret in any log.

A whole workload with credentials configured (object store keys in the daemons' environment, the
peer token from the environment on one node and from a token file on the other) at DEBUG: save,
disk drain, upload to an S3 endpoint (moto), replication to a peer, restore from memory and from
the peer after the node is replaced, ``ckptctl status/ls/show`` against the daemons and the bucket,
``ckptd serve --check`` and a config error. Every log line of every process and every client output
is collected; no secret appears in it, not even a 10-character piece of it, and no signed request
either. (Private files, the owner-only socket and peer authentication: tests/test_security.py.)
"""

from __future__ import annotations

import logging
import secrets
import string
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests._ckptd_helpers import clean_env, free_port, unique_job
from tests.conftest import DaemonProc
from tests.tiers._moto import MotoS3

# -- no secret in any log ------------------------------------------------------------------------


def _secret(prefix: str, n: int) -> str:
    """A random secret from a 62-letter alphabet: no 10-character piece of it turns up by chance."""
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


def _pieces(secret: str, n: int = 10) -> list[str]:
    return [secret[i : i + n] for i in range(len(secret) - n + 1)]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + repr(record.args))


def test_no_secret_in_any_log_of_a_whole_workload(daemon_factory: Callable[..., DaemonProc], moto_s3: MotoS3,
                                                  tmp_path: Path) -> None:
    access_key = _secret("AKIA", 16)
    secret_key = _secret("", 40)
    token = _secret("pt-", 32)
    aws = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    ports = {"n1": free_port(), "n2": free_port()}
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    token_file = tmp_path / "peer-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)

    def config(node_id: str) -> str:
        peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
        text = (f'[daemon]\nlog_level = "DEBUG"\n[memory]\nchunk_bytes = "64KiB"\n'
                f'[peers]\nlisten = "127.0.0.1:{ports[node_id]}"\nnode_id = "{node_id}"\npeers = "{peers}"\n'
                "replication_factor = 1\npush_timeout_s = 10.0\nmax_attempts = 2\n"
                f'[object]\nenabled = true\npreset = "minio"\nendpoint_url = "{moto_s3.endpoint_url}"\n'
                f'region = "us-east-1"\nbucket = "{moto_s3.bucket}"\nprefix = "{prefix}"\n'
                'part_size_bytes = "5MiB"\n')
        return text

    def n1_config() -> str:  # the token from the environment
        return config("n1")

    def n2_config() -> str:  # the token from a file
        return config("n2").replace("replication_factor = 1\n",
                                    f'replication_factor = 1\ntoken_file = "{token_file}"\n')

    n1_env = {**aws, "CKPTD_PEERS_TOKEN": token}
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("ckptd", "ckptd_client")]
    saved_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(records)
        lg.setLevel(logging.DEBUG)
    outputs: list[str] = []
    job = unique_job("sec")
    state = {"w": np.arange(300_000, dtype=np.float32), "meta": {"epoch": 3}}
    try:
        n2 = daemon_factory(config_text=n2_config(), env=aws, extra_args=["--log-level", "DEBUG"])
        n1 = daemon_factory(config_text=n1_config(), env=n1_env, extra_args=["--log-level", "DEBUG"])
        with CheckpointManager(job, rank=0, world_size=1, addr=n1.addr, on_error="raise") as m:
            h = m.save(1, state)
            h.wait(Level.PERSISTED, timeout_s=120)
            h.wait(Level.REPLICATED, timeout_s=60)
            out: dict[str, Any] = {}
            assert m.restore(out) == 1 and m.last_restore is not None
            assert m.last_restore.served_from == "memory" and out["w"].tobytes() == state["w"].tobytes()

        ctl_env = {**aws, "NO_COLOR": "1"}
        bucket = ["--bucket", moto_s3.bucket, "--endpoint", moto_s3.endpoint_url, "--prefix", prefix]
        for args in (["status", "--addr", n1.addr], ["ls", "--addr", n1.addr], ["ls", "--addr", n2.addr],
                     ["show", f"{job}@latest", "--addr", n1.addr], ["ls", *bucket],
                     ["show", f"{job}@1", "--tensors", *bucket], ["status", "-o", "json", "--addr", n2.addr]):
            res = subprocess.run([sys.executable, "-m", "ckptd.ctl.main", *args], capture_output=True, text=True,
                                 timeout=120, env=clean_env(ctl_env))
            assert res.returncode == 0, (args, res.stderr)
            outputs.append(res.stdout + res.stderr)
        assert any(job in o for o in outputs[-3:-1])  # the bucket really was read with the keys

        # the node is lost and replaced: the restore comes from the peer's replica
        n1.kill()
        n1b = daemon_factory(config_text=n1_config(), env=n1_env, extra_args=["--log-level", "DEBUG"])
        with CheckpointManager(job, rank=0, world_size=1, addr=n1b.addr, on_error="raise") as m:
            out = {}
            assert m.restore(out) == 1 and m.last_restore is not None
            assert m.last_restore.served_from == "peer", m.last_restore
            assert out["w"].tobytes() == state["w"].tobytes()
        for d in (n1b, n2):
            assert d.terminate() == 0

        # the config as printed, and a config error, with the token in the file
        cfg = tmp_path / "check.toml"
        cfg.write_text(config("n1").replace("replication_factor = 1\n", f'replication_factor = 1\ntoken = "{token}"\n'))
        res = subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--check", "--config", str(cfg),
                              "--root", str(tmp_path / "chk")], capture_output=True, text=True, timeout=60,
                             env=clean_env(aws))
        assert res.returncode == 0 and "<redacted>" in res.stdout, res
        outputs.append(res.stdout + res.stderr)
        cfg.write_text(cfg.read_text().replace("replication_factor = 1\n", "replication_factor = 99\n"))
        res = subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--check", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60, env=clean_env(aws))
        assert res.returncode == 2 and "peers.replication_factor" in res.stderr, res
        outputs.append(res.stdout + res.stderr)
    finally:
        for lg, level in zip(loggers, saved_levels):
            lg.removeHandler(records)
            lg.setLevel(level)

    logs = [n1.log(), n2.log(), n1b.log()]
    assert all('"level": "debug"' in text for text in logs[:2]), "no DEBUG line reached the daemons' logs"
    assert "uploaded" in logs[0]  # the object tier logged its uploads (at DEBUG)
    text = "\n".join(logs + outputs + records.lines)
    assert len(text) > 10_000
    for name, secret in (("access key id", access_key), ("secret key", secret_key), ("peer token", token)):
        assert secret not in text, f"the {name} is in the logs"
        leaked = [p for p in _pieces(secret) if p in text]
        assert leaked == [], f"pieces of the {name} are in the logs: {leaked}"
    for signed in ("AWS4-HMAC-SHA256", "Signature=", "Credential=", "X-Amz-Security-Token"):
        assert signed not in text
