"""A small kustomize renderer for the tests: exactly the subset deploy/kubernetes/ uses.

A kustomization may hold ``resources`` (YAML files, or directories holding a kustomization),
``patches`` (``- path: FILE``: strategic merge patches, each matched to one rendered object by
apiVersion, kind and name) and ``namespace`` (set on every namespaced object). Any other field is
an error, so a manifest that starts using more of kustomize fails here instead of being rendered
wrongly. Strategic merge: maps merge key by key, a ``null`` value deletes the key, lists merge by
the Kubernetes patch merge key where the manifests use one (containers, initContainers, volumes
and env by ``name``, volumeMounts by ``mountPath``, ports by ``containerPort``) and are replaced
otherwise (tolerations, command, args: as in Kubernetes).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN_FIELDS = {"resources", "patches", "namespace"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}
CLUSTER_SCOPED = {"Namespace"}


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (a new value; neither is changed)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, b in enumerate(merged) if b.get(key) == item.get(key)), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = merge(merged[at], item, "")
        return merged
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize DIRECTORY`` would print, for the subset above."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KNOWN_FIELDS
    assert not unknown, f"{directory}: kustomization fields this renderer does not implement: {unknown}"
    objects: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        objects += render(path) if path.is_dir() else load_yaml(path)
    for patch in kust.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only '- path: FILE' patches are implemented: {patch}"
        for doc in load_yaml(directory / patch["path"]):
            hits = [i for i, o in enumerate(objects) if _key(o) == _key(doc)]
            assert len(hits) == 1, f"{directory}: patch {patch['path']} matches {len(hits)} objects"
            objects[hits[0]] = merge(objects[hits[0]], doc)
    if "namespace" in kust:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = kust["namespace"]
    keys = [(_key(o)) for o in objects]
    assert len(keys) == len(set(keys)), f"{directory}: an object is listed twice"
    return objects
