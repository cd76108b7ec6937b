"""Prometheus metrics for rotation, exported beside SGLang's own on ``/metrics``.

The scheduler runs in a child process; SGLang's launcher sets PROMETHEUS_MULTIPROC_DIR so
metrics created here are merged by the HTTP server's collector, as SGLang's own are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RotationStats:
    rotations_out: int = 0
    rotations_in: int = 0
    bytes_d2h: int = 0
    bytes_h2d: int = 0
    fallbacks: int = 0  # rotate-outs skipped because the host tier had no room
    aborted_while_rotated: int = 0
    plans_decode_first: int = 0  # plans whose prefill budget was 0: a decode step first
    plans_head_blocked: int = 0  # plans where the new EDF head waited for room
    bytes_d2h_saved: int = 0  # not copied out: already on the host in a kept copy
    host_copies_evicted: int = 0  # kept host copies dropped to make host room
    bytes_written_through: int = 0  # copied to the host in the background (--rota-write-through)


class RotationMetrics:
    """Publishes ``RotationStats`` deltas and tier gauges; a no-op when metrics are off."""

    def __init__(self, enabled: bool, tp_rank: int) -> None:
        self._enabled = enabled
        self._last = RotationStats()
        if not enabled:
            return
        from prometheus_client import Counter, Gauge

        labels = {"tp_rank": str(tp_rank)}
        names = ("rotations_out", "rotations_in", "bytes_d2h", "bytes_h2d", "fallbacks",
                 "aborted_while_rotated", "bytes_d2h_saved", "host_copies_evicted",
                 "bytes_written_through")
        docs = ("Requests rotated out to the host tier.", "Requests rotated back in.",
                "KV bytes copied device to host.", "KV bytes copied host to device.",
                "Rotate-outs skipped for lack of host space (SGLang retraction takes over).",
                "Requests aborted by the client while rotated out.",
                "KV bytes a rotate-out did not copy: still on the host in a kept copy.",
                "Kept host copies dropped to make room on the host tier.",
                "KV bytes copied to the host in the background (write-through).")
        self._counters = {n: Counter(f"superinfer:{n}_total", d, labelnames=list(labels)).labels(**labels)
                          for n, d in zip(names, docs)}
        self._host_used = Gauge("superinfer:host_tier_tokens_used", "Host tier tokens in use.",
                                labelnames=list(labels), multiprocess_mode="mostrecent").labels(**labels)
        self._rotated = Gauge("superinfer:requests_rotated_out", "Requests currently away from the device.",
                              labelnames=list(labels), multiprocess_mode="mostrecent").labels(**labels)

    def publish(self, stats: RotationStats, host_tokens_used: int, num_rotated: int) -> None:
        if not self._enabled:
            return
        for name, counter in self._counters.items():
            delta = getattr(stats, name) - getattr(self._last, name)
            if delta:
                counter.inc(delta)
        self._last = RotationStats(**{n: getattr(stats, n) for n in RotationStats.__slots__})
        self._host_used.set(host_tokens_used)
        self._rotated.set(num_rotated)
