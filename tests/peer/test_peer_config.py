"""[peers] config: parsing of member lists (config and CKPTD_PEERS), validation naming the key,
token loading, and that registering the section in config.py needs only the documented lines."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from ckptd.core import config as config_mod
from ckptd.core.config.peers import (
    PEERS_ENV,
    DnsDiscovery,
    PeerAddr,
    PeerSection,
    load_token,
    members,
    node_id,
    parse_discovery,
    parse_peer,
    parse_peers,
    split_list,
    tls_files,
    validate_peers,
)
from ckptd.core.errors import InvalidArgument

TOKEN = "a-shared-token-of-24-chars"


def test_defaults_are_valid_and_off() -> None:
    p = validate_peers(PeerSection())
    assert not p.listen and p.replication_factor == 1 and p.chunk_bytes == 4 * 2**20
    assert members(p, {}) == ()
    assert tls_files(p) is None


def test_parse_peer_forms() -> None:
    assert parse_peer("a=10.0.0.1:7070") == PeerAddr("a", "10.0.0.1", 7070, "")
    assert parse_peer(" b = host-2.local:1@rack-2 ") == PeerAddr("b", "host-2.local", 1, "rack-2")
    v6 = parse_peer("c=[fd00::1]:7070@zone/a")
    assert v6.host == "[fd00::1]" and v6.target == "[fd00::1]:7070" and v6.failure_domain == "zone/a"


@pytest.mark.parametrize("entry, match", [
    ("a10.0.0.1:7070", "node_id=host:port"),
    ("=h:1", "node id"),
    ("../x=h:1", "node id"),
    ("a=h", "host:port"),
    ("a=h:0", "port 0"),
    ("a=h:70000", "out of range"),
    ("a=h:1@", "failure domain"),
    ("a=h h:1", "host:port"),
])
def test_parse_peer_errors_name_the_key(entry: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as info:
        parse_peer(entry)
    assert "peers.peers" in str(info.value)


def test_member_lists_from_config_and_env() -> None:
    p = PeerSection(peers=("b=h2:2@r2", "a=h1:1@r1"), token=TOKEN)
    assert [m.node_id for m in members(p, {})] == ["a", "b"]
    assert members(replace(p, peers="a=h1:1, b=h2:2,"), {}) == (PeerAddr("a", "h1", 1), PeerAddr("b", "h2", 2))
    env = {PEERS_ENV: "x=10.1.1.1:9@r9,y=10.1.1.2:9"}
    assert [m.node_id for m in members(p, env)] == ["x", "y"]  # the env replaces the config list
    with pytest.raises(InvalidArgument, match="CKPTD_PEERS.*listed twice"):
        members(p, {PEERS_ENV: "x=h:1,x=h:2"})
    assert split_list(["a", " ", "b "], "k") == ("a", "b")
    with pytest.raises(InvalidArgument, match="k: every entry"):
        split_list(["a", 1], "k")
    with pytest.raises(InvalidArgument, match="k: expected a list"):
        split_list(3, "k")
    assert parse_peers("") == ()


@pytest.mark.parametrize("kw, key", [
    ({"listen": "nope"}, "peers.listen"),
    ({"listen": "0.0.0.0:7070"}, "peers.token"),
    ({"peers": ("a=h:1",)}, "peers.token"),
    ({"token": "short"}, "peers.token"),
    ({"token": TOKEN, "token_file": "/x"}, "peers.token_file"),
    ({"node_id": "a b"}, "peers.node_id"),
    ({"failure_domain": "r 1"}, "peers.failure_domain"),
    ({"replication_factor": -1}, "peers.replication_factor"),
    ({"replication_factor": 17}, "peers.replication_factor"),
    ({"push_timeout_s": 0.0}, "peers.push_timeout_s"),
    ({"fetch_timeout_s": 1e9}, "peers.fetch_timeout_s"),
    ({"chunk_bytes": 8 * 2**20}, "peers.chunk_bytes"),
    ({"chunk_bytes": 65537}, "peers.chunk_bytes"),
    ({"max_inflight_bytes": 1024}, "peers.max_inflight_bytes"),
    ({"max_attempts": 0}, "peers.max_attempts"),
    ({"replica_budget_bytes": -1}, "peers.replica_budget_bytes"),
    ({"drain_wait_s": -1.0}, "peers.drain_wait_s"),
    ({"drain_wait_s": float("nan")}, "peers.drain_wait_s"),
    ({"drain_wait_s": 3601.0}, "peers.drain_wait_s"),
    ({"commit_timeout_s": 0.5}, "peers.commit_timeout_s"),
    ({"commit_timeout_s": float("inf")}, "peers.commit_timeout_s"),
    ({"tls_cert": "/c"}, "peers.tls_cert"),
    ({"tls_ca": "/ca"}, "peers.tls_ca"),
    ({"advertise": "h"}, "peers.advertise"),
    ({"discovery": "srv:x:1", "listen": "h:1", "token": TOKEN}, "peers.discovery"),
    ({"discovery": "dns:x", "listen": "h:1", "token": TOKEN}, "peers.discovery"),
    ({"discovery": "dns:[::1]:7070", "listen": "h:1", "token": TOKEN}, "peers.discovery"),
    ({"discovery": "dns:x:70000", "listen": "h:1", "token": TOKEN}, "peers.discovery"),
    ({"discovery": "dns:x:1"}, "peers.discovery needs peers.listen"),
    ({"discovery": "dns:x:1", "listen": "h:1", "token": TOKEN, "peers": ("a=h:1",)}, "peers.discovery"),
    ({"discovery_interval_s": 0.5}, "peers.discovery_interval_s"),
    ({"discovery_interval_s": float("nan")}, "peers.discovery_interval_s"),
])
def test_validation_names_the_key(kw: dict[str, object], key: str) -> None:
    with pytest.raises(InvalidArgument, match=key.replace(".", r"\.")):
        validate_peers(PeerSection(**kw))  # type: ignore[arg-type]


def test_valid_full_section(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\nignored\n")
    p = validate_peers(PeerSection(listen="[::]:0", token_file=str(tok), node_id="n1", failure_domain="rack-1",
                                   peers=("n1=h:1@rack-1", "n2=h:2@rack-2"), replication_factor=2,
                                   store_on_disk=True, tls_cert="/c", tls_key="/k", tls_ca="/ca"))
    assert load_token(p) == TOKEN
    tls = tls_files(p)
    assert tls is not None and tls.ca == Path("/ca")
    assert load_token(PeerSection(token=TOKEN)) == TOKEN
    (tmp_path / "weak").write_text("abc\n")
    with pytest.raises(InvalidArgument, match="peers.token_file"):
        load_token(PeerSection(token_file=str(tmp_path / "weak")))
    with pytest.raises(InvalidArgument, match="peers.token_file: cannot read"):
        load_token(PeerSection(token_file=str(tmp_path / "missing")))
    for bad in ("token-with-\u00e9-0123456789abcdef", "token\twith-a-tab-0123456789"):
        (tmp_path / "odd").write_text(bad + "\n")
        with pytest.raises(InvalidArgument, match="printable ASCII") as info:
            load_token(PeerSection(token_file=str(tmp_path / "odd")))
        assert bad not in str(info.value)  # the value is never shown


def test_discovery_names_a_dns_name_and_port() -> None:
    p = validate_peers(PeerSection(listen="0.0.0.0:7070", token=TOKEN, discovery_interval_s=5,
                                   discovery=" dns:ckptd-peers.ckptd.svc.cluster.local:7070 "))
    assert parse_discovery(p.discovery) == DnsDiscovery("ckptd-peers.ckptd.svc.cluster.local", 7070)
    assert members(p, {}) == ()  # no static list: the members come from the name


def test_node_id_defaults_to_a_grammar_safe_host_name() -> None:
    assert node_id(PeerSection(node_id="explicit")) == "explicit"
    from ckptd.core.types import validate_node_id

    assert validate_node_id(node_id(PeerSection()))


def test_registration_in_config_is_one_section_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What the lead adds to config.py: ``"peers": PeerSection`` in _SECTIONS and a ``peers`` field
    on Config; then TOML and CKPTD_PEERS_* values flow through the existing coercion."""

    @dataclass(frozen=True)
    class ConfigWithPeers(config_mod.Config):
        peers: PeerSection = field(default_factory=PeerSection)

    monkeypatch.setitem(config_mod._SECTIONS, "peers", PeerSection)
    cfg = config_mod._apply(ConfigWithPeers(), {"peers": {
        "listen": "0.0.0.0:7070", "token": TOKEN, "replication_factor": 2, "push_timeout_s": 5,
        "store_on_disk": True, "chunk_bytes": "1MiB", "peers": "a=h:1@r1,b=h:2@r2",
    }}, "file x")
    env = config_mod.env_overrides({"CKPTD_PEERS_NODE_ID": "a", "CKPTD_PEERS_MAX_ATTEMPTS": "4",
                                    "CKPTD_PEERS": "ignored=by:1"})
    cfg = config_mod._apply(cfg, env, "env")
    p = validate_peers(cfg.peers)  # type: ignore[attr-defined]
    assert (p.listen, p.replication_factor, p.push_timeout_s, p.store_on_disk, p.chunk_bytes) == (
        "0.0.0.0:7070", 2, 5.0, True, 2**20)
    assert (p.node_id, p.max_attempts) == ("a", 4)
    assert [m.node_id for m in members(p, {})] == ["a", "b"]
