"""Daemon configuration: a TOML file, overridden by ``CKPTD_<SECTION>_<KEY>`` env, then flags.

This package holds the sections; ``peers.py`` and ``object.py`` are the ``[peers]`` and ``[object]``
sections, ``sizes.py`` the size grammar every section uses.

Every value is validated here with a message that names the key and the source it came from;
nothing downstream re-checks types. Sizes accept integers (bytes) or strings with a unit
("512MiB", "8GiB"). Unknown keys are errors, not silently ignored. Example::

    [daemon]
    root = "/var/lib/ckptd"
    socket = "/run/ckptd/ckptd.sock"
    [memory]
    budget_bytes = "16GiB"
    backpressure = "wait"
    [disk]
    max_to_keep = 3
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from ckptd.core import sched
from ckptd.core.config.object import ObjectSection as ObjectSection  # re-exported: [object] is a section here
from ckptd.core.config.object import validate_object as validate_object
from ckptd.core.config.peers import PeerSection, split_list, validate_peers
from ckptd.core.config.sizes import parse_bytes as parse_bytes  # re-exported: the name config offered
from ckptd.core.errors import InvalidArgument
from ckptd.core.fsops import check_shm_dir, resolve_group
from ckptd.core.types import SLOT_ALIGN_BYTES

MAX_SOCKET_PATH: Final = 100
SOCKET_MODE_OWNER: Final = "0600"
SOCKET_MODE_GROUP: Final = "0660"
RELEASE_MEMORY_MODES: Final = ("off", "durable", "force")
REDACTED: Final = "<redacted>"
SECRET_KEYS: Final = frozenset({"token"})  # values never echoed in a repr or an error message
@dataclass(frozen=True)
class DaemonSection:
    root: Path = Path("/var/lib/ckptd")
    socket: Path | None = None  # default: {root}/run/ckptd.sock
    shm_dir: Path | None = None  # default: /dev/shm/ckptd-{uid}-{hash(root)}
    shutdown_timeout_s: float = 60.0
    io_threads: int = 4
    log_level: str = "INFO"
    nice: int = 0  # 0..19: yield the CPU to training (ckptd/core/sched.py)
    cpu_affinity: str = ""  # a CPU list, e.g. "6-7": keep off the training cores ("": any CPU)
    # "0600": the daemon's user only. "0660": also the group socket_group (default: the daemon's
    # primary group), for trainers of another user; the shm dir is then 2750 and slot files 0660
    # in that group (README, "Trainers of another user").
    socket_mode: str = "0600"
    socket_group: str = ""  # group name or gid; only with socket_mode "0660"
    # shm slots outlive the daemon (re-adoption after a restart). At a clean stop: "off" keeps
    # them, "durable" frees those whose shards are committed on disk, "force" frees them all.
    release_memory_on_exit: str = "off"


@dataclass(frozen=True)
class MemorySection:
    budget_bytes: int = 8 * 2**30
    slots_per_rank: int = 3  # >= 2; a third lets N+2 stage while N drains and N+1 is the newest
    backpressure: str = "wait"  # wait | skip
    wait_timeout_s: float = 30.0
    chunk_bytes: int = 16 * 2**20
    max_shard_bytes: int = 1 * 2**40
    lease_timeout_s: float = 600.0


@dataclass(frozen=True)
class DiskSection:
    enabled: bool = True
    max_to_keep: int = 3
    keep_period: int = 0  # also keep every step divisible by this (0: off)
    every_n_steps: int = 1
    direct_io: bool = True  # O_DIRECT writes where the filesystem supports them
    write_block_bytes: int = 8 * 2**20


@dataclass(frozen=True)
class MetricsSection:
    address: str = ""  # "host:port" for the Prometheus exporter; empty: off


@dataclass(frozen=True)
class Config:
    daemon: DaemonSection = field(default_factory=DaemonSection)
    memory: MemorySection = field(default_factory=MemorySection)
    disk: DiskSection = field(default_factory=DiskSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    object: ObjectSection = field(default_factory=ObjectSection)
    peers: PeerSection = field(default_factory=PeerSection)

    def __repr__(self) -> str:
        """The whole config (``ckptd serve --check`` prints it) with every secret masked."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.peers.token:
            shown["peers"] = replace(self.peers, token=REDACTED)
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def socket_path(self) -> Path:
        return self.daemon.socket or self.daemon.root / "run" / "ckptd.sock"

    @property
    def shared_gid(self) -> int | None:
        """The group trainers of another user reach the socket and slots through, or None when
        only the daemon's user may (socket_mode "0600")."""
        if self.daemon.socket_mode != SOCKET_MODE_GROUP:
            return None
        return resolve_group(self.daemon.socket_group) if self.daemon.socket_group else os.getgid()

    @property
    def shm_path(self) -> Path:
        if self.daemon.shm_dir is not None:
            return self.daemon.shm_dir
        digest = hashlib.sha256(str(self.daemon.root.resolve()).encode()).hexdigest()[:10]
        return Path("/dev/shm") / f"ckptd-{os.getuid()}-{digest}"


