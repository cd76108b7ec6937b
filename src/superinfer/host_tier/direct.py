"""DirectKVMover: the kernel-free path, for SGLang pools with big enough pages.

One page of one layer's K (or V) is one contiguous piece in SGLang's layer-first device buffers
and in a page-major ``HostKVPool``, so a job is a list of (source, destination, size) pieces
that ``cudaMemcpyBatchAsync`` calls hand to the copy engines: no gather kernel, no SM time, no
staging memory. On the H200 this costs a decode step ~4% at 86-98 GB/s both ways with 128 KiB
pieces (64-token pages of Llama-3.1-8B; bench and diagnostic), where the staging path costs
11-15%; but copy engines need big pieces: with 32 KiB pieces (16-token pages) they reach only
~60 GB/s both ways (``eval/results/duplexkv_tradeoff_h200.png``). ``rotator.py`` picks this
path from the piece size.

Page rule: device and host pages hold the same ``page_size`` tokens (SGLang's ``--page-size``).
A job's slots cover whole pages from their first token, in order; only the last page may be
partial, and it is copied whole (its tail belongs to the same request and is unused).

The copy needs the slot numbers on the host. SGLang keeps them on the device, and reading them
there would block on the forward in flight. So a job with device-resident slots is deferred:
its direction stream copies the slots to pinned memory (after ``ready``), and a later ``poll``
issues the batch once they have arrived. Jobs of one direction are issued in submission order.
"""

from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass

import torch

from superinfer.host_tier.interface import TransferReport
from superinfer.host_tier.jobs import Job, JobQueue, check_slots
from superinfer.host_tier.pool import HostKVPool
from superinfer.host_tier.stream_mover import StreamMover

# Pieces of at least this size reached the goal on the H200 (98.5 GB/s both ways at +3.8%
# decode with 128 KiB; 80.6 GB/s with 64 KiB, 59.5 with 32 KiB): below it, staging is default.
DIRECT_MIN_PIECE_BYTES = 128 << 10
# One batch call costs the host ~0.4 us per piece, but a call that queues ~65k pieces blocks
# until most of them are copied (eval/results/diag_direct_submit_h200.json): one direction's
# huge call would then hold up the other's. So jobs go out in slices, and only so many pieces
# are queued per direction; ``poll`` (every scheduler iteration) issues the rest.
SLICE_PIECES = 4096
MAX_QUEUED_PIECES = 16384


@dataclass(slots=True)
class _Slice:
    """One batch call's worth of a job; ``job`` is set on the job's last slice."""

    dsts: torch.Tensor
    srcs: torch.Tensor
    job: Job | None


@dataclass(slots=True)
class _Deferred:
    """A job waiting for its slot numbers: ``dev_pages`` once known (slots given on the host),
    else ``slots`` lands in pinned memory when ``arrived`` fires."""

    job: Job
    host_pages: torch.Tensor
    dev_pages: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    arrived: torch.cuda.Event | None = None


