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
    """Jobs of one direction queue behind each other (as on a real mover, they finish in
    submission order); the two directions run at the same time, each at ``bytes_per_s``.
    Slot tensors are only counted: ``device_slots.numel()`` tokens of ``bytes_per_token``."""

    def __init__(self, clock: Callable[[], float], bytes_per_s: float,
                 bytes_per_token: int) -> None:
        if bytes_per_s <= 0 or bytes_per_token <= 0:
            raise ValueError(f"bytes_per_s={bytes_per_s} and bytes_per_token={bytes_per_token} "
                             "must be positive")
        self.clock = clock
        self.bytes_per_s, self.bytes_per_token = bytes_per_s, bytes_per_token
        self._link_free_s = {True: 0.0, False: 0.0}  # by to_host: when its last job ends
        # by to_host: (end, job id, bytes) in submission order, so ends are ascending
        self._jobs: dict[bool, deque[tuple[float, str, int]]] = {True: deque(), False: deque()}

    def submit_d2h(self, job_id: str, device_slots: torch.Tensor, host_slots: torch.Tensor,
                   ready: object | None) -> int:
        return self._submit(True, job_id, int(device_slots.numel()))

    def submit_h2d(self, job_id: str, host_slots: torch.Tensor, device_slots: torch.Tensor,
                   ready: object | None = None) -> int:
        return self._submit(False, job_id, int(device_slots.numel()))

    def _submit(self, to_host: bool, job_id: str, num_tokens: int) -> int:
        """Queue the job behind the direction's last one (or start it now, if the link is
        idle); returns its bytes."""
        num_bytes = num_tokens * self.bytes_per_token
        start = max(self.clock(), self._link_free_s[to_host])
        end = start + num_bytes / self.bytes_per_s
        self._link_free_s[to_host] = end
        self._jobs[to_host].append((end, job_id, num_bytes))
        return num_bytes

    def busy_until(self, to_host: bool) -> float:
        """When this direction's last queued copy ends (in the past: the link is idle); the
        simulator charges a decode step for the part of it the copies run."""
        return self._link_free_s[to_host]

    def next_done_s(self) -> float | None:
        """When the next job not yet reported by ``poll`` ends (None: nothing queued)."""
        ends = [queue[0][0] for queue in self._jobs.values() if queue]
        return min(ends) if ends else None

    def poll(self) -> TransferReport:
        """The jobs that ended by the current clock, in submission order per direction, each
        timed by its own time on the link (as CUDA events time a real mover's copies)."""
        report = TransferReport()
        now = self.clock()
        for to_host, done in ((True, report.done_d2h), (False, report.done_h2d)):
            queue = self._jobs[to_host]
            num_bytes = 0
            while queue and queue[0][0] <= now:
                _, job_id, job_bytes = queue.popleft()
                done.append(job_id)
                num_bytes += job_bytes
                if job_bytes:
                    report.timings[job_id] = (job_bytes, job_bytes / self.bytes_per_s)
            if to_host:
                report.bytes_d2h = num_bytes
            else:
                report.bytes_h2d = num_bytes
        return report

    def fence_compute(self, stream: object | None) -> None:
        """Nothing to fence: the simulated step starts after the copies it waits for."""

    def synchronize(self) -> None:
        """Nothing to wait for: jobs end when the simulator's clock passes them."""