_SECTIONS: Final = {
    "daemon": DaemonSection, "memory": MemorySection, "disk": DiskSection, "metrics": MetricsSection,
    "object": ObjectSection, "peers": PeerSection,
}
_SIZE_KEYS: Final = {"budget_bytes", "chunk_bytes", "max_shard_bytes", "write_block_bytes", "part_size_bytes",
                     "max_inflight_bytes", "replica_budget_bytes"}


def _coerce(section: str, key: str, raw: Any, default: Any, source: str) -> Any:
    name = f"{section}.{key} ({source})"
    if key in SECRET_KEYS and not isinstance(raw, str):
        raise InvalidArgument(f"{name}: expected a string, got {type(raw).__name__} (value not shown)")
    if isinstance(raw, str) and "\x00" in raw:  # no path, name or token may hold one
        raise InvalidArgument(f"{name}: must not contain a NUL character")
    from_env = source.startswith("env")
    if key in _SIZE_KEYS:
        return parse_bytes(raw, name)
    if isinstance(default, tuple):
        return split_list(raw, name)
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if from_env and str(raw).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(raw).lower() in ("1", "true", "yes", "on")
        raise InvalidArgument(f"{name}: expected true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            if isinstance(raw, bool) or (not from_env and not isinstance(raw, int)):
                raise ValueError
            return int(raw)
        except ValueError:
            raise InvalidArgument(f"{name}: expected an integer, got {raw!r}") from None
    if isinstance(default, float):
        try:
            if isinstance(raw, bool) or (not from_env and not isinstance(raw, (int, float))):
                raise ValueError
            return float(raw)
        except ValueError:
            raise InvalidArgument(f"{name}: expected a number, got {raw!r}") from None
    if key in ("root", "socket", "shm_dir"):
        if not isinstance(raw, str) or not raw:
            raise InvalidArgument(f"{name}: expected a path string")
        return Path(raw).expanduser()
    if not isinstance(raw, str):
        raise InvalidArgument(f"{name}: expected a string, got {raw!r}")
    return raw


def _apply(cfg: Config, values: Mapping[str, Mapping[str, Any]], source: str) -> Config:
    for section, items in values.items():
        cls = _SECTIONS.get(section)
        if cls is None:
            raise InvalidArgument(f"unknown config section [{section}] ({source})")
        if not isinstance(items, Mapping):
            raise InvalidArgument(f"[{section}] must be a table ({source})")
        current = getattr(cfg, section)
        known = {f.name: getattr(current, f.name) for f in fields(cls)}
        updates: dict[str, Any] = {}
        for key, raw in items.items():
            if key not in known:
                raise InvalidArgument(
                    f"unknown config key {section}.{key} ({source}); known: {', '.join(known)}"
                )
            default = getattr(cls(), key)
            updates[key] = _coerce(section, key, raw, default if default is not None else "", source)
        cfg = replace(cfg, **{section: replace(current, **updates)})
    return cfg


def env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Collect CKPTD_<SECTION>_<KEY> variables into {section: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith("CKPTD_"):
            continue
        rest = name[len("CKPTD_") :].lower()
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1 :]] = value
                break
    return out


