"""Prometheus metrics of the daemon (prometheus-client), served over HTTP when configured.

Names follow ``ckptd_<what>_<unit>``; labels are bounded (tier, op, result, stage, job): never a
step or a rank. ``serve_http`` starts the exporter on ``metrics.address`` ("host:port"); it is
off when the address is empty. A private registry keeps tests with several daemons independent.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from ckptd import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

BUILD = Info("ckptd_build", "Build information", registry=REGISTRY)
BUILD.info({"version": __version__})

SAVE_BLOCKING_SECONDS = Histogram(
    "ckptd_save_blocking_seconds", "Time save() blocked training, as reported by the client",
    buckets=_LATENCY_BUCKETS_S, registry=REGISTRY)
SAVES_TOTAL = Counter("ckptd_saves_total", "Shards offered by clients, by result", ["result"], registry=REGISTRY)
SLOT_WAIT_SECONDS = Histogram(
    "ckptd_slot_wait_seconds", "Time BeginSave waited for a slot (back-pressure)",
    buckets=_LATENCY_BUCKETS_S, registry=REGISTRY)
TIER_WRITTEN_BYTES = Counter("ckptd_tier_written_bytes_total", "Bytes written per tier", ["tier"], registry=REGISTRY)
TIER_READ_BYTES = Counter("ckptd_tier_read_bytes_total", "Bytes read per tier", ["tier"], registry=REGISTRY)
TIER_OP_SECONDS = Histogram(
    "ckptd_tier_op_seconds", "Duration of tier operations", ["tier", "op"],
    buckets=_LATENCY_BUCKETS_S, registry=REGISTRY)
TIER_FAILURES = Counter("ckptd_tier_failures_total", "Failed tier operations", ["tier", "op"], registry=REGISTRY)
CHECKSUM_FAILURES = Counter(
    "ckptd_checksum_failures_total", "Copies rejected for a crc32c or size mismatch", ["tier"], registry=REGISTRY)
LAST_COMMITTED_STEP = Gauge(
    "ckptd_last_committed_step", "Newest step committed per job and tier", ["job", "tier"], registry=REGISTRY)
INFLIGHT = Gauge("ckptd_inflight", "Saves in flight by stage", ["stage"], registry=REGISTRY)
SHM_BYTES_IN_USE = Gauge("ckptd_shm_bytes_in_use", "Bytes of shared-memory slots allocated", registry=REGISTRY)
SHM_BUDGET_BYTES = Gauge("ckptd_shm_budget_bytes", "Shared-memory byte budget", registry=REGISTRY)
OBJECT_RETRIES = Counter(
    "ckptd_object_retries_total", "Object-store requests retried (throttling, 5xx, connection errors)",
    registry=REGISTRY)
PEER_UP = Gauge("ckptd_peer_up", "1 if the peer acknowledged the last replica pushed to it, else 0", ["peer"],
                registry=REGISTRY)
PEER_RPCS_RECEIVED = Counter(
    "ckptd_peer_rpcs_received_total", "PeerService calls received (authenticated or not), by method", ["method"],
    registry=REGISTRY)
PEER_RPCS_SENT = Counter(
    "ckptd_peer_rpcs_sent_total", "PeerService call attempts sent to peers, by method", ["method"], registry=REGISTRY)
PEER_SERVED_BYTES = Counter(
    "ckptd_peer_served_bytes_total", "Shard bytes this node sent to peers fetching them (FetchShard)",
    registry=REGISTRY)
RESTORES_TOTAL = Counter("ckptd_restores_total", "Shard restores by serving tier", ["tier"], registry=REGISTRY)
RESTORE_FALLBACKS = Counter(
    "ckptd_restore_fallbacks_total", "Restores of 'latest' that skipped a newer step with no valid copy",
    registry=REGISTRY)


def serve_http(address: str) -> None:
    """Start the exporter thread on "host:port" (port 0 is not allowed: the address must be known)."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
