"""The [peers] config section: this node's peer endpoint, the job's static membership, replication.

Registered in the package (``__init__.py``) like every other section (``"peers": PeerSection`` in
``_SECTIONS`` and a ``peers`` field on ``Config``), so the TOML file and ``CKPTD_PEERS_<KEY>``
variables set it with the usual precedence. The static member list may also come from
``CKPTD_PEERS`` (comma-separated, it replaces the configured list), or from the job through
``torch.distributed`` at run time.

Example::

    [peers]
    listen = "0.0.0.0:7070"
    token_file = "/etc/ckptd/peer-token"
    node_id = "node-a"
    failure_domain = "rack-1"
    peers = ["node-a=10.0.0.1:7070@rack-1", "node-b=10.0.0.2:7070@rack-2"]
    replication_factor = 1

or, instead of a static list, membership from the cluster (ckptd/peers/discovery.py)::

    discovery = "dns:ckptd-peers.ckptd.svc.cluster.local:7070"   # a headless Service's name
    discovery_interval_s = 10

Invariants (``validate_peers``): a token is required (>= 16 characters, from ``token`` or
``token_file``, not both) as soon as the service listens or peers are listed; member entries are
``node_id=host:port[@domain]`` with unique node ids; ``discovery`` is ``dns:name:port``, needs
``listen`` and excludes a static list; every error names its key.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ckptd.core.errors import InvalidArgument
from ckptd.core.types import MAX_TRANSFER_CHUNK_BYTES, validate_node_id

PEERS_ENV: Final = "CKPTD_PEERS"
MIN_TOKEN_CHARS: Final = 16
MAX_REPLICATION_FACTOR: Final = 16
_DOMAIN_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_HOST_RE: Final = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class PeerSection:
    """[peers]: peer replication between the job's daemons (off while ``listen`` is empty)."""

    listen: str = ""  # host:port of the peer service; empty: off; port 0 picks a free port
    advertise: str = ""  # host:port peers dial to reach this node; empty: listen's
    token: str = ""  # shared secret of the job's daemons (prefer token_file)
    token_file: str = ""  # file holding the token (first line)
    node_id: str = ""  # empty: the host name
    failure_domain: str = ""  # e.g. "rack-3"; replicas prefer other domains
    peers: tuple[str, ...] | str = ()  # "node_id=host:port[@domain]" entries (list or comma-separated)
    replication_factor: int = 1  # k peers hold each shard; 0: no replication
    discovery: str = ""  # "dns:name:port": members are the addresses name resolves to (a headless Service)
    discovery_interval_s: float = 10.0  # how often discovery resolves the name again
    push_timeout_s: float = 60.0  # bound on one shard push (then the next peer in the ring)
    fetch_timeout_s: float = 600.0  # bound on one shard fetch during a restore
    chunk_bytes: int = MAX_TRANSFER_CHUNK_BYTES  # transfer chunk (<= 4 MiB), one crc32c each
    max_inflight_bytes: int = 64 * 2**20  # bytes of gRPC-path pushes being written at once
    replica_budget_bytes: int = 0  # cap on shm bytes holding other nodes' replicas (0: no cap of its own)
    max_attempts: int = 3  # attempts per call on a transport failure (UNAVAILABLE), the first included
    store_on_disk: bool = False  # replicas received also go to this node's disk tier
    prepare_restore: bool = True  # at start, allocate slots for this node's shards that peers hold
    drain_wait_s: float = 2.0  # a step's disk write waits this long at most for this node's push of it
    commit_timeout_s: float = 600.0  # a step's commit across nodes waits this long for every node's report
    tls_cert: str = ""  # PEM certificate chain; with tls_key: TLS on the peer port and for dialing
    tls_key: str = ""
    tls_ca: str = ""  # CA that signed the peers' certificates (also enables client certificates)
    tls_server_name: str = ""  # name to check in peer certificates (default: the dialed host)


@dataclass(frozen=True)
class PeerAddr:
    """One member of the job: node id, dial address, failure domain ('' when unlabelled)."""

    node_id: str
    host: str
    port: int
    failure_domain: str = ""

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DnsDiscovery:
    """``dns:name:port``: every address ``name`` resolves to is a member listening on ``port``."""

    name: str
    port: int


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None
    server_name: str = ""


