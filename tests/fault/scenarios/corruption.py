"""Corruption scenarios: a flipped byte and a truncated shard in each tier (memory slot, disk
file, object-store object, peer replica), and a newest step with no valid copy left (restore
"latest" falls back). The seed picks which (step, rank) gets which damage and
where the flipped byte is. A damaged copy must be rejected by its checksum or size and the next
valid source must serve, or the restore must fail with a clear error: never wrong bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ckptd_client import IntegrityError, Level

from tests.fault.faultkit import flip_byte
from tests.fault.scenarios import scenario
from tests.fault.scenarios._ctx import Ctx
from tests.state_factory import blank_like

W = 2


def find_slot(shm_dir: Path, job: str, step: int, rank: int, replica: bool = False) -> tuple[Path, dict[str, Any]]:
    for meta_path in sorted(shm_dir.glob("slot-*.meta.json")):
        meta = json.loads(meta_path.read_bytes())
        if (meta.get("job"), meta.get("step"), meta["shard"]["rank"], bool(meta.get("replica_of"))) == \
                (job, step, rank, replica):
            return meta_path.with_name(meta_path.name.removesuffix(".meta.json") + ".bin"), meta
    raise LookupError(f"no {'replica ' if replica else ''}slot of {job}@{step} rank {rank} in {shm_dir}")


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def shard_file(ctx: Ctx, node: Any, step: int, rank: int) -> Path:
    return node.data_dir / ctx.job / f"step-{step:012d}" / f"rank-{rank:06d}.shard"


def two_targets(ctx: Ctx, steps: list[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    flipped, cut = ctx.rng.sample([(s, r) for s in steps for r in range(W)], 2)
    ctx.params["flipped"], ctx.params["truncated"] = f"{flipped[0]}/{flipped[1]}", f"{cut[0]}/{cut[1]}"
    return flipped, cut


def saved(ctx: Ctx, steps: int, *levels: Level) -> None:
    for step in range(1, steps + 1):
        ctx.save(step)
        for level in levels:
            ctx.must_ack(step, level, timeout_s=60)


@scenario
def corrupt_memory(ctx: Ctx) -> None:
    """A byte flipped in a live shm slot; a slot truncated while the daemon is down."""
    steps = ctx.randint("steps", 2, 3)
    n = ctx.node().start()
    saved(ctx, steps, Level.LOCAL_DURABLE)
    (fs, fr), (ts, tr) = two_targets(ctx, [s for s in range(1, steps + 1) if ctx.in_memory(s)])
    slot, meta = find_slot(n.shm_dir, ctx.job, fs, fr)
    off = ctx.randint("flipped_offset", 0, meta["shard"]["nbytes"] - 1)
    flip_byte(slot, off)
    ctx.fault(f"byte {off} of the live slot of {fs}/{fr} flipped")
    ctx.check("flipped slot", served={(fs, fr): "disk"})
    n.kill()
    slot, meta = find_slot(n.shm_dir, ctx.job, ts, tr)
    size = ctx.randint("truncated_to", 1, meta["shard"]["nbytes"] - 1)
    truncate(slot, size)
    ctx.restart(n)
    ctx.fault(f"daemon killed; slot of {ts}/{tr} truncated to {size} bytes; restarted on the same shm", "daemon@n1")
    ctx.check("truncated slot", served={(ts, tr): "disk"}, recovered={"n1"})


@scenario
def corrupt_disk(ctx: Ctx) -> None:
    """A byte flipped in a shard file, another file truncated; memory, then the store serve."""
    steps = ctx.randint("steps", 2, 3)
    with_store = ctx.cycle("object_tier", [False, True])
    n = ctx.node(object=ctx.env.object_config() if with_store else None).start()
    saved(ctx, steps, Level.LOCAL_DURABLE, *([Level.PERSISTED] if with_store else []))
    (fs, fr), (ts, tr) = two_targets(ctx, list(range(1, steps + 1)))
    # the memory copy serves if the slot was not reused yet; the store next; else nothing can
    fallback = {s: "memory" if ctx.in_memory(s) else "object" if with_store else "" for s in (fs, ts)}
    off = ctx.randint("flipped_offset", 0, ctx.ledger.nbytes - 5000)
    flip_byte(shard_file(ctx, n, fs, fr), off)
    size = ctx.randint("truncated_to", 0, ctx.ledger.nbytes - 5000)
    truncate(shard_file(ctx, n, ts, tr), size)
    ctx.fault(f"byte {off} of {fs}/{fr} flipped on disk; {ts}/{tr} truncated to {size} bytes")
    ctx.check("disk damaged", served={(s, r): fallback[s] for s, r in ((fs, fr), (ts, tr)) if fallback[s]},
              unrecoverable={(s, r) for s, r in ((fs, fr), (ts, tr)) if not fallback[s]})
    ctx.restart(n, wipe_shm=True)
    ctx.fault("restart with the shm lost: the damaged disk copies are the nearest", "daemon@n1", "memory@n1")
    damaged = {(fs, fr), (ts, tr)}
    if with_store:
        ctx.check("memory lost", served={k: "object" for k in damaged}, recovered={"n1"})
    else:
        ctx.check("memory lost", unrecoverable=damaged, recovered={"n1"})


@scenario
def corrupt_newest_step(ctx: Ctx) -> None:
    """The newest step's only copy of one rank is damaged (a byte flipped in its disk file, or the
    step's disk manifest truncated) after a restart that lost shared memory. An auto-resuming
    rank must not stop: "latest" falls back to the newest older step that restores, bit-exact;
    strictly it is a clear IntegrityError."""
    steps = ctx.randint("steps", 2, 3)
    damage = ctx.cycle("damage", ["flipped byte", "truncated manifest"])
    rank = ctx.choose("rank", range(W))
    n = ctx.node().start()
    saved(ctx, steps, Level.LOCAL_DURABLE)
    n = ctx.restart(n, wipe_shm=True)
    if damage == "flipped byte":
        flip_byte(shard_file(ctx, n, steps, rank), ctx.randint("flipped_offset", 0, ctx.ledger.nbytes - 5000))
    else:
        truncate(shard_file(ctx, n, steps, rank).with_name("manifest.json"), ctx.randint("truncated_to", 0, 200))
    ctx.fault(f"newest step {steps}: {damage} ({'rank ' + str(rank) if damage == 'flipped byte' else 'manifest'}), "
              "no other copy", "memory@n1")
    damaged = {(steps, r) for r in range(W) if damage == "truncated manifest" or r == rank}
    for r in range(W):
        got, served = ctx.restore(r, "latest")
        want = steps - 1 if (steps, r) in damaged else steps
        assert got == want, f"rank {r} resumed from step {got}, expected {want} ({damage})"
        if (steps, r) in damaged:
            try:
                ctx.manager(r).restore(blank_like(ctx.ledger.state(1, r)), strict_latest=True)
            except IntegrityError:
                pass
            else:
                raise AssertionError(f"rank {r}: strict_latest restored a step with no valid copy")
    ctx.check("newest step damaged", unrecoverable=damaged)


@scenario
def corrupt_object(ctx: Ctx) -> None:
    """A byte flipped in a shard object, another object truncated; then the node is lost."""
    steps = ctx.randint("steps", 2, 3)
    n = ctx.node(object=ctx.env.object_config()).start()
    saved(ctx, steps, Level.PERSISTED)
    (fs, fr), (ts, tr) = two_targets(ctx, list(range(1, steps + 1)))
    s3 = ctx.env.store()

    def entries(step: int) -> list[dict[str, Any]]:
        base = f"{s3.prefix}/{ctx.job}/step-{step:012d}/"
        manifest = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=base + "manifest.json")["Body"].read())
        return list(manifest["shards"])

    def key(step: int, rank: int) -> str:
        """The shard object, or a chunk object of it that no other shard of the job references
        (deduplication shares chunks: damaging a shared one would damage more than this shard)."""
        entry = next(e for e in entries(step) if e["rank"] == rank)
        if not entry.get("chunks"):
            return str(entry.get("object_key") or f"{s3.prefix}/{ctx.job}/step-{step:012d}/" + entry["key"])
        others = {c["key"] for s in range(1, steps + 1) for e in entries(s) if (s, e["rank"]) != (step, rank)
                  for c in e.get("chunks", [])}
        own = [c["key"] for c in entry["chunks"] if c["key"] not in others]
        return str(own[ctx.randint(f"chunk_{step}_{rank}", 0, len(own) - 1)])

    body = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=key(fs, fr))["Body"].read())
    off = ctx.randint("flipped_offset", 0, len(body) - 1)
    body[off] ^= 0xFF
    s3.client.put_object(Bucket=s3.bucket, Key=key(fs, fr), Body=bytes(body))
    data = s3.client.get_object(Bucket=s3.bucket, Key=key(ts, tr))["Body"].read()
    size = ctx.randint("truncated_to", 0, len(data) - 1)
    s3.client.put_object(Bucket=s3.bucket, Key=key(ts, tr), Body=data[:size])
    ctx.fault(f"byte {off} of the object of {fs}/{fr} flipped; object of {ts}/{tr} truncated to {size} bytes")
    ctx.check("store damaged", unrecoverable={(fs, fr, "reader"), (ts, tr, "reader")})
    ctx.restart(n, wipe_shm=True, wipe_disk=True)
    ctx.fault("the node lost its memory and disk: the store is all there is", "node@n1")
    ctx.check("node lost", unrecoverable={(fs, fr), (ts, tr)}, recovered={"n1"})


@scenario
def corrupt_peer(ctx: Ctx) -> None:
    """Peer replicas damaged (flipped live; truncated while the holder was down); then the
    replicated node is lost and restores from the next valid source or reports."""
    with_store = ctx.cycle("object_tier", [False, True])
    nodes = ctx.cluster(("n1", "n2"), object=ctx.env.object_config() if with_store else None)
    for node in nodes:
        node.start()
    saved(ctx, 2, Level.REPLICATED, *([Level.PERSISTED] if with_store else []))
    for node in nodes:
        ctx.must_ack(2, Level.LOCAL_DURABLE, node)
    rank = ctx.choose("rank", range(W))
    origin = ctx.home(rank)
    holder = next(n for n in nodes if n is not origin)
    held = [s for s in (1, 2) if _has_replica(holder.shm_dir, ctx.job, s, rank)]
    assert held, f"{holder.name} holds no replica of rank {rank}"
    ctx.rng.shuffle(held)
    fs, ts = held[0], (held[1] if len(held) > 1 else None)
    ctx.params["flipped_step"], ctx.params["truncated_step"] = fs, ts
    slot, meta = find_slot(holder.shm_dir, ctx.job, fs, rank, replica=True)
    off = ctx.randint("flipped_offset", 0, meta["shard"]["nbytes"] - 1)
    flip_byte(slot, off)
    story = f"byte {off} of the replica of {fs}/{rank} on {holder.name} flipped"
    if ts is not None:
        holder.kill()
        slot, meta = find_slot(holder.shm_dir, ctx.job, ts, rank, replica=True)
        size = ctx.randint("truncated_to", 1, meta["shard"]["nbytes"] - 1)
        truncate(slot, size)
        ctx.restart(holder)
        story += f"; replica of {ts}/{rank} truncated to {size} bytes while {holder.name} was down"
    ctx.restart(origin, wipe_shm=True, wipe_disk=True)
    ctx.fault(story + f"; {origin.name} lost", f"node@{origin.name}", f"daemon@{holder.name}")
    damaged = {(s, rank) for s in held}
    recovered = {origin.name, holder.name} if ts is not None else {origin.name}
    if with_store:
        ctx.check("origin lost", served={k: "object" for k in damaged}, recovered=recovered)
    else:
        ctx.check("origin lost", unrecoverable=damaged, recovered=recovered)


def _has_replica(shm_dir: Path, job: str, step: int, rank: int) -> bool:
    try:
        find_slot(shm_dir, job, step, rank, replica=True)
    except LookupError:
        return False
    return True
