"""Shared fixtures: real ckptd daemons as subprocesses on Unix sockets, with private shm dirs.

``daemon_factory(**overrides)`` starts ``ckptd serve`` with a fresh root and shm directory (or
given ones, to restart a node on the same state), waits until it answers, and returns a
``DaemonProc``; every daemon is killed and its shm directory removed at teardown. ``shm_dir`` is
a fresh slot directory for the tests that build a ``SlotPool`` in process.

Fixtures more than one folder uses live here too: ``moto_s3`` (session), a real S3 endpoint on
127.0.0.1 (tests/tiers/_moto.py), ``proxy``, a fault-injecting proxy in front of it
(tests/tiers/faultproxy.py), and ``saved``, two steps of a two-rank job saved into a fresh daemon
for the ckptctl tests (tests/_ckptctl_kit.py). Their modules are imported when a test asks for
them. Each folder's own fixtures are in its conftest.py; states come from tests/state_factory.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from ckptd_client.rpc import wait_until_serving

from ckptd.core.errors import DaemonUnavailable
from tests._ckptd_helpers import die_with_parent

if TYPE_CHECKING:
    from tests._ckptctl_kit import Saved
    from tests.tiers._moto import MotoS3
    from tests.tiers.faultproxy import FaultProxy

REPO = Path(__file__).resolve().parent.parent


@dataclass
class DaemonProc:
    root: Path
    shm_dir: Path
    socket: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return str(self.socket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_for_daemon(socket: Path, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 20) -> None:
    try:
        wait_until_serving(socket, timeout_s, exit_code=proc.poll)
    except DaemonUnavailable as exc:
        raise RuntimeError(f"{exc}:\n{log_path.read_text()}") from None


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    procs: list[DaemonProc] = []
    shm_dirs: set[Path] = set()
    short = Path(tempfile.mkdtemp(prefix="ckt-", dir="/tmp"))

    def start(
        root: Path | None = None,
        shm_dir: Path | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        config_text: str | None = None,
        wait: bool = True,
        prefix: list[str] | None = None,
    ) -> DaemonProc:
        root = root or tmp_path / f"root-{uuid.uuid4().hex[:6]}"
        root.mkdir(parents=True, exist_ok=True)
        shm_dir = shm_dir or Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:10]}"
        shm_dirs.add(shm_dir)
        socket = short / f"{uuid.uuid4().hex[:8]}.sock"
        args = [sys.executable, "-m", "ckptd.daemon.cli", "serve", "--root", str(root), "--socket", str(socket),
                "--shm-dir", str(shm_dir), "--budget-bytes", "512MiB"]
        if config_text is not None:
            cfg = root.parent / f"ckptd-{uuid.uuid4().hex[:6]}.toml"
            cfg.write_text(config_text)
            args += ["--config", str(cfg)]
        args = [*(prefix or []), *args, *(extra_args or [])]  # prefix: a command that execs the rest
        full_env = {**os.environ, **(env or {})}
        log_path = tmp_path / f"daemon-{len(procs)}.log"
        proc = subprocess.Popen(die_with_parent(args), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                                env=full_env)
        d = DaemonProc(root, shm_dir, socket, proc, log_path, full_env, args)
        procs.append(d)
        if wait:
            wait_for_daemon(socket, proc, log_path)
        return d

    yield start
    for d in procs:
        d.kill()
    for s in shm_dirs:
        shutil.rmtree(s, ignore_errors=True)
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh slot directory for an in-process ``SlotPool`` (not created yet), removed at teardown."""
    path = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:10]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProc]) -> DaemonProc:
    return daemon_factory()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    from tests.tiers._moto import serve_moto

    with serve_moto() as s3:
        yield s3


@pytest.fixture
def proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    from tests.tiers.faultproxy import FaultProxy

    p = FaultProxy(moto_s3.endpoint_url, bucket=moto_s3.bucket)
    yield p
    p.close()


@pytest.fixture
def saved(daemon: DaemonProc) -> Saved:
    from tests._ckptctl_kit import save_steps

    return save_steps(daemon)
