"""docker/docker-compose.yml is well formed and what it mounts is a valid ckptd config.

This machine has no Docker engine, so the stack itself cannot run here; these checks catch the
mistakes that would stop it: missing services, images, volumes, shm sizes, healthchecks, ordering,
a ckptd.toml that ckptd would refuse, nodes that would not peer (token, addresses), ports not
published, a root or CUDA-by-default image, a build context without a .dockerignore, and
environment overrides that are no config key. ``docker compose config`` renders the file too
where the Compose plugin exists (skipped otherwise: it is not needed for the other checks).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckptd.core import config
from ckptd.core.config import peers as peer_config

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
NODES = ("ckptd-node1", "ckptd-node2")
SECRETS_DIR = "/run/secrets"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_services_images_and_ordering() -> None:
    services = _compose()["services"]
    assert set(services) == {"minio", "minio-init", "ckptd-node1", "ckptd-node2", "trainer-rank0", "trainer-rank1"}
    assert services["minio"]["image"].startswith("minio/minio:RELEASE.")  # pinned, not latest
    assert services["minio-init"]["image"].startswith("minio/mc:RELEASE.")
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for node in ("ckptd-node1", "ckptd-node2"):
        svc = services[node]
        assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert svc["command"][:2] == ["ckptd", "serve"]
        assert svc["ipc"] == "shareable"
    for rank, node in ((0, "ckptd-node1"), (1, "ckptd-node2")):
        svc = services[f"trainer-rank{rank}"]
        assert svc["depends_on"][node]["condition"] == "service_healthy"
        assert svc["ipc"] == f"service:{node}" and svc["pid"] == f"service:{node}"
        cmd = svc["command"]
        assert cmd[cmd.index("--node-ranks") + 1] == str(rank)
        assert (DOCKER.parent / cmd[1]).is_file()


def test_healthchecks_shm_and_volumes() -> None:
    data = _compose()
    services = data["services"]
    for name in ("minio", "ckptd-node1", "ckptd-node2"):
        hc = services[name]["healthcheck"]
        assert hc["test"][0] == "CMD" and hc["retries"] >= 10
    for node in ("ckptd-node1", "ckptd-node2"):
        svc = services[node]
        size = config.parse_bytes(svc["shm_size"].upper().replace("GB", "GiB"), "shm_size")
        node_cfg = config.load(DOCKER / "ckptd-node.toml", env={})
        assert size > node_cfg.memory.budget_bytes  # the slots fit the container's /dev/shm
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert mounts["/etc/ckptd/ckptd.toml"] == "./ckptd-node.toml"
        assert "/var/lib/ckptd" in mounts and "/run/ckptd" in mounts
    named = {m.split(":")[0] for svc in services.values() for m in svc.get("volumes", []) if not m.startswith(".")}
    assert named <= set(data["volumes"])
    # each trainer shares its own node's socket volume
    # (and the results volume, see test_trainer_results_volume_and_exit_command)
    assert services["trainer-rank0"]["volumes"][0] == "node1-run:/run/ckptd"
    assert services["trainer-rank1"]["volumes"][0] == "node2-run:/run/ckptd"


def test_mounted_config_is_valid_for_ckptd() -> None:
    data = _compose()
    env = {k: str(v) for k, v in data["services"]["ckptd-node1"]["environment"].items() if k.startswith("CKPTD_")}
    cfg = config.load(DOCKER / "ckptd-node.toml", env=env)
    assert cfg.object.enabled and cfg.object.preset == "minio" and cfg.object.bucket == "ckptd"
    assert cfg.object.endpoint_url == "http://minio:9000"
    assert str(cfg.socket_path) == "/run/ckptd/ckptd.sock"
    init = " ".join(data["services"]["minio-init"]["command"])
    assert f"local/{cfg.object.bucket}" in init  # the init job creates the bucket ckptd uses
    assert cfg.metrics.address.endswith(":9464")


def _node_env(name: str) -> dict[str, str]:
    """The CKPTD_* variables of one node service (the MinIO credentials are not ckptd's)."""
    env = _compose()["services"][name]["environment"]
    assert isinstance(env, dict)  # a mapping, so the YAML merge key keeps the credentials too
    return {k: str(v) for k, v in env.items() if k.startswith("CKPTD_")}


def _node_config(name: str) -> config.Config:
    return config.load(DOCKER / "ckptd-node.toml", env=_node_env(name))


def test_env_overrides_are_config_keys() -> None:
    """Every CKPTD_<SECTION>_<KEY> of a node names a real key (a typo would be an error at start;
    one under no section would be silently ignored, so none is allowed besides CKPTD_PEERS)."""
    known = {f"CKPTD_{section.upper()}_{f.upper()}"
             for section, values in _resolved_json(NODES[0]).items() for f in values}
    for node in NODES:
        env = _node_env(node)
        assert env, f"{node} has no per-node overrides"
        unknown = set(env) - known - {peer_config.PEERS_ENV}
        assert not unknown, f"{node}: {sorted(unknown)} are not config keys"


def _resolved_json(node: str) -> dict[str, dict[str, Any]]:
    """``ckptd serve --check --json`` of the mounted file with the node's env overrides, in a
    fresh process (the daemon's own loader, not this test's reading of it)."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    env.update(_node_env(node))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "client"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--check", "--json",
                           "--config", str(DOCKER / "ckptd-node.toml")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{node}: ckptd serve --check refused its config: {proc.stderr}"
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("node", NODES)
def test_each_node_config_passes_serve_check(node: str) -> None:
    resolved = _resolved_json(node)
    cfg = _node_config(node)
    assert resolved["peers"]["node_id"] == cfg.peers.node_id
    assert resolved["daemon"]["socket"] == "/run/ckptd/ckptd.sock"
    assert resolved["object"]["enabled"] and resolved["disk"]["enabled"]


def test_nodes_peer_with_each_other() -> None:
    data = _compose()
    services = data["services"]
    cfgs = {node: _node_config(node) for node in NODES}
    ids = {node: cfg.peers.node_id for node, cfg in cfgs.items()}
    assert len(set(ids.values())) == len(NODES) and all(ids.values())
    for node, cfg in cfgs.items():
        p = cfg.peers
        assert p.replication_factor > 0
        assert len(NODES) - 1 >= p.replication_factor  # enough other nodes to hold k replicas
        _, listen_port = peer_config.parse_hostport(p.listen, "peers.listen")
        # the address the other node dials: this service's name on the compose network
        host, port = peer_config.parse_hostport(p.advertise, "peers.advertise")
        assert (host, port) == (node, listen_port)
        members = peer_config.members(p, _node_env(node))
        assert {m.node_id: m.target for m in members} == {
            ids[n]: cfgs[n].peers.advertise for n in NODES}, f"{node}'s member list is not both nodes"
        # the token: the same compose secret on both, at the path token_file names
        assert not p.token and p.token_file.startswith(SECRETS_DIR + "/")
        secret = p.token_file.removeprefix(SECRETS_DIR + "/")
        assert secret in services[node]["secrets"]
    files = {cfg.peers.token_file for cfg in cfgs.values()}
    assert len(files) == 1
    secret = files.pop().removeprefix(SECRETS_DIR + "/")
    token_path = DOCKER / data["secrets"][secret]["file"]
    token = peer_config.load_token(replace(cfgs[NODES[0]].peers, token_file=str(token_path)))
    assert len(token) >= peer_config.MIN_TOKEN_CHARS
    assert "development" in (DOCKER / "docker-compose.yml").read_text()  # the value is flagged as dev-only


def test_published_ports_are_loopback() -> None:
    services = _compose()["services"]
    minio = services["minio"]
    assert "127.0.0.1:9001:9001" in minio["ports"]
    assert "--console-address" in minio["command"]
    assert minio["command"][minio["command"].index("--console-address") + 1] == ":9001"
    host_ports = []
    for node in NODES:
        cfg = _node_config(node)
        metrics_port = cfg.metrics.address.rpartition(":")[2]
        published = [p for p in services[node]["ports"] if p.endswith(f":{metrics_port}")]
        assert len(published) == 1, f"{node} does not publish its metrics port {metrics_port}"
        host_ip, host_port, _ = published[0].split(":")
        assert host_ip == "127.0.0.1"
        host_ports.append(host_port)
        # the peer port is for the other node only: not published on the host
        assert not any(p.endswith(":" + cfg.peers.listen.rpartition(":")[2]) for p in services[node]["ports"])
    assert len(set(host_ports)) == len(NODES)


def test_ckptctl_needs_no_flags_in_a_node() -> None:
    """ckptctl resolves the daemon from CKPTD_ADDR or CKPTD_DAEMON_SOCKET (ckptd_client.rpc):
    the node's environment must name the socket the daemon serves."""
    from ckptd_client import rpc

    for node in NODES:
        env = _node_env(node)
        with pytest.MonkeyPatch.context() as mp:
            for key in ("CKPTD_ADDR", "CKPTD_DAEMON_SOCKET", "CKPTD_DAEMON_ROOT"):
                mp.delenv(key, raising=False)
            for key, value in env.items():
                mp.setenv(key, value)
            addr = rpc.resolve_address(None)  # what ckptctl dials without --addr
        assert addr == f"unix:{_node_config(node).socket_path}", f"{node}: ckptctl would dial {addr}"


def test_trainer_results_volume_and_exit_command() -> None:
    data = _compose()
    services = data["services"]
    for rank in (0, 1):
        svc = services[f"trainer-rank{rank}"]
        cmd = svc["command"]
        workdir = cmd[cmd.index("--workdir") + 1]
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert mounts.get(workdir) == "trainer-results", f"rank {rank}'s results are not on the volume"
        assert int(cmd[cmd.index("--wait-replicated-at") + 1]) <= int(cmd[cmd.index("--steps") + 1])
    assert "trainer-results" in data["volumes"]
    command = "docker compose -f docker/docker-compose.yml up --build --exit-code-from trainer-rank0"
    assert command in (DOCKER / "docker-compose.yml").read_text()
    assert command in (REPO / "README.md").read_text()


def test_dockerfile_cpu_default_and_non_root() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    m = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M)
    assert m and m.group(1) == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert "-c requirements.lock" in text  # the locked versions, as constraints
    users = re.findall(r"^USER\s+(\S+)$", text, re.M)
    assert users, "the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0  # numeric: Kubernetes' runAsNonRoot can check it
    owned = re.search(r"chown \S+ (.+)$", text, re.M)
    assert owned and {"/var/lib/ckptd", "/run/ckptd"} <= set(owned.group(1).split())
    assert text.rindex("chown") < text.rindex("USER ")


def test_dockerignore_matches_build_context() -> None:
    services = _compose()["services"]
    contexts = {(DOCKER / services[n]["build"]["context"]).resolve() for n in NODES}
    assert contexts == {REPO}
    ignore = REPO / ".dockerignore"
    assert ignore.is_file()
    patterns = {line.strip().rstrip("/") for line in ignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", ".git"} <= patterns
    assert not patterns & {"ckptd", "client", "examples", "pyproject.toml", "requirements.lock", "README.md"}
    assert "docker/peer-token.dev" in patterns  # the secret is mounted, never baked into the image


def test_compose_config_renders() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI: the Compose file is checked structurally above")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip("no Compose plugin for the docker CLI: the file is checked structurally above")
    proc = subprocess.run([docker, "compose", "-f", str(DOCKER / "docker-compose.yml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
