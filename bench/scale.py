"""How does ckptd behave at 1,000-10,000 nodes? Measure real daemons, then extrapolate with a model.

1. Measured (bench/_scale_cluster.py): for each ``--nodes`` count, that many real ``ckptd serve``
   daemons on this machine's loopback stand for as many nodes (static membership, k = 1, disk on,
   ``--ranks-per-node`` ranks each with a ``--shard-kib`` shard): per-step PeerService calls at
   the coordinator and per node (the daemons' own ``ckptd_peer_rpcs_*_total`` counters), commit
   latency of REPLICATED and LOCAL_DURABLE, CPU per step, replicas per node, the coordinator's
   CPU per ReportReady, and the loss of one node (detection, re-placement, restore from peers).
2. Model (bench/_scale_model.py), calibrated on (1): the cross-node commit simulated event by
   event for ``--model-nodes`` nodes x 8 ranks and a checkpoint every ``--iterations`` seconds,
   under the design before this change ("poll"), the one built ("long_poll") and one not built
   ("tree"); the object store's requests per second per key prefix (before / after) against
   S3's per-prefix and OSS's per-account limits; replication traffic per node against its NIC;
   placement balance; restore after one node loss.

``--json`` prints, as the last line, one JSON object: {"measured": [...], "model": {...},
"calibration": {...}, "machine": {...}}. docs/scale.md has the figures and what they mean; the
machine this runs on may be shared, so compare figures within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "client", REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _scale_cluster import measure  # noqa: E402
from _scale_model import (  # noqa: E402
    Calibration,
    Workload,
    commit,
    network,
    object_store,
    placement,
    prefixes_needed,
    restore,
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def calibrate(measured: list[dict[str, Any]]) -> tuple[Calibration, float]:
    """(calibration, measured restore seconds) from the measured runs."""
    costs = [m["report_cost"]["coordinator_cpu_s_per_report"] for m in measured
             if m["report_cost"]["coordinator_cpu_s_per_report"] > 0]
    spread = max(m["commit_replicated_s"] for m in measured)  # the largest cluster's: stragglers grow with N
    restores = [m["loss"]["restore_s"] for m in measured if "loss" in m]
    cal = Calibration(report_cpu_s=statistics.median(costs) if costs else 0.0005, ready_spread_s=max(spread, 0.01))
    return cal, statistics.median(restores) if restores else 0.2


def model(nodes: list[int], iterations: list[float], cal: Calibration, restore_base_s: float,
          rank_bytes: int, nic_gbit_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in nodes:
        per: dict[str, Any] = {}
        for it in iterations:
            w = Workload(n, iteration_s=it, rank_bytes=rank_bytes, nic_gbit_s=nic_gbit_s)
            per[f"every_{it:g}s"] = {
                "commit": {d: commit(w, cal, d) for d in ("poll", "long_poll", "tree")},
                "object_store": {"before": object_store(w, "before"), "after": object_store(w, "after")},
                "network": network(w),
            }
        w = Workload(n, rank_bytes=rank_bytes, nic_gbit_s=nic_gbit_s)
        tuned = Workload(n, rank_bytes=rank_bytes, nic_gbit_s=nic_gbit_s, hashed_prefixes=prefixes_needed(w))
        per["object_store_tuned"] = {"chunk_bytes": tuned.chunk_bytes, "hashed_prefixes": tuned.hashed_prefixes,
                                     **object_store(tuned, "after")}
        per["placement"] = placement(w)
        per["restore_one_node"] = restore(w, cal, restore_base_s)
        out[str(n)] = per
    return out


def check_model(measured: list[dict[str, Any]], cal: Calibration) -> list[dict[str, Any]]:
    """The model at the measured sizes (one rank per node, tiny shards): its ReportReady per step
    at the coordinator beside the daemons' own count."""
    out = []
    for m in measured:
        w = Workload(m["nodes"], ranks_per_node=m["ranks_per_node"], rank_bytes=m["shard_bytes"], iteration_s=2.0)
        sim = commit(w, cal, "long_poll", steps=6)
        out.append({"nodes": m["nodes"], "model_reports_per_step": sim["coordinator_rpcs_per_s"] * 2.0,
                    "measured_reports_per_step":
                        m["rpcs_per_step"]["coordinator_received_by_method"].get("ReportReady", 0.0),
                    })
    return out


