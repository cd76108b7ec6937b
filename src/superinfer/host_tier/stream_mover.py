"""Stream and event plumbing shared by every KVMover: one side stream per direction.

``StreamMover`` owns the streams, the per-direction job queues, polling and the compute fence;
both submit calls go to one ``_submit(to_host, ...)`` that subclasses write.
``CopyMover`` adds the submit path of the movers that copy a batch in one go: subclasses say
how (``_copy_d2h`` / ``_copy_h2d``); it decides on which stream that runs, what it waits for,
and when it is reported done (style rule 9, V10). ``DirectKVMover`` submits its own way.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from superinfer.host_tier.interface import KVMover, LayerPlanes, TransferReport
from superinfer.host_tier.jobs import Job, JobQueue, check_device_buffers, check_slots
from superinfer.host_tier.pool import HostKVPool

CopyResult = tuple[tuple[torch.Tensor, ...], "torch.cuda.Event | None"]

# torch stream priorities: lower is more urgent. h2d feeds the next forward; d2h only frees memory.
H2D_PRIORITY = -1
D2H_PRIORITY = 0


class StreamMover(KVMover):
    """d2h on a low-priority stream, h2d on a high-priority one; on the CPU everything is
    synchronous."""

    HOST_PAGE_MAJOR = False  # the host layout this mover reads and writes (see pool.py)

    def __init__(self, planes: LayerPlanes, host: HostKVPool) -> None:
        # (layer, plane) order: the order of the planes in a host row (see pool.py)
        self.planes = check_device_buffers(planes, host.layout, host.buffer.dtype)
        if host.page_major != self.HOST_PAGE_MAJOR:
            want = "page-major" if self.HOST_PAGE_MAJOR else "token-major"
            raise ValueError(f"{type(self).__name__} needs a {want} HostKVPool "
                             f"(page_major={self.HOST_PAGE_MAJOR})")
        self.host = host
        self.device = self.planes[0].device
        self._on_cuda = self.device.type == "cuda"
        if self._on_cuda:
            self._d2h_stream = torch.cuda.Stream(self.device, priority=D2H_PRIORITY)
            self._h2d_stream = torch.cuda.Stream(self.device, priority=H2D_PRIORITY)
        self._d2h_jobs, self._h2d_jobs = JobQueue(), JobQueue()

    def submit_d2h(
        self,
        job_id: str,
        device_slots: torch.Tensor,
        host_slots: torch.Tensor,
        ready: object | None,
    ) -> int:
        return self._submit(True, job_id, device_slots, host_slots, ready)

    def submit_h2d(
        self,
        job_id: str,
        host_slots: torch.Tensor,
        device_slots: torch.Tensor,
        ready: object | None = None,
    ) -> int:
        return self._submit(False, job_id, device_slots, host_slots, ready)

    @abc.abstractmethod
    def _submit(self, to_host: bool, job_id: str, device_slots: torch.Tensor,
                host_slots: torch.Tensor, ready: object | None) -> int:
        """Both directions' submit: queue the job on ``self._jobs(to_host)``; returns bytes."""

    def _stream(self, to_host: bool) -> torch.cuda.Stream:
        return self._d2h_stream if to_host else self._h2d_stream

    def _jobs(self, to_host: bool) -> JobQueue:
        return self._d2h_jobs if to_host else self._h2d_jobs

    @contextmanager
    def _fenced(self, to_host: bool, ready: object | None) -> Iterator[torch.cuda.Stream]:
        """The direction's stream, current, after ``ready`` (the last forward that wrote the
        slots) and after everything queued so far on the caller's stream.

        NOTE: the caller's stream is always waited on too: the index tensors (and, for h2d,
        the freshly allocated slots) were computed there by kernels still queued."""
        stream = self._stream(to_host)
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            stream.wait_stream(caller)
            yield stream

    def poll(self) -> TransferReport:
        report = TransferReport()
        report.done_d2h, report.bytes_d2h = self._d2h_jobs.pop_done(report.timings)
        report.done_h2d, report.bytes_h2d = self._h2d_jobs.pop_done(report.timings)
        return report

    def fence_compute(self, stream: object | None) -> None:
        last = self._h2d_jobs.last_event()
        if last is not None:
            waiter = stream if stream is not None else torch.cuda.current_stream(self.device)
            waiter.wait_event(last)

    def synchronize(self) -> None:
        if self._on_cuda:
            self._d2h_stream.synchronize()
            self._h2d_stream.synchronize()


class CopyMover(StreamMover):
    """A mover whose subclass copies one whole batch per submit, on the direction stream."""

    def _submit(self, to_host: bool, job_id: str, device_slots: torch.Tensor,
                host_slots: torch.Tensor, ready: object | None) -> int:
        """Run the copy on the direction's stream, fenced (``_fenced``); on the CPU, now."""
        check_slots(device_slots, host_slots)
        copy = self._copy_d2h if to_host else self._copy_h2d
        num_bytes = host_slots.numel() * self.host.bytes_per_token
        if not self._on_cuda:
            copy(device_slots, host_slots)
            job = Job(job_id, num_bytes, None)
        else:
            with self._fenced(to_host, ready) as stream:
                dev_idx = device_slots.to(self.device, non_blocking=True)
                started = timing_event(stream)
                keepalive, event = copy(dev_idx, host_slots)
                if event is None:
                    event = timing_event(stream)
            job = Job(job_id, num_bytes, event, (device_slots, dev_idx, host_slots, *keepalive),
                      started=started)
        self._jobs(to_host).push(job)
        return num_bytes

    @abc.abstractmethod
    def _copy_d2h(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> CopyResult:
        """Enqueue the copy after the work on the current (direction) stream.

        Returns the tensors the copy still uses and, if it ends on another stream, the event
        that marks its end (a ``timing_event``; None: it ends on the direction stream)."""

    @abc.abstractmethod
    def _copy_h2d(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> CopyResult:
        """As ``_copy_d2h``, for host→device."""


def timing_event(stream: torch.cuda.Stream, blocking: bool = False) -> torch.cuda.Event:
    """An event recorded on ``stream`` that can time a copy (``Job.device_s``)."""
    event = torch.cuda.Event(enable_timing=True, blocking=blocking)
    event.record(stream)
    return event
