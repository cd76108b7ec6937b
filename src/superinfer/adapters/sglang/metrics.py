"""Prometheus metrics for rotation, exported beside SGLang's own on ``/metrics``.

The scheduler runs in a child process; SGLang's launcher sets PROMETHEUS_MULTIPROC_DIR so
metrics created here are merged by the HTTP server's collector, as SGLang's own are.
"""

from __future__ import annotations

from ...host_tier.manager import TierStats
from .stats import RotationStats

_COUNTERS = {
    "rotations_out": "Requests rotated out to the host tier.",
    "rotations_in": "Requests rotated back in.",
    "bytes_d2h": "KV bytes copied device to host.",
    "bytes_h2d": "KV bytes copied host to device.",
    "fallbacks": "Rotate-outs skipped for lack of host space (SGLang retraction takes over).",
    "aborted_while_rotated": "Requests aborted by the client while rotated out.",
    "bytes_d2h_saved": "KV bytes a rotate-out did not copy: still on the host in a kept copy.",
    "host_copies_evicted": "Kept host copies dropped to make room on the host tier.",
    "bytes_written_through": "KV bytes copied to the host in the background (write-through).",
    "plans_host_full": "Scheduling steps that wanted a rotation the host tier had no room for.",
    "requeued": "Requests SGLang retracted to recompute later (its own fallback under pressure).",
}


class RotationMetrics:
    """Publishes counter deltas and tier gauges; a no-op when metrics are off."""

    def __init__(self, enabled: bool, tp_rank: int, dp_rank: int = 0) -> None:
        self._enabled = enabled
        self._last = dict.fromkeys(_COUNTERS, 0)
        if not enabled:
            return
        from prometheus_client import Counter, Gauge

        # Under --dp-size every replica has a TP rank 0: the DP rank keeps their series apart
        # (SGLang's own scheduler metrics carry both too).
        labels = {"tp_rank": str(tp_rank), "dp_rank": str(dp_rank)}
        self._counters = {
            n: Counter(f"superinfer:{n}_total", doc, labelnames=list(labels)).labels(**labels)
            for n, doc in _COUNTERS.items()
        }
        self._host_used = Gauge(
            "superinfer:host_tier_tokens_used", "Host tier tokens in use.",
            labelnames=list(labels), multiprocess_mode="mostrecent",
        ).labels(**labels)
        self._rotated = Gauge(
            "superinfer:requests_rotated_out", "Requests currently away from the device.",
            labelnames=list(labels), multiprocess_mode="mostrecent",
        ).labels(**labels)

    def publish(self, stats: RotationStats, tier_stats: TierStats, host_tokens_used: int,
                num_rotated: int) -> None:
        if not self._enabled:
            return
        now = {**stats.as_dict(), **tier_stats.as_dict()}
        for name, counter in self._counters.items():
            delta = now[name] - self._last[name]
            if delta:
                counter.inc(delta)
        self._last = {n: now[n] for n in _COUNTERS}
        self._host_used.set(host_tokens_used)
        self._rotated.set(num_rotated)