def _table(measured: list[dict[str, Any]], mdl: dict[str, Any]) -> str:
    lines = ["measured (real daemons on loopback):",
             "  nodes  commit_rep_s  commit_ld_s  coord_rpcs/step  other_rpcs/step  coord_cpu_s/step  "
             "cpu_s/report  replicas/node(min-max)  detect_s  replace_s  restore_s"]
    for m in measured:
        reps = list(m["replicas_per_node"].values())
        loss = m.get("loss", {})
        lines.append(f"  {m['nodes']:5d}  {m['commit_replicated_s']:12.3f}  {m['commit_local_durable_s']:11.3f}  "
                     f"{m['rpcs_per_step']['coordinator_received']:15.1f}  "
                     f"{m['rpcs_per_step']['other_received_mean']:15.1f}  {m['cpu_s_per_step']['coordinator']:16.3f}  "
                     f"{m['report_cost']['coordinator_cpu_s_per_report']:12.5f}  {min(reps):>10d}-{max(reps):<11d}  "
                     f"{loss.get('detect_s', float('nan')):8.2f}  {loss.get('replace_s') or float('nan'):9.3f}  "
                     f"{loss.get('restore_s', float('nan')):9.3f}")
    lines.append("model (8 ranks/node): coordinator cores busy (poll / long_poll / tree), commit latency s, "
                 "S3 GET-class x limit on the busiest prefix (before / after), PUT x limit, NIC fraction")
    for n, per in mdl.items():
        for key, v in per.items():
            if not key.startswith("every_"):
                continue
            c, o = v["commit"], v["object_store"]
            lines.append(f"  {n:>6} {key:>9}: cpu {c['poll']['coordinator_cpu_cores']:.2f} / "
                         f"{c['long_poll']['coordinator_cpu_cores']:.2f} / {c['tree']['coordinator_cpu_cores']:.2f}"
                         f"  latency {c['poll']['commit_latency_s']:.2f} / {c['long_poll']['commit_latency_s']:.2f} / "
                         f"{c['tree']['commit_latency_s']:.2f}  get x{o['before']['s3_get_limit_x']:.1f} / "
                         f"x{o['after']['s3_get_limit_x']:.2f}  put x{o['after']['s3_put_limit_x']:.1f}"
                         f"  nic {v['network']['nic_fraction']:.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="4,8,16", help="daemon counts to measure (comma-separated)")
    ap.add_argument("--ranks-per-node", type=int, default=1)
    ap.add_argument("--shard-kib", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per node count")
    ap.add_argument("--no-loss", action="store_true", help="skip the node-loss measurement")
    ap.add_argument("--model-nodes", default="1000,4000,10000")
    ap.add_argument("--iterations", default="1,10", help="seconds per iteration (a checkpoint each)")
    ap.add_argument("--rank-gib", type=float, default=1.0, help="model: one rank's shard")
    ap.add_argument("--nic-gbit", type=float, default=200.0, help="model: each node's NIC")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    t0 = time.perf_counter()
    measured = [measure(n, ns.ranks_per_node, ns.shard_kib * 1024, ns.steps, not ns.no_loss)
                for n in _ints(ns.nodes)]
    cal, restore_base_s = calibrate(measured)
    mdl = model(_ints(ns.model_nodes), _floats(ns.iterations), cal, restore_base_s, int(ns.rank_gib * 2**30),
                ns.nic_gbit)
    result = {
        "measured": measured,
        "calibration": {"report_cpu_s": cal.report_cpu_s, "ready_spread_s": cal.ready_spread_s,
                        "restore_base_s": restore_base_s},
        "model_check": check_model(measured, cal),
        "model": mdl,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
                    "wall_s": time.perf_counter() - t0},
    }
    print(_table(measured, mdl))
    if ns.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
