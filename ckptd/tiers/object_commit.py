"""The object tier's commit: the create-only manifest put, its claim-object fallback, the probe
that chooses between them, and the per-node records a step's coordinator builds the manifest from.

Job: make a step visible exactly once, with a manifest written after all its data, on stores
that honour create-only puts and on stores that do not.

Invariants:
- The manifest is written with a create-only put (``If-None-Match: *``; OSS's header is set by
  the client's hook) carrying a commit token in its metadata (``x-amz-meta-ckptd-commit``). A
  refused condition is ours when the manifest's token is ours (our own first attempt succeeded
  and its answer was lost before botocore retried it); otherwise the step is AlreadyExists. A
  conflict that never settles ends at the deadline.
- Where the store ignores or rejects the condition (``probe_create_only`` says so), a claim
  object beside the manifest serialises writers; see ``commit_with_claim`` for its race
  semantics. A claim left by a crashed writer blocks the step until it is stale.
- A node's record (``rank-NNNNNN.shard.meta.json``, named after its lowest rank; a rank record of
  an older version is a record with one shard) is trusted only after it parses, names the
  step's ``world_size`` and distinct ranks in range, the lowest being the one its key names; a
  bad one is an IntegrityError naming it.
- Store errors propagate raw; the tier types them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import botocore.exceptions

from ckptd.core.errors import AlreadyExists, IntegrityError
from ckptd.core.manifest import ShardEntry, _shard_from_obj, canonical_json
from ckptd.tiers.object_client import STORE_ERRORS, Bucket, DeadlineExceeded, error_code, http_status

COMMIT_TOKEN_META: Final = "ckptd-commit"  # x-amz-meta-ckptd-commit: who wrote a manifest
CLAIM_MAX_BYTES: Final = 4096
log = logging.getLogger("ckptd.object")


def put_manifest(store: Bucket, key: str, body: bytes, token: str, create_only: bool) -> None:
    extra: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}
    store.client.put_object(
        Bucket=store.name, Key=key, Body=body, ContentType="application/json",
        Metadata={COMMIT_TOKEN_META: token}, **extra,
    )


def written_by(store: Bucket, key: str) -> str | None:
    """The commit token of an existing manifest ("" when it has none), None when absent."""
    head = store.head(key)
    if head is None:
        return None
    return str(head.get("Metadata", {}).get(COMMIT_TOKEN_META, ""))


def commit_conditional(store: Bucket, key: str, body: bytes, token: str, deadline: float) -> None:
    while True:
        try:
            put_manifest(store, key, body, token, create_only=True)
            return
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) not in (409, 412):
                raise
        # The condition failed: someone wrote the manifest, or our own first attempt did and
        # its answer was lost before botocore retried it (then the token is ours).
        owner = written_by(store, key)
        if owner == token:
            return
        if owner is not None:
            raise AlreadyExists(f"already committed: {store.url(key)} exists")
        if time.monotonic() >= deadline:  # 409 ConditionalRequestConflict that never settles
            raise DeadlineExceeded("conditional put kept conflicting")
        time.sleep(0.2)


def commit_with_claim(store: Bucket, mkey: str, ckey: str, body: bytes, token: str, stale_age_s: float) -> None:
    """Commit on a store without create-only puts.

    1. a manifest exists -> AlreadyExists;
    2. a live claim by another writer (younger than stale_age_s) -> AlreadyExists;
    3. put our claim, read it back: another token won the last write -> AlreadyExists;
    4. check the manifest is still absent, put it, drop the claim.
    Race semantics: with strong read-after-write consistency (S3, MinIO, OSS) two writers
    can both pass only if one does all of steps 3-4 between the other's claim read-back and
    manifest put; the later manifest put then wins. ckptd has one writer per step (the
    step's coordinator), and a canonical manifest of the same step is the same bytes, so
    that window only matters to a mis-configured pair of coordinators. A claim left by a
    crashed writer blocks the step until it is stale_age_s old.
    """
    if store.head(mkey) is not None:
        raise AlreadyExists(f"already committed: {store.url(mkey)} exists")
    raw = store.get_small(ckey, CLAIM_MAX_BYTES)
    if raw is not None:
        other, created = _claim_token(raw), _claim_created(raw)
        if other != token and time.time() - created < stale_age_s:
            raise AlreadyExists(f"{store.url(mkey)} is being committed by another writer ({store.url(ckey)})")
    claim_body = json.dumps({"token": token, "created_unix_s": time.time()}).encode()
    store.client.put_object(Bucket=store.name, Key=ckey, Body=claim_body, ContentType="application/json")
    raw = store.get_small(ckey, CLAIM_MAX_BYTES)
    if raw is None or _claim_token(raw) != token:
        raise AlreadyExists(f"{store.url(mkey)}: another writer claimed it ({store.url(ckey)})")
    if store.head(mkey) is not None:
        raise AlreadyExists(f"already committed: {store.url(mkey)} exists")
    put_manifest(store, mkey, body, token, create_only=False)
    with contextlib.suppress(*STORE_ERRORS):
        store.client.delete_object(Bucket=store.name, Key=ckey)


def probe_create_only(store: Bucket, key: str) -> bool:
    """Put a probe object at key twice with the create-only condition: supported when the
    second put is refused (412/409). A store that rejects the header outright (400/501) or
    ignores it (second put succeeds) is not. The probe object is removed."""
    try:
        try:
            put_manifest(store, key, b"{}", "probe", create_only=True)
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) in (400, 403, 501) or error_code(exc) in ("NotImplemented", "InvalidArgument"):
                log.warning("object store refuses create-only puts (%s): using commit claims", error_code(exc))
                return False
            raise
        try:
            put_manifest(store, key, b"{}", "probe", create_only=True)
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) in (409, 412):
                return True
            raise
        log.warning("object store ignores create-only puts: using commit claims")
        return False
    finally:
        with contextlib.suppress(*STORE_ERRORS):
            store.client.delete_object(Bucket=store.name, Key=key)


def _claim_field(raw: bytes, name: str) -> Any:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return obj.get(name) if isinstance(obj, dict) else None


def _claim_token(raw: bytes) -> str:
    token = _claim_field(raw, "token")
    return token if isinstance(token, str) else ""


def _claim_created(raw: bytes) -> float:
    created = _claim_field(raw, "created_unix_s")
    return float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else 0.0


# -- multi-node commit: one record per node beside the (future) manifest ---------------------
def shard_record(entries: Sequence[ShardEntry], world_size: int) -> bytes:
    """The body of a node's record: the layout and checksums of each of its ranks' shards, and
    the step's world_size (one object per node and step, not per rank: docs/scale.md)."""
    return canonical_json({"world_size": world_size, "shards": [e.to_json() for e in entries]})


def parse_shard_record(url: str, body: bytes, world_size: int) -> list[ShardEntry]:
    """The entries of a record read from url (a node's ``shards``, or the one ``shard`` of a rank
    record written before records were per node); IntegrityError when it is not a valid record
    of ranks of a step of world_size ranks."""
    try:
        obj = json.loads(body)
        if obj["world_size"] != world_size:
            raise ValueError(f"world_size {obj['world_size']} != {world_size}")
        raw = obj["shards"] if "shards" in obj else [obj["shard"]]
        if not isinstance(raw, list) or not raw:
            raise ValueError("no shards")
        entries = [_shard_from_obj(x) for x in raw]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{url}: invalid shard record: {exc}") from None
    ranks = [e.rank for e in entries]
    if len(set(ranks)) != len(ranks) or not all(0 <= r < world_size for r in ranks):
        raise IntegrityError(f"{url}: record names ranks {ranks}")
    return entries