class DirectKVMover(StreamMover):
    """Page pieces copied by the copy engines alone; needs a page-major host pool."""

    HOST_PAGE_MAJOR = True

    def __init__(
        self,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor],
        host: HostKVPool,
        max_queued_pieces: int = MAX_QUEUED_PIECES,
        slice_pieces: int = SLICE_PIECES,
    ) -> None:
        super().__init__(k_buffers, v_buffers, host)
        if not 0 < slice_pieces <= max_queued_pieces:
            raise ValueError(f"need 0 < slice_pieces <= max_queued_pieces, got {slice_pieces}, {max_queued_pieces}")
        self.max_queued_pieces, self.slice_pieces = max_queued_pieces, slice_pieces
        self.page_size = host.page_size
        row_bytes = k_buffers[0][0].numel() * k_buffers[0].element_size()
        self.piece_bytes = self.page_size * row_bytes
        self.device_pages = k_buffers[0].shape[0] // self.page_size
        # k0, v0, k1, v1, ...: the order of (layer, K/V) inside a page-major host page too.
        self._layer_ptrs = torch.tensor([b.data_ptr() for kv in zip(k_buffers, v_buffers) for b in kv],
                                        dtype=torch.int64)
        self._deferred: dict[bool, deque[_Deferred]] = {True: deque(), False: deque()}
        self._slices: dict[bool, deque[_Slice]] = {True: deque(), False: deque()}  # not issued yet
        self._queued: dict[bool, deque[tuple[torch.cuda.Event, int]]] = {True: deque(), False: deque()}
        if self._on_cuda:
            if not host.pinned:
                raise ValueError("DirectKVMover on CUDA needs a pinned HostKVPool")
            from superinfer.host_tier.cudart import runtime

            self._runtime = runtime()  # raises a clear RuntimeError before CUDA 12.8
            self._device_index = self.device.index if self.device.index is not None else torch.cuda.current_device()

    # --- KVMover ---------------------------------------------------------------------------
    def submit_d2h(
        self, job_id: str, device_slots: torch.Tensor, host_slots: torch.Tensor, ready: object | None
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

    def poll(self) -> TransferReport:
        for to_host in (True, False):
            self._issue_arrived(to_host)
            self._pump(to_host)
        return super().poll()

    def synchronize(self) -> None:
        for to_host in (True, False):
            for d in self._deferred[to_host]:
                if d.arrived is not None:
                    d.arrived.synchronize()
            self._issue_arrived(to_host)
        while self._slices[True] or self._slices[False]:
            for to_host in (True, False):
                if self._slices[to_host] and self._queued[to_host]:
                    self._queued[to_host][0][0].synchronize()
                self._pump(to_host)
        super().synchronize()

    # --- internals -------------------------------------------------------------------------
    def _submit(self, to_host: bool, job_id: str, device_slots: torch.Tensor,
                host_slots: torch.Tensor, ready: object | None) -> int:
        check_slots(device_slots, host_slots)
        queue: JobQueue = self._d2h_jobs if to_host else self._h2d_jobs
        if host_slots.numel() == 0:
            queue.push(Job(job_id, 0, None))
            return 0
        host_pages = pages_of(host_slots, self.page_size, "host")
        if int(host_pages.max()) >= self.host.num_pages:
            raise ValueError(f"host page {int(host_pages.max())} out of range [0, {self.host.num_pages})")
        job = Job(job_id, host_slots.numel() * self.host.bytes_per_token, None, issued=False)
        deferred = _Deferred(job, host_pages)
        if not device_slots.is_cuda:  # checked now: a bad job must not sit in the queue
            deferred.dev_pages = self._device_pages(device_slots, host_pages)
        if self._on_cuda:
            stream = self._d2h_stream if to_host else self._h2d_stream
            caller = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                if ready is not None:
                    stream.wait_event(ready)
                stream.wait_stream(caller)
                if device_slots.is_cuda:
                    deferred.slots = torch.empty(device_slots.shape, dtype=device_slots.dtype,
                                                 pin_memory=True)
                    deferred.slots.copy_(device_slots, non_blocking=True)
                    deferred.arrived = stream.record_event()
                    job.keepalive = (device_slots,)
        self._deferred[to_host].append(deferred)
        queue.push(job)
        self._issue_arrived(to_host)
        return job.num_bytes

    def _issue_arrived(self, to_host: bool) -> None:
        """Issue the oldest deferred jobs whose slots are on the host, in order."""
        pending = self._deferred[to_host]
        while pending and (pending[0].arrived is None or pending[0].arrived.query()):
            d = pending.popleft()
            dev_pages = d.dev_pages if d.dev_pages is not None else self._device_pages(d.slots, d.host_pages)
            self._issue(to_host, d.job, dev_pages, d.host_pages)

    def _device_pages(self, slots: torch.Tensor, host_pages: torch.Tensor) -> torch.Tensor:
        dev_pages = pages_of(slots, self.page_size, "device")
        if int(dev_pages.max()) >= self.device_pages:
            raise ValueError(f"device page {int(dev_pages.max())} out of range [0, {self.device_pages})")
        if dev_pages.numel() != host_pages.numel():
            raise ValueError(f"{dev_pages.numel()} device pages but {host_pages.numel()} host pages")
        return dev_pages

    def _issue(self, to_host: bool, job: Job, dev_pages: torch.Tensor, host_pages: torch.Tensor) -> None:
        dev, host = piece_addresses(self._layer_ptrs, dev_pages, self.host.buffer.data_ptr(),
                                    host_pages, self.piece_bytes)
        dsts, srcs = (host, dev) if to_host else (dev, host)
        step = self.slice_pieces
        for start in range(0, dsts.numel(), step):
            last = start + step >= dsts.numel()
            self._slices[to_host].append(_Slice(dsts[start : start + step], srcs[start : start + step],
                                                job if last else None))
        self._pump(to_host)

    def _pump(self, to_host: bool) -> None:
        """Issue waiting slices while at most ``max_queued_pieces`` are queued on the stream."""
        queued, waiting = self._queued[to_host], self._slices[to_host]
        while queued and queued[0][0].query():
            queued.popleft()
        while waiting and (not queued or sum(n for _, n in queued) + waiting[0].dsts.numel()
                           <= self.max_queued_pieces):
            piece = waiting.popleft()
            event = self._copy_slice(to_host, piece)
            if event is not None:
                queued.append((event, piece.dsts.numel()))
            if piece.job is not None:
                piece.job.event, piece.job.issued = event, True

    def _copy_slice(self, to_host: bool, piece: _Slice) -> torch.cuda.Event | None:
        """One batch call on the direction's stream, and its end event; on the CPU, memmove
        now (no event: done)."""
        if not self._on_cuda:
            for dst, src in zip(piece.dsts.tolist(), piece.srcs.tolist(), strict=True):
                ctypes.memmove(dst, src, self.piece_bytes)
            return None
        stream = self._d2h_stream if to_host else self._h2d_stream
        sizes = torch.full_like(piece.dsts, self.piece_bytes)
        self._runtime.memcpy_batch(piece.dsts, piece.srcs, sizes, to_host, stream, self._device_index)
        return stream.record_event()


def pages_of(slots: torch.Tensor, page_size: int, side: str) -> torch.Tensor:
    """The pages that ``slots`` (CPU) fill in order from their first token; ValueError unless
    every page starts at its first slot and runs on consecutively (the last may stop early)."""
    slots = slots.reshape(-1).to(torch.int64)
    first = slots[::page_size]
    pos = torch.arange(slots.numel())
    expected = first.repeat_interleave(page_size)[: slots.numel()] + pos % page_size
    broken = slots.ne(expected) | ((pos % page_size == 0) & (slots % page_size != 0))
    if bool(broken.any()):
        bad = int(torch.nonzero(broken)[0])
        raise ValueError(f"{side} slots must fill whole {page_size}-token pages in order "
                         f"(slot {int(slots[bad])} at position {bad} breaks it)")
    return first // page_size


def piece_addresses(layer_ptrs: torch.Tensor, device_pages: torch.Tensor, host_base: int,
                    host_pages: torch.Tensor, piece_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start addresses of every (page, layer, K/V) piece on both sides, page by page.

    ``layer_ptrs`` are the device buffers in (layer, K/V) order; a page-major host page holds
    the same pieces back to back in that order."""
    per_page = layer_ptrs.numel()
    dev = layer_ptrs[None, :] + device_pages[:, None] * piece_bytes
    host = (host_base + host_pages[:, None] * (per_page * piece_bytes)
            + torch.arange(per_page, dtype=torch.int64)[None, :] * piece_bytes)
    return dev.reshape(-1).contiguous(), host.reshape(-1).contiguous()
