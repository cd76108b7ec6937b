"""A KVMover with no bytes behind it, for the policy simulator: each direction is a link of a
fixed rate whose jobs run one after another, and a job is done once the simulated clock passes
its end. With it, the simulator drives the real HostTierManager (host pages, kept copies,
write-through, drops) instead of a copy of its logic."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from superinfer.host_tier.interface import KVMover, TransferReport


class ModelledMover(KVMover):
    def __init__(self, clock: Callable[[], float], bytes_per_s: float, bytes_per_token: int) -> None:
        self.clock = clock
        self.bytes_per_s, self.bytes_per_token = bytes_per_s, bytes_per_token
        self._link_free_s = {True: 0.0, False: 0.0}  # by to_host
        self._jobs: dict[bool, deque[tuple[float, str, int]]] = {True: deque(), False: deque()}

    def submit_d2h(self, job_id: str, device_slots: torch.Tensor, host_slots: torch.Tensor,
                   ready: object | None) -> int:
        return self._submit(True, job_id, int(device_slots.numel()))

    def submit_h2d(self, job_id: str, host_slots: torch.Tensor, device_slots: torch.Tensor,
                   ready: object | None = None) -> int:
        return self._submit(False, job_id, int(device_slots.numel()))

    def _submit(self, to_host: bool, job_id: str, num_tokens: int) -> int:
        num_bytes = num_tokens * self.bytes_per_token
        start = max(self.clock(), self._link_free_s[to_host])
        self._link_free_s[to_host] = start + num_bytes / self.bytes_per_s
        self._jobs[to_host].append((self._link_free_s[to_host], job_id, num_bytes))
        return num_bytes

    def busy(self, to_host: bool) -> bool:
        """A copy of this direction is still running at the current clock."""
        return self._link_free_s[to_host] > self.clock()

    def next_done_s(self) -> float | None:
        """When the next job of either direction ends (None: nothing queued)."""
        ends = [q[0][0] for q in self._jobs.values() if q]
        return min(ends) if ends else None

    def poll(self) -> TransferReport:
        report = TransferReport()
        now = self.clock()
        for to_host, done, total in ((True, report.done_d2h, "bytes_d2h"),
                                     (False, report.done_h2d, "bytes_h2d")):
            queue = self._jobs[to_host]
            while queue and queue[0][0] <= now:
                _, job_id, num_bytes = queue.popleft()
                done.append(job_id)
                setattr(report, total, getattr(report, total) + num_bytes)
        return report

    def fence_compute(self, stream: object | None) -> None:
        """Nothing to fence: the simulated step starts after the copies it waits for."""

    def synchronize(self) -> None:
        """Jobs end by the clock; nothing to wait for."""