def parse_hostport(value: str, key: str, allow_port_zero: bool = False) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not _HOST_RE.fullmatch(host) or not port.isdigit():
        raise InvalidArgument(f"{key}: expected host:port (IPv6 as [addr]:port), got {value!r}")
    n = int(port)
    if not (0 if allow_port_zero else 1) <= n <= 65535:
        raise InvalidArgument(f"{key}: port {n} out of range in {value!r}")
    return host, n


def parse_peer(entry: str, key: str = "peers.peers") -> PeerAddr:
    """Parse ``node_id=host:port[@domain]``."""
    node_id, sep, rest = entry.strip().partition("=")
    if not sep:
        raise InvalidArgument(f"{key}: entry {entry!r} is not node_id=host:port[@domain]")
    try:
        validate_node_id(node_id.strip())
    except ValueError as exc:
        raise InvalidArgument(f"{key}: {exc}") from None
    addr, at, domain = rest.partition("@")
    if at and not _DOMAIN_RE.fullmatch(domain):
        raise InvalidArgument(f"{key}: failure domain {domain!r} of {node_id!r} must be 1-128 letters, "
                              "digits, '.', '_', '/' or '-'")
    host, port = parse_hostport(addr, f"{key} ({node_id})")
    return PeerAddr(node_id.strip(), host, port, domain)


def parse_discovery(value: str, key: str = "peers.discovery") -> DnsDiscovery:
    """Parse ``dns:name:port`` (the only scheme: a DNS name, e.g. a headless Service's)."""
    scheme, sep, rest = value.strip().partition(":")
    if not sep or scheme != "dns":
        raise InvalidArgument(f"{key}: expected dns:name:port, got {value!r}")
    host, port = parse_hostport(rest, key)
    if host.startswith("["):
        raise InvalidArgument(f"{key}: expected a DNS name, got the address {host!r}")
    return DnsDiscovery(host, port)


def split_list(raw: Any, key: str) -> tuple[str, ...]:
    """A TOML list of strings or one comma-separated string -> tuple of non-empty stripped items.

    the package's ``_coerce`` calls this for tuple-typed keys.
    """
    if isinstance(raw, str):
        items: Sequence[Any] = raw.split(",")
    elif isinstance(raw, (list, tuple)):
        items = raw
    else:
        raise InvalidArgument(f"{key}: expected a list of strings or a comma-separated string")
    if not all(isinstance(i, str) for i in items):
        raise InvalidArgument(f"{key}: every entry must be a string")
    return tuple(i.strip() for i in items if i.strip())


def parse_peers(raw: Any, key: str = "peers.peers") -> tuple[PeerAddr, ...]:
    """Parse a member list; node ids must be unique. Sorted by node id."""
    out: dict[str, PeerAddr] = {}
    for entry in split_list(raw, key):
        p = parse_peer(entry, key)
        if p.node_id in out:
            raise InvalidArgument(f"{key}: node id {p.node_id!r} is listed twice")
        out[p.node_id] = p
    return tuple(out[n] for n in sorted(out))


def members(section: PeerSection, env: Mapping[str, str]) -> tuple[PeerAddr, ...]:
    """The static membership: ``CKPTD_PEERS`` when set (it replaces the config), else peers.peers."""
    if env.get(PEERS_ENV, "").strip():
        return parse_peers(env[PEERS_ENV], PEERS_ENV)
    return parse_peers(section.peers)


def split_target_host(target: str) -> str:
    """The address other nodes dial for a listen/advertise ``host:port``: a wildcard or empty
    host becomes this machine's host name."""
    host, _, port = target.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


def node_id(section: PeerSection) -> str:
    """This node's id: the configured one, else the host name made grammar-safe."""
    if section.node_id:
        return section.node_id
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".-_") or "node"
    return validate_node_id(name[:128].replace("..", "-"))


def load_token(section: PeerSection) -> str:
    """The shared token (from ``token`` or the first line of ``token_file``)."""
    if section.token_file:
        try:
            text = Path(section.token_file).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"peers.token_file: cannot read {section.token_file}: {exc}") from None
        token = text.splitlines()[0].strip() if text.strip() else ""
        if len(token) < MIN_TOKEN_CHARS:
            raise InvalidArgument(f"peers.token_file: the token must be at least {MIN_TOKEN_CHARS} characters")
        if not (token.isascii() and token.isprintable()):
            raise InvalidArgument("peers.token_file: the token must be printable ASCII (it travels in gRPC "
                                  "metadata; value not shown)")
        return token
    return section.token


