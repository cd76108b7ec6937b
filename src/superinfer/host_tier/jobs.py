"""Bookkeeping shared by the movers: per-direction job queues and host-slot runs."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from superinfer.host_tier.interface import KVLayout, LayerPlanes


@dataclass(slots=True)
class Job:
    """One submitted transfer. ``keepalive`` holds every tensor the side stream still touches
    (index tensors, staging buffers), so the caching allocator cannot hand their memory to
    someone else before ``event`` fires."""

    job_id: str
    num_bytes: int
    event: torch.cuda.Event | None  # None: the work finished before submit returned (CPU)
    keepalive: tuple[torch.Tensor, ...] = ()
    issued: bool = True  # False while a mover holds the copy back (direct.py's deferred jobs)
    # Recorded on the copy's stream once its fences have fired; with ``event`` (both timing
    # events) it times the copy alone, not the forward it waited for nor the polling.
    started: torch.cuda.Event | None = None

    def is_done(self) -> bool:
        return self.issued and (self.event is None or self.event.query())

    def device_s(self) -> float | None:
        """Seconds the copy ran on the device (None: not timed, e.g. on the CPU); call once
        done."""
        if self.started is None or self.event is None:
            return None
        return self.started.elapsed_time(self.event) / 1e3


class JobQueue:
    """The jobs of one direction in submission order; they run in order on one stream, so
    polling only the head is enough."""

    def __init__(self) -> None:
        self._jobs: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def push(self, job: Job) -> None:
        self._jobs.append(job)

    def pop_done(self, timings: dict[str, tuple[int, float]]) -> tuple[list[str], int]:
        """Remove the finished head jobs; return their ids and bytes, and add the timed ones
        to ``timings`` (id: bytes, seconds on the device). Never blocks."""
        done_ids, num_bytes = [], 0
        while self._jobs and self._jobs[0].is_done():
            job = self._jobs.popleft()
            done_ids.append(job.job_id)
            num_bytes += job.num_bytes
            if (seconds := job.device_s()) is not None and job.num_bytes:
                timings[job.job_id] = (job.num_bytes, seconds)
        return done_ids, num_bytes

    def last_event(self) -> torch.cuda.Event | None:
        """The event of the newest issued job (a job not issued yet is never reported done,
        so nobody can be waiting to read its KV)."""
        for job in reversed(self._jobs):
            if job.issued and job.event is not None:
                return job.event
        return None


def contiguous_runs(host_slots: torch.Tensor, boundary: int) -> list[tuple[int, int, int]]:
    """Split host slots into maximal runs of consecutive slots that do not cross a multiple of
    ``boundary`` (``HostKVPool.dma_chunk_tokens``: one DMA must stay inside one pinned range).

    Returns ``(offset, host_start, length)``: ``host_slots[offset:offset+length]`` equals
    ``host_start + arange(length)``. Pages come from ``HostKVPool.alloc`` in runs, so a batch
    usually is one or a few runs, each one DMA.
    """
    slots = host_slots.reshape(-1)
    if slots.numel() == 0:
        return []
    starts = torch.ones(slots.numel(), dtype=torch.bool)
    starts[1:] = (slots[1:] - slots[:-1] != 1) | (slots[1:] % boundary == 0)
    offsets = torch.nonzero(starts).reshape(-1)
    lengths = torch.diff(offsets, append=torch.tensor([slots.numel()]))
    return list(zip(offsets.tolist(), slots[offsets].tolist(), lengths.tolist(), strict=True))


def check_device_buffers(planes: LayerPlanes, layout: KVLayout, dtype: torch.dtype
                         ) -> list[torch.Tensor]:
    """Raise ValueError unless ``planes`` are SGLang's layer-first ``[slots, heads, head_dim]``
    buffers of ``layout``; return them flat, in (layer, plane) order."""
    if (len(planes) != layout.num_layers
            or any(len(layer) != layout.planes_per_layer for layer in planes)):
        raise ValueError(
            f"expected {layout.num_layers} layers of {layout.planes_per_layer} KV planes")
    flat = [buf for layer in planes for buf in layer]
    shape = flat[0].shape
    for buf in flat:
        if buf.shape != shape or buf.dtype != dtype or not buf.is_contiguous():
            raise ValueError(f"KV buffers must be contiguous {tuple(shape)} of {dtype}")
        if buf.device != flat[0].device:
            raise ValueError("KV buffers must live on one device")
    if shape[1:] != (layout.num_heads, layout.head_dim):
        raise ValueError(f"KV buffer shape {tuple(shape)} does not match {layout}")
    return flat


def check_slots(device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
    """Raise ValueError unless the slot tensors pair up; host slots must be CPU int64."""
    if (device_slots.dim() != 1 or host_slots.dim() != 1
            or device_slots.numel() != host_slots.numel()):
        raise ValueError("device_slots and host_slots must be 1-D and of equal length")
    if host_slots.device.type != "cpu" or host_slots.dtype != torch.int64:
        raise ValueError("host_slots must be a CPU int64 tensor (from HostKVPool.alloc)")
    if device_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError("device_slots must be int32 or int64")