def validate(cfg: Config) -> Config:
    """Cross-field checks; raise InvalidArgument naming the key."""
    m, d, dm = cfg.memory, cfg.disk, cfg.daemon
    if m.backpressure not in ("wait", "skip"):
        raise InvalidArgument(f"memory.backpressure must be 'wait' or 'skip', got {m.backpressure!r}")
    if m.slots_per_rank < 2:
        raise InvalidArgument("memory.slots_per_rank must be at least 2 (N+1 stages while N drains)")
    if m.budget_bytes <= 0:
        raise InvalidArgument("memory.budget_bytes must be positive")
    if m.budget_bytes < SLOT_ALIGN_BYTES:
        raise InvalidArgument(f"memory.budget_bytes must be at least {SLOT_ALIGN_BYTES // 2**20}MiB (the smallest "
                              f"shared-memory slot), got {m.budget_bytes}")
    if not 4096 <= m.chunk_bytes <= 2**30 or m.chunk_bytes % 4096:
        raise InvalidArgument("memory.chunk_bytes must be a multiple of 4096 in [4KiB, 1GiB]")
    for key, val in (("memory.wait_timeout_s", m.wait_timeout_s),
                     ("memory.lease_timeout_s", m.lease_timeout_s),
                     ("daemon.shutdown_timeout_s", dm.shutdown_timeout_s)):
        if not val >= 0 or val > 86400:
            raise InvalidArgument(f"{key} must be in [0, 86400], got {val}")
    if d.max_to_keep < 1:
        raise InvalidArgument("disk.max_to_keep must be at least 1")
    if d.keep_period < 0 or d.every_n_steps < 1:
        raise InvalidArgument("disk.keep_period must be >= 0 and disk.every_n_steps >= 1")
    if not 4096 <= d.write_block_bytes <= 2**30 or d.write_block_bytes % 4096:
        raise InvalidArgument("disk.write_block_bytes must be a multiple of 4096 in [4KiB, 1GiB]")
    if not 1 <= dm.io_threads <= 256:
        raise InvalidArgument("daemon.io_threads must be in [1, 256]")
    sched.validate(dm.nice, dm.cpu_affinity)
    if dm.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise InvalidArgument("daemon.log_level must be DEBUG, INFO, WARNING or ERROR")
    if cfg.metrics.address:
        host, sep, port = cfg.metrics.address.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidArgument(f"metrics.address must be host:port, got {cfg.metrics.address!r}")
    if dm.release_memory_on_exit not in RELEASE_MEMORY_MODES:
        raise InvalidArgument(f"daemon.release_memory_on_exit must be one of {', '.join(RELEASE_MEMORY_MODES)}, "
                              f"got {dm.release_memory_on_exit!r}")
    if dm.socket_mode not in (SOCKET_MODE_OWNER, SOCKET_MODE_GROUP):
        raise InvalidArgument(f"daemon.socket_mode must be {SOCKET_MODE_OWNER!r} (the daemon's user only) or "
                              f"{SOCKET_MODE_GROUP!r} (also daemon.socket_group), got {dm.socket_mode!r}")
    if dm.socket_group:
        if dm.socket_mode != SOCKET_MODE_GROUP:
            raise InvalidArgument(f"daemon.socket_group needs daemon.socket_mode = {SOCKET_MODE_GROUP!r} "
                                  "(the group gets no access with the default 0600)")
        resolve_group(dm.socket_group)
    if dm.shm_dir is not None:
        check_shm_dir(dm.shm_dir, cfg.daemon.root, cfg.socket_path)
    validate_object(cfg.object)
    validate_peers(cfg.peers)
    if cfg.peers.token and not _PRINTABLE_ASCII.fullmatch(cfg.peers.token):
        raise InvalidArgument("peers.token must be printable ASCII (it travels in gRPC metadata; value not shown)")
    if len(str(cfg.socket_path)) > MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"socket path {cfg.socket_path} is longer than {MAX_SOCKET_PATH} characters "
            "(Unix socket limit); set daemon.socket to a shorter path"
        )
    return cfg


_PRINTABLE_ASCII: Final = re.compile(r"[\x20-\x7e]+")
def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the config: defaults < TOML file < CKPTD_* env < flags, then validate."""
    cfg = Config()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None
        except RecursionError:
            raise InvalidArgument(f"config file {path} is not valid TOML: nested too deeply") from None
        except OSError as exc:  # a directory, no permission, an I/O error
            raise InvalidArgument(f"cannot read config file {path}: {exc.strerror or exc}") from None
        cfg = _apply(cfg, data, f"file {path}")
    cfg = _apply(cfg, env_overrides(os.environ if env is None else env), "env")
    if flags:
        cfg = _apply(cfg, flags, "flag")
    return validate(cfg)