def tls_files(section: PeerSection) -> TlsFiles | None:
    if not section.tls_cert:
        return None
    return TlsFiles(Path(section.tls_cert).expanduser(), Path(section.tls_key).expanduser(),
                    Path(section.tls_ca).expanduser() if section.tls_ca else None, section.tls_server_name)


def validate_peers(p: PeerSection) -> PeerSection:
    """Checks of [peers]; raise InvalidArgument naming the key. Reads no file."""
    if p.listen:
        parse_hostport(p.listen, "peers.listen", allow_port_zero=True)
    if p.advertise:
        parse_hostport(p.advertise, "peers.advertise")
    if p.node_id:
        try:
            validate_node_id(p.node_id)
        except ValueError as exc:
            raise InvalidArgument(f"peers.node_id: {exc}") from None
    if p.failure_domain and not _DOMAIN_RE.fullmatch(p.failure_domain):
        raise InvalidArgument(f"peers.failure_domain {p.failure_domain!r} must be 1-128 letters, digits, "
                              "'.', '_', '/' or '-'")
    listed = parse_peers(p.peers)
    if p.discovery:
        parse_discovery(p.discovery)
        if listed:
            raise InvalidArgument("peers.discovery and peers.peers are exclusive: membership comes from the "
                                  "cluster or from the list, not both")
        if not p.listen:
            raise InvalidArgument("peers.discovery needs peers.listen (discovered members dial this node)")
    if not 1 <= p.discovery_interval_s <= 3600:
        raise InvalidArgument(f"peers.discovery_interval_s must be in [1, 3600], got {p.discovery_interval_s}")
    if p.token and p.token_file:
        raise InvalidArgument("peers.token and peers.token_file are exclusive; set one")
    if p.token and (len(p.token) < MIN_TOKEN_CHARS or p.token != p.token.strip()):
        raise InvalidArgument(f"peers.token must be at least {MIN_TOKEN_CHARS} characters without "
                              "surrounding spaces")
    if (p.listen or listed) and not (p.token or p.token_file):
        raise InvalidArgument("peers.token or peers.token_file is required when peers.listen or "
                              "peers.peers is set (peers authenticate with a shared token)")
    if not 0 <= p.replication_factor <= MAX_REPLICATION_FACTOR:
        raise InvalidArgument(f"peers.replication_factor must be in [0, {MAX_REPLICATION_FACTOR}], "
                              f"got {p.replication_factor}")
    for key, secs in (("push_timeout_s", p.push_timeout_s), ("fetch_timeout_s", p.fetch_timeout_s)):
        if not 0 < secs <= 86400:
            raise InvalidArgument(f"peers.{key} must be in (0, 86400], got {secs}")
    if not 0 <= p.drain_wait_s <= 3600:
        raise InvalidArgument(f"peers.drain_wait_s must be in [0, 3600], got {p.drain_wait_s}")
    if not 1 <= p.commit_timeout_s <= 86400:
        raise InvalidArgument(f"peers.commit_timeout_s must be in [1, 86400], got {p.commit_timeout_s}")
    if not 64 * 1024 <= p.chunk_bytes <= MAX_TRANSFER_CHUNK_BYTES or p.chunk_bytes % 4096:
        raise InvalidArgument(f"peers.chunk_bytes must be a multiple of 4096 in [64KiB, 4MiB], got {p.chunk_bytes}")
    if not p.chunk_bytes <= p.max_inflight_bytes <= 2**40:
        raise InvalidArgument(f"peers.max_inflight_bytes must be in [peers.chunk_bytes, 1TiB], "
                              f"got {p.max_inflight_bytes}")
    if not 0 <= p.replica_budget_bytes <= 2**50:
        raise InvalidArgument(f"peers.replica_budget_bytes must be in [0, 1PiB], got {p.replica_budget_bytes}")
    if not 1 <= p.max_attempts <= 20:
        raise InvalidArgument(f"peers.max_attempts must be in [1, 20], got {p.max_attempts}")
    if bool(p.tls_cert) != bool(p.tls_key):
        raise InvalidArgument("peers.tls_cert and peers.tls_key must be set together")
    if (p.tls_ca or p.tls_server_name) and not p.tls_cert:
        raise InvalidArgument("peers.tls_ca and peers.tls_server_name need peers.tls_cert and peers.tls_key")
    return p
