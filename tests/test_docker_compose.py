"""docker/docker-compose.yml is well formed and what it mounts is a valid ckptd config.

This machine has no Docker engine, so the stack itself cannot run here; these checks catch the
mistakes that would stop it: missing services, images, volumes, shm sizes, healthchecks, ordering,
and a ckptd.toml that ckptd would refuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ckptd.core import config

DOCKER = Path(__file__).resolve().parent.parent / "docker"


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
    assert services["trainer-rank0"]["volumes"] == ["node1-run:/run/ckptd"]
    assert services["trainer-rank1"]["volumes"] == ["node2-run:/run/ckptd"]


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
