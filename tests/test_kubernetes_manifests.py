"""deploy/kubernetes/ without a cluster: the base and the example overlay are rendered
(tests/_kustomize_kit.py, no kubectl), every object is validated against the Kubernetes 1.37
schema (kubernetes-validate, strict: unknown fields fail), and the cross-references no schema sees
are checked: mounted volumes exist, probes, ports and the token file agree with the ckptd.toml of
the ConfigMap, which itself passes ``ckptd serve --check``; the training Job example mounts what
the daemon serves; and every command of docs/deploy.md names objects, keys and paths these
manifests define.

``serve --check`` runs with ``--root`` and ``--shm-dir`` pointed at temporary directories (the
config's /var/lib/ckptd and /dev/shm/ckptd are the node's, and the shm check stats its directory)
and with the DaemonSet's ``CKPTD_*`` variables, their ``$(VAR)`` references filled with example
downward-API values.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from ckptd.core.config import parse_bytes
from ckptd.core.config.peers import PeerSection, load_token, parse_discovery
from ckptd.core.errors import InvalidArgument
from tests._kustomize_kit import load_yaml, render

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
DOC = REPO / "docs" / "deploy.md"
K8S_VERSION = "1.37"
VARIANTS = {"base": K8S / "base", "overlay": K8S / "overlays" / "example"}
DOWNWARD = {"spec.nodeName": "node-a", "status.hostIP": "10.0.0.1"}
_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}


def _one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"{len(hits)} {kind} {name or ''}"
    return hits[0]


def _quantity(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|)", str(q))
    assert m, f"memory quantity {q!r}: use a binary suffix"
    return int(m.group(1)) * _QUANTITY[m.group(2)]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


class Deployment:
    """One rendered variant: its objects, the DaemonSet's pod spec and the config it carries."""

    def __init__(self, directory: Path) -> None:
        self.objects = render(directory)
        self.ds = _one(self.objects, "DaemonSet", "ckptd")
        self.pod = self.ds["spec"]["template"]["spec"]
        self.ckptd = next(c for c in self.pod["containers"] if c["name"] == "ckptd")
        self.init = self.pod.get("initContainers", [])
        volume = next(v for v in self.pod["volumes"] if v["name"] == "config")
        mount = next(m for m in self.ckptd["volumeMounts"] if m["name"] == "config")
        self.config_path = mount["mountPath"]
        cm = _one(self.objects, "ConfigMap", volume["configMap"]["name"])
        self.toml_text = cm["data"][mount["subPath"]]
        self.cfg = tomllib.loads(self.toml_text)
        self.volumes = {v["name"]: v for v in self.pod["volumes"]}
        self.mounts = {m["mountPath"]: m["name"] for m in self.ckptd["volumeMounts"]}

    def env(self) -> dict[str, str]:
        """The container's variables as the kubelet sets them (downward API filled in)."""
        out: dict[str, str] = {}
        for e in self.ckptd["env"]:
            if "valueFrom" in e:
                ref = e["valueFrom"].get("fieldRef")
                if ref is None:
                    continue  # a secret: not needed by --check
                out[e["name"]] = DOWNWARD[ref["fieldPath"]]
            else:
                out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out[m.group(1)], e["value"])
        return out

    def host_path_at(self, path: str) -> str:
        """The host path mounted at ``path`` in the daemon's container (asserting it is one)."""
        vol = self.volumes[self.mounts[path]]
        assert "hostPath" in vol, f"{path} is not a hostPath volume"
        return str(vol["hostPath"]["path"])


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def dep(request: pytest.FixtureRequest) -> Deployment:
    return Deployment(VARIANTS[request.param])


def _validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}") from None


