"""The model of bench/scale.py: ckptd's control plane, object-store traffic and network at 1,000-10,000 nodes.

Calibrated on the measured phase (bench/_scale_cluster.py): ``report_cpu_s`` (the coordinator's
CPU seconds per ReportReady) and ``ready_spread_s`` (how far apart the nodes' reports of one step
arrive, from the measured commit latency). Everything else is the code's own constants (the
0.2 s re-report interval and the 1 s Ping interval of ``commit_across_nodes``, the uploader's
0.5 s commit poll) or a stated hardware parameter. Plain Python, no dependency.

``commit`` is a discrete-event simulation of the cross-node commit of a series of steps (one per
``iteration_s``) at the two tiers that report to the coordinator (peer: REPLICATED, disk:
LOCAL_DURABLE). The coordinator is one server (one core: a Python event loop) taking one
ReportReady at a time for ``report_cpu_s`` (the measured CPU of a whole call, its answer
included; its own report is a local call); every node reports its ranks once its part is ready,
and then, per ``design``:

  "poll"       (ckptd before this change) re-reports every 0.2 s until the step is complete, and
               after each incomplete answer pings every node not yet reported (once a second);
  "long_poll"  (after it) one report that the coordinator answers when the step settles or after
               ``long_poll_s``; a node re-reports only after such an expiry;
  "tree"       (not built) long_poll through ceil(sqrt(N)) group leaders, each forwarding one
               aggregated report per step to the coordinator.

It is a closed loop, as the code is: a node has at most one report in flight per step and tier,
so an overloaded coordinator answers late instead of queueing without bound; the figures are the
coordinator's request rate and busy fraction (its CPU), the commit latency (the last node's
part ready -> every node knows the step is complete) and the Pings the slowest node receives.

``object_store``, ``network`` and ``restore`` are closed forms over the same parameters: the
requests per second a persisted step puts on one key prefix (S3: ~3,500 PUT and ~5,500 GET per
second per prefix; OSS: 10,000 requests per second per account and 10-100 Gbit/s per account and
region), the replication bytes per node against its NIC, and a lost node's restore from peers.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Any

RE_REPORT_S = 0.2  # commit_across_nodes' sleep between reports (ckptd/peers/replicator.py)
PING_INTERVAL_S = 1.0  # SilentNodes.PING_INTERVAL_S
UPLOAD_POLL_S = 0.5  # ObjectUploader's commit poll (ckptd/drains/upload.py, before the change)
S3_PUT_PER_PREFIX_S = 3500.0
S3_GET_PER_PREFIX_S = 5500.0
OSS_REQUESTS_PER_ACCOUNT_S = 10_000.0
OSS_ACCOUNT_GBIT_S = (10.0, 100.0)  # per account and region: default, raised on request
LIST_PAGE_KEYS = 1000
GBIT = 1e9 / 8


@dataclass(frozen=True)
class Calibration:
    report_cpu_s: float  # coordinator CPU per ReportReady (measured)
    ready_spread_s: float  # mean extra delay of a node's report after the first (exponential; measured)


@dataclass(frozen=True)
class Workload:
    nodes: int
    ranks_per_node: int = 8
    rank_bytes: int = 2**30  # one rank's shard (model + optimizer state / ranks)
    iteration_s: float = 1.0  # a checkpoint every iteration
    k: int = 1  # replicas per shard (peers.replication_factor)
    nic_gbit_s: float = 200.0
    upload_gbit_s_per_node: float = 25.0  # what one node sends to the object store
    chunk_bytes: int = 16 * 2**20  # memory.chunk_bytes: the object tier stores one object (one PUT) per chunk
    hashed_prefixes: int = 0  # object.hashed_prefixes
    steps_kept: int = 5  # object.max_to_keep

    @property
    def node_bytes(self) -> int:
        return self.ranks_per_node * self.rank_bytes

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


def commit(w: Workload, cal: Calibration, design: str, steps: int = 4, long_poll_s: float = 5.0,
           seed: int = 1) -> dict[str, Any]:
    """Simulate ``steps`` steps' cross-node commits at the two reporting tiers."""
    rng = random.Random(seed)
    n, tiers = w.nodes, 2
    transfer_s = w.k * w.node_bytes / (w.nic_gbit_s * GBIT)  # a node's pushes: its part of the peer tier
    group = math.ceil(n / math.ceil(math.sqrt(n))) if design == "tree" else 1
    ready: dict[int, list[float]] = {}  # commit -> each reporter's ready time
    events: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind 0 report / 1 expiry, commit, reporter)
    seq = 0
    for c in range(steps * tiers):
        times = [(c // tiers) * w.iteration_s + transfer_s + rng.expovariate(1 / cal.ready_spread_s)
                 for _ in range(n)]
        if group > 1:  # a leader forwards once its group is in, one report later
            times = [max(times[i:i + group]) + group * cal.report_cpu_s for i in range(0, n, group)]
        ready[c] = times
        for r, t in enumerate(times):
            events.append((t, seq, 0, c, r))
            seq += 1
    heapq.heapify(events)
    busy_until = busy_s = 0.0
    rpcs = 0
    reported: dict[int, set[int]] = {c: set() for c in ready}
    complete_at: dict[int, float] = {}
    known_at: dict[int, float] = {}
    held: dict[int, set[int]] = {c: set() for c in ready}
    next_ping: dict[tuple[int, int], float] = {}
    ping_rounds: dict[int, int] = {}  # second -> nodes that pinged every silent node in it
    horizon_s = steps * w.iteration_s + 300.0

    def serve(t: float, r: int) -> float:
        """The coordinator takes one report (reporter 0 is itself: a local call, no RPC)."""
        nonlocal busy_until, busy_s, rpcs
        if r == 0:
            return t
        busy_until = max(t, busy_until) + cal.report_cpu_s
        busy_s += cal.report_cpu_s
        rpcs += 1
        return busy_until

    while events:
        t, _, kind, c, r = heapq.heappop(events)
        if t > horizon_s:
            break
        if kind == 1:  # a long poll expired: answered "not yet", the node reports again
            if c in complete_at or r not in held[c]:
                continue
            held[c].discard(r)
            heapq.heappush(events, (t, seq, 0, c, r))
            seq += 1
            continue
        done = serve(t, r)
        reported[c].add(r)
        if c not in complete_at and len(reported[c]) == len(ready[c]):
            complete_at[c] = done
            held[c].clear()  # every held report is answered now (its CPU was counted when it came)
        if c in complete_at:
            known_at[c] = max(known_at.get(c, 0.0), done)
            continue
        if design == "poll":
            if done >= next_ping.get((c, r), 0.0):
                next_ping[(c, r)] = done + PING_INTERVAL_S
                ping_rounds[int(done)] = ping_rounds.get(int(done), 0) + 1
            heapq.heappush(events, (done + RE_REPORT_S, seq, 0, c, r))
        else:
            held[c].add(r)
            heapq.heappush(events, (done + long_poll_s, seq, 1, c, r))
        seq += 1
    span_s = max(busy_until, steps * w.iteration_s)
    lat = sorted(known_at[c] - max(ready[c]) for c in known_at)
    return {
        "design": design, "nodes": n, "iteration_s": w.iteration_s,
        "coordinator_rpcs_per_s": rpcs / span_s,
        "coordinator_cpu_cores": busy_s / span_s,  # 1.0: its one event loop saturated
        "commit_latency_s": lat[len(lat) // 2] if lat else None,
        "commits_settled": f"{len(complete_at)}/{len(ready)}",
        "pings_to_slowest_node_per_s": max(ping_rounds.values(), default=0),
        "leader_cpu_cores": (group * tiers * cal.report_cpu_s / w.iteration_s) if group > 1 else None,
    }


def _pages(keys: int) -> int:
    return max(1, math.ceil(keys / LIST_PAGE_KEYS))


def object_store(w: Workload, design: str) -> dict[str, Any]:
    """Peak requests per second on the busiest key prefix while a step is persisted (S3), and the
    account totals (OSS). Every chunk of every shard is one PUT (chunks deduplicated against the
    previous step are not uploaded: not modelled, every chunk is taken as new; compression changes
    the bytes, not the requests). ``design``: "before" (one record per rank; every node lists the
    whole job prefix every 0.5 s for the manifest; the coordinator lists the step and reads every
    record each 0.5 s; each rank's upload lists the whole job to find the step to deduplicate
    against) or "after" (one record per node; nodes HEAD the manifest key, each every
    max(0.5 s, world_size / 1000 s); the coordinator reads each record once; a node finds the step
    to deduplicate against once per step with a delimited listing of the job's step folders and a
    HEAD of the newest one's manifest)."""
    upload_s = w.node_bytes / (w.upload_gbit_s_per_node * GBIT)
    oss_floor_s = [w.world * w.rank_bytes / (g * GBIT) for g in OSS_ACCOUNT_GBIT_S]
    persist_s = max(w.iteration_s, upload_s)  # superseded steps are skipped: one step per upload
    shard_requests = w.world * math.ceil(w.rank_bytes / w.chunk_bytes)  # one PUT per chunk
    prefixes = max(1, w.hashed_prefixes)
    records = w.world if design == "before" else w.nodes
    step_keys = records + (0 if w.hashed_prefixes else shard_requests)  # records (+ chunks when not hashed)
    put_step_prefix = (records + (0 if w.hashed_prefixes else shard_requests)) / upload_s
    put_shard_prefix = shard_requests / prefixes / upload_s if w.hashed_prefixes else put_step_prefix
    if design == "before":
        job_pages = _pages(w.steps_kept * step_keys)
        get_job_prefix = (w.nodes - 1) / UPLOAD_POLL_S * job_pages + w.world * job_pages / upload_s
        get_step_prefix = (_pages(step_keys) + records) / UPLOAD_POLL_S
    else:
        get_job_prefix = w.nodes / upload_s  # the delimited listing of step folders (< 1,000 of them)
        get_step_prefix = ((w.nodes - 1) / max(UPLOAD_POLL_S, w.world / 1000.0)
                           + _pages(step_keys) / UPLOAD_POLL_S + records / upload_s)
    head_previous_step = 0.0 if design == "before" else w.nodes / upload_s  # its manifest, a HEAD a node
    busiest_put = max(put_step_prefix, put_shard_prefix)
    busiest_get = max(get_job_prefix, get_step_prefix, head_previous_step)
    total = (records + shard_requests) / upload_s + get_job_prefix + get_step_prefix + head_previous_step
    return {
        "design": design, "persist_every_s": persist_s, "upload_s": upload_s,
        "put_per_s_busiest_prefix": busiest_put, "get_list_per_s_busiest_prefix": busiest_get,
        "s3_put_limit_x": busiest_put / S3_PUT_PER_PREFIX_S, "s3_get_limit_x": busiest_get / S3_GET_PER_PREFIX_S,
        "requests_per_s_total": total, "oss_qps_limit_x": total / OSS_REQUESTS_PER_ACCOUNT_S,
        "oss_persist_every_s": [max(persist_s, f) for f in oss_floor_s],
    }


def prefixes_needed(w: Workload) -> int:
    """object.hashed_prefixes keeping every chunk prefix under S3's PUT rate."""
    upload_s = w.node_bytes / (w.upload_gbit_s_per_node * GBIT)
    shard_requests = w.world * math.ceil(w.rank_bytes / w.chunk_bytes)
    return math.ceil(shard_requests / upload_s / S3_PUT_PER_PREFIX_S)


def network(w: Workload) -> dict[str, Any]:
    """Replication per node: k copies of its bytes out (and, balanced, as many in) per step."""
    need_gbit_s = w.k * w.node_bytes / GBIT / w.iteration_s
    replicate_s = w.k * w.node_bytes / (w.nic_gbit_s * GBIT)
    return {"replication_gbit_s_per_node": need_gbit_s, "nic_gbit_s": w.nic_gbit_s,
            "nic_fraction": need_gbit_s / w.nic_gbit_s, "replicate_s": replicate_s,
            "replicated_every_steps": max(1, math.ceil(replicate_s / w.iteration_s))}


def placement(w: Workload, seed: int = 1) -> dict[str, float]:
    """Replicas per node when each shard's k targets are uniform among the other nodes (what
    rendezvous hashing gives; checked against the real placement in the measured phase)."""
    rng = random.Random(seed)
    load = [0] * w.nodes
    for src in range(w.nodes):
        for _ in range(w.ranks_per_node):
            for t in rng.sample(range(w.nodes - 1), w.k):
                load[t if t < src else t + 1] += 1
    mean = sum(load) / w.nodes
    return {"replicas_per_node_mean": mean, "replicas_per_node_max": max(load), "max_over_mean": max(load) / mean}


def restore(w: Workload, cal: Calibration, measured_base_s: float) -> dict[str, Any]:
    """One lost node replaced: its ranks fetched from the peers holding them (spread over up to
    ranks_per_node * k peers, so the new node's NIC bounds it), after asking peers what they hold
    (ListHoldings; the restore's peer survey, ckptd/restore/sources/peer.py): "before", every
    other node; "after", each rank's first k + 5 placement candidates once the membership has
    more than 32 members. Also the ListHoldings every node answers when the whole job restarts."""
    asked_before = w.nodes - 1
    asked_after = asked_before if w.nodes - 1 <= 32 else min(asked_before, w.k + 5)
    fetch_s = w.node_bytes / (w.nic_gbit_s * GBIT)
    out: dict[str, Any] = {"fetch_s": fetch_s}
    for tag, asked in (("before", asked_before), ("after", asked_after)):
        ask_s = asked * w.ranks_per_node * cal.report_cpu_s  # the restoring daemon's side, one survey a rank
        out[tag] = {"peers_asked_per_rank": asked, "ask_peers_s": ask_s, "restore_s": measured_base_s + ask_s + fetch_s,
                    "job_restart_listholdings_per_node": asked * w.ranks_per_node,
                    "job_restart_listholdings_cpu_s_per_node": asked * w.ranks_per_node * cal.report_cpu_s}
    return out