def test_every_object_validates_against_the_schema(dep: Deployment) -> None:
    kinds = sorted(o["kind"] for o in dep.objects)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service", "ServiceAccount"]
    for obj in dep.objects:
        _validate(obj)
    ns = _one(dep.objects, "Namespace")["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == ns for o in dep.objects if o["kind"] != "Namespace")
    _one(dep.objects, "ServiceAccount", dep.pod["serviceAccountName"])


def test_a_broken_object_fails_validation() -> None:
    """The validator is strict: a misspelled field is an error, not silently dropped."""
    ds = Deployment(VARIANTS["base"]).ds
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(AssertionError, match="hostNetwrok"):
        _validate(ds)


def test_every_mount_names_a_volume_and_every_volume_is_mounted(dep: Deployment) -> None:
    used = set()
    for c in dep.pod["containers"] + dep.init:
        for m in c.get("volumeMounts", []):
            assert m["name"] in dep.volumes, f"{c['name']} mounts undefined volume {m['name']}"
            used.add(m["name"])
    assert used == set(dep.volumes)


def test_config_passes_serve_check(dep: Deployment, tmp_path: Path) -> None:
    cfg_file = tmp_path / "ckptd.toml"
    cfg_file.write_text(dep.toml_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    env.update(dep.env())
    r = subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--check", "--json",
                        "--config", str(cfg_file), "--root", str(tmp_path / "root"),
                        "--shm-dir", str(tmp_path / "shm")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    port = dep.cfg["peers"]["listen"].rpartition(":")[2]
    assert resolved["peers"]["advertise"] == f"{DOWNWARD['status.hostIP']}:{port}"
    assert resolved["peers"]["node_id"] == DOWNWARD["spec.nodeName"]
    assert resolved["daemon"]["socket"] == dep.cfg["daemon"]["socket"]
    assert dep.ckptd["command"] == ["ckptd", "serve", "--config", dep.config_path]


def test_paths_of_the_config_are_host_paths_at_the_same_place(dep: Deployment) -> None:
    d = dep.cfg["daemon"]
    sock_dir = str(Path(d["socket"]).parent)
    for path in (d["root"], d["shm_dir"], sock_dir):
        assert dep.host_path_at(path) == path  # a training pod mounts the same host path at the same place
    assert d["shm_dir"].startswith("/dev/shm/")  # the node's tmpfs: shared by bind mount, no hostIPC
    assert "hostIPC" not in dep.pod and "hostPID" not in dep.pod
    assert dep.env()["CKPTD_DAEMON_SOCKET"] == d["socket"]
    chown = next(c for c in dep.init if c["name"] == "own-host-dirs")
    sc = dep.pod["securityContext"]
    assert chown["command"][:2] == ["chown", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
    assert set(chown["command"][2:]) == {d["root"], d["shm_dir"], sock_dir}
    assert {m["mountPath"] for m in chown["volumeMounts"]} == {d["root"], d["shm_dir"], sock_dir}


def test_probes_ask_the_configs_socket(dep: Deployment) -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = dep.ckptd[probe]["exec"]["command"]
        assert cmd[:2] == ["ckptd", "health"], probe
        assert _flag(cmd, "--socket") == dep.cfg["daemon"]["socket"], probe
        assert float(_flag(cmd, "--timeout-s")) < dep.ckptd[probe]["timeoutSeconds"], probe


def test_ports_are_the_configs(dep: Deployment) -> None:
    ports = {p["name"]: p for p in dep.ckptd["ports"]}
    metrics_port = int(dep.cfg["metrics"]["address"].rpartition(":")[2])
    peer_port = int(dep.cfg["peers"]["listen"].rpartition(":")[2])
    assert ports["metrics"]["containerPort"] == ports["metrics"]["hostPort"] == metrics_port
    assert ports["peers"]["containerPort"] == ports["peers"]["hostPort"] == peer_port
    ann = dep.ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == metrics_port
    assert dep.pod["hostNetwork"] is True  # the bulk data port is picked by the kernel: no hostPort can publish it
    assert dep.pod["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_peers_service_selects_the_daemons_on_the_peer_port(dep: Deployment) -> None:
    svc = _one(dep.objects, "Service", "ckptd-peers")
    spec = svc["spec"]
    assert spec["clusterIP"] == "None" and not spec.get("publishNotReadyAddresses", False)  # ready daemons only
    labels = dep.ds["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"] and all(labels.get(k) == v for k, v in spec["selector"].items())
    assert dep.ds["spec"]["selector"]["matchLabels"] == spec["selector"]
    [port] = spec["ports"]
    container = {p["name"]: p["containerPort"] for p in dep.ckptd["ports"]}
    peer_port = int(dep.cfg["peers"]["listen"].rpartition(":")[2])
    assert container[port["targetPort"]] == port["port"] == peer_port
    discovery = dep.cfg["peers"].get("discovery")
    if discovery:  # the overlay: the daemons' members are this Service's records
        target = parse_discovery(discovery)
        ns = _one(dep.objects, "Namespace")["metadata"]["name"]
        assert target.name == f"{svc['metadata']['name']}.{ns}.svc.cluster.local" and target.port == peer_port
        assert not dep.cfg["peers"].get("peers")


def test_overlay_takes_its_members_from_the_cluster() -> None:
    assert "discovery" in Deployment(VARIANTS["overlay"]).cfg["peers"]
    assert "discovery" not in Deployment(VARIANTS["base"]).cfg["peers"]  # the base: from the training job


def test_token_file_is_the_secrets_key(dep: Deployment) -> None:
    token_file = dep.cfg["peers"]["token_file"]
    mount_path = str(Path(token_file).parent)
    vol = dep.volumes[dep.mounts[mount_path]]["secret"]
    item = next(i for i in vol["items"] if i["path"] == Path(token_file).name)
    template = load_yaml(K8S / "base" / "peer-token.secret.example.yaml")[0]
    _validate(template)
    assert vol["secretName"] == template["metadata"]["name"]
    assert list(template["stringData"]) == [item["key"]]
    assert template["metadata"]["namespace"] == _one(dep.objects, "Namespace")["metadata"]["name"]
    assert vol["defaultMode"] & 0o040 and "fsGroup" in dep.pod["securityContext"]  # readable by the daemon's group
    with pytest.raises(InvalidArgument, match="at least 16"):  # the placeholder never serves
        placeholder = Path(os.environ.get("TMPDIR", "/tmp")) / f"ckptd-placeholder-{os.getpid()}"
        placeholder.write_text(template["stringData"][item["key"]])
        try:
            load_token(PeerSection(token_file=str(placeholder)))
        finally:
            placeholder.unlink()


def test_shutdown_memory_and_privileges(dep: Deployment) -> None:
    assert dep.pod["terminationGracePeriodSeconds"] > dep.cfg["daemon"]["shutdown_timeout_s"]
    budget = parse_bytes(dep.cfg["memory"]["budget_bytes"], "memory.budget_bytes")
    limit = _quantity(dep.ckptd["resources"]["limits"]["memory"])
    assert limit >= budget + 2**30  # the slots are charged to this container, plus the daemon itself
    assert dep.ckptd["resources"]["requests"]["memory"] == dep.ckptd["resources"]["limits"]["memory"]
    sc = dep.pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    c = dep.ckptd["securityContext"]
    assert c == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    for init in dep.init:
        s = init["securityContext"]
        assert s["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert s["allowPrivilegeEscalation"] is False and s["readOnlyRootFilesystem"] is True
    assert {c["image"] for c in dep.pod["containers"] + dep.init} == {dep.ckptd["image"]}
    assert dep.pod["automountServiceAccountToken"] is False


def test_overlay_changes_nodes_budget_and_bucket() -> None:
    base, over = Deployment(VARIANTS["base"]), Deployment(VARIANTS["overlay"])
    assert base.pod["nodeSelector"] == {"ckptd.io/node": "true"}
    assert over.pod["nodeSelector"] == {"node-pool": "gpu-a100"}
    assert over.pod["tolerations"] and not base.pod["tolerations"]
    assert parse_bytes(over.cfg["memory"]["budget_bytes"], "b") > parse_bytes(base.cfg["memory"]["budget_bytes"], "b")
    assert over.cfg["object"]["enabled"] and over.cfg["object"]["bucket"]
    assert [c["name"] for c in over.pod["containers"]] == ["ckptd"]  # merged by name, not appended
    assert len(over.ckptd["env"]) == len(base.ckptd["env"]) + 2


def _training_job() -> tuple[dict[str, Any], dict[str, Any]]:
    objs = load_yaml(K8S / "examples" / "training-job.yaml")
    for o in objs:
        _validate(o)
    return _one(objs, "Job"), _one(objs, "Service")


def test_training_job_mounts_what_the_daemon_serves() -> None:
    dep = Deployment(VARIANTS["overlay"])
    job, svc = _training_job()
    pod = job["spec"]["template"]["spec"]
    trainer = pod["containers"][0]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    assert set(mounts.values()) == set(vols)
    d = dep.cfg["daemon"]
    for path in (d["shm_dir"], str(Path(d["socket"]).parent)):
        assert vols[mounts[path]]["hostPath"]["path"] == dep.host_path_at(path)
    assert "hostIPC" not in pod
    sc, dsc = pod["securityContext"], dep.pod["securityContext"]
    assert d.get("socket_mode", "0600") == "0600"  # so the trainer runs as the daemon's user
    assert (sc["runAsUser"], sc["runAsGroup"]) == (dsc["runAsUser"], dsc["runAsGroup"])
    assert pod["nodeSelector"] == dep.pod["nodeSelector"] and pod["tolerations"] == dep.pod["tolerations"]
    cmd = shlex.split(trainer["command"][-1])
    assert _flag(cmd, "--socket") == d["socket"]
    assert trainer["image"] == dep.ckptd["image"]
    assert _flag(cmd, "--master-addr") == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"


def _doc_commands() -> list[list[str]]:
    """The shell commands of docs/deploy.md's Kubernetes part (``bash`` blocks; ``\\`` joins lines)."""
    text = DOC.read_text().split("## docker compose")[0]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(shlex.split(line, comments=True))
    return out


def test_deploy_md_names_what_the_manifests_define() -> None:
    text = DOC.read_text()
    assert re.search(r"^## docker compose\n+See README \(docker compose\)\.$", text, re.M)
    over = Deployment(VARIANTS["overlay"])
    ns = _one(over.objects, "Namespace")["metadata"]["name"]
    secret_keys: dict[str, set[str]] = {}
    for e in over.ckptd["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret_keys.setdefault(ref["name"], set()).add(ref["key"])
    for v in over.pod["volumes"]:
        if "secret" in v:
            secret_keys.setdefault(v["secret"]["secretName"], set()).update(i["key"] for i in v["secret"]["items"])
    created: dict[str, set[str]] = {}
    seen = set()
    for cmd in _doc_commands():
        if cmd[:1] != ["kubectl"]:
            continue
        for arg in cmd:  # every object a command names by kind/name is one of ours
            kind, sep, name = arg.partition("/")
            if sep and kind in ("daemonset", "job"):
                objs = over.objects if kind == "daemonset" else [_training_job()[0]]
                _one(objs, {"daemonset": "DaemonSet", "job": "Job"}[kind], name)
        if "apply" in cmd and "-k" in cmd:
            path = REPO / _flag(cmd, "-k")
            assert (path / "kustomization.yaml").is_file(), cmd
            assert path.resolve() in {p.resolve() for p in VARIANTS.values()}, f"untested kustomization: {cmd}"
            seen.add("apply-k")
        elif "apply" in cmd and "-f" in cmd:
            assert (REPO / _flag(cmd, "-f")).resolve() == (K8S / "examples" / "training-job.yaml").resolve(), cmd
            seen.add("apply-f")
        elif cmd[1:4] == ["create", "secret", "generic"] or cmd[3:6] == ["create", "secret", "generic"]:
            assert _flag(cmd, "-n") == ns, cmd
            name = cmd[cmd.index("generic") + 1]
            keys = {a.split("=", 1)[1].split("=", 1)[0] for a in cmd if a.startswith("--from-literal=")}
            created[name] = keys
        elif cmd[1:3] == ["label", "nodes"]:
            labels = dict(a.split("=", 1) for a in cmd[3:] if "=" in a and not a.startswith("-"))
            assert labels == over.pod["nodeSelector"], cmd
            seen.add("label")
        elif "exec" in cmd and "ckptctl" in cmd:
            assert _flag(cmd, "-n") == ns
            tail = cmd[cmd.index("ckptctl"):]
            if "--bucket" in tail:
                o = over.cfg["object"]
                assert (_flag(tail, "--bucket"), _flag(tail, "--prefix"), _flag(tail, "--region")) == (
                    o["bucket"], o["prefix"], o["region"]), tail
                seen.add("ckptctl-bucket")
            job = _training_job()[0]
            assert "--job k8s-demo" in job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
            assert "k8s-demo" in tail, tail
    assert created == secret_keys, "docs/deploy.md must create exactly the Secrets and keys the DaemonSet reads"
    assert seen == {"apply-k", "apply-f", "label", "ckptctl-bucket"}, seen
