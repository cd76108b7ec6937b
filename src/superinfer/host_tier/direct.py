"""DirectKVMover: the kernel-free path, for SGLang pools with big enough pages.

One page of one plane (a layer's K or V; MLA: a layer's latent) is one contiguous piece in
SGLang's layer-first device buffers and in a page-major ``HostKVPool``, so a job is a list of
(source, destination, size) pieces that ``cudaMemcpyBatchAsync`` calls hand to the copy
engines: no gather kernel, no SM time, no staging memory, so it slows the model's decode steps
far less than the staging path; but the copy engines need big pieces to reach full duplex
(README, DuplexKV section). ``host_tier/factory.py`` picks this path from the piece size.

Page rule: device and host pages hold the same ``page_size`` tokens (SGLang's ``--page-size``).
A job's slots cover whole pages from their first token, in order; only the last page may be
partial, and it is copied whole (its tail belongs to the same request and is unused).

Who issues: on CUDA each direction has an issuer thread. A batch call costs the host time per
piece and blocks once the copy engine's queue is full; in the scheduler's
thread that time would delay every decode launch, and one direction's blocked call would starve
the other. ctypes releases the GIL for the call, so the scheduler keeps running.

The copy needs the slot numbers on the host. SGLang keeps them on the device, and reading them
there would block on the forward in flight. So the direction stream copies them to pinned
memory (after ``ready``) and the issuer waits for that copy, not the scheduler. Jobs of one
direction are issued in submission order. On the CPU (tests) the same plan runs through
``memmove`` in the caller's thread, or in the issuer thread with ``issue_thread=True``.
"""

from __future__ import annotations

import atexit
import ctypes
import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from superinfer.host_tier.interface import LayerPlanes, TransferReport
from superinfer.host_tier.jobs import Job, check_slots
from superinfer.host_tier.pool import HostKVPool
from superinfer.host_tier.stream_mover import StreamMover, timing_event

# Pieces of at least this size reached full duplex with the copy engines alone in the DuplexKV
# bench; below it, staging is the default.
DIRECT_MIN_PIECE_BYTES = 128 << 10
# One call that queues a large job's pieces blocks the host until most of them are copied
# (eval/diagnostics/diag_direct_submit.py), so jobs go out in slices, and only so many pieces
# are queued on a direction's stream at once.
SLICE_PIECES = 4096
MAX_QUEUED_PIECES = 16384


def mover_path(flag: str, on_cuda: bool, piece_bytes: int) -> str:
    """``--rota-mover`` resolved. Off CUDA: torch, or direct if asked (it runs there too, copying
    with memmove). On CUDA, ``auto`` is direct when one page of one layer (``piece_bytes``) is
    at least ``DIRECT_MIN_PIECE_BYTES`` (copy engines alone then reach full duplex), else
    staging."""
    if not on_cuda:
        return "direct" if flag == "direct" else "torch"
    if flag != "auto":
        return flag
    return "direct" if piece_bytes >= DIRECT_MIN_PIECE_BYTES else "staging"


@dataclass(slots=True)
class _Pending:
    """A submitted job on its way to the copy engines: ``dev_pages`` when its slots were given
    on the host, else ``slots`` lands in pinned memory when ``arrived`` fires."""

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
        planes: LayerPlanes,
        host: HostKVPool,
        max_queued_pieces: int = MAX_QUEUED_PIECES,
        slice_pieces: int = SLICE_PIECES,
        issue_thread: bool = False,
    ) -> None:
        """``issue_thread`` (tests): on the CPU too, issue from a thread per direction."""
        super().__init__(planes, host)
        if not 0 < slice_pieces <= max_queued_pieces:
            raise ValueError("need 0 < slice_pieces <= max_queued_pieces, "
                             f"got {slice_pieces}, {max_queued_pieces}")
        self.max_queued_pieces, self.slice_pieces = max_queued_pieces, slice_pieces
        self.page_size = host.page_size
        first = self.planes[0]
        self.piece_bytes = self.page_size * first[0].numel() * first.element_size()
        self.device_pages = first.shape[0] // self.page_size
        # (layer, plane) order, e.g. k0, v0, k1, v1, ...: the order inside a page-major host page.
        self._plane_ptrs = torch.tensor([b.data_ptr() for b in self.planes], dtype=torch.int64)
        if self._on_cuda:
            if not host.pinned:
                raise ValueError("DirectKVMover on CUDA needs a pinned HostKVPool")
            from superinfer.host_tier.cudart import runtime

            self._runtime = runtime()  # raises a clear RuntimeError before CUDA 12.8
            self._device_index = (self.device.index if self.device.index is not None
                                  else torch.cuda.current_device())
        threaded = self._on_cuda or issue_thread
        self._issuers = ({to_host: _Issuer(self, to_host) for to_host in (True, False)}
                         if threaded else None)
        for issuer in (self._issuers or {}).values():
            weakref.finalize(self, issuer.stop)  # threads end with the mover (and free its pool)

    # --- KVMover ---------------------------------------------------------------------------
    def poll(self) -> TransferReport:
        self._raise_failure()
        return super().poll()

    def synchronize(self) -> None:
        if self._issuers is not None:
            for issuer in self._issuers.values():
                issuer.join()
        self._raise_failure()
        super().synchronize()

    # --- internals -------------------------------------------------------------------------
    def _submit(self, to_host: bool, job_id: str, device_slots: torch.Tensor,
                host_slots: torch.Tensor, ready: object | None) -> int:
        self._raise_failure()
        check_slots(device_slots, host_slots)
        jobs = self._jobs(to_host)
        if host_slots.numel() == 0:
            jobs.push(Job(job_id, 0, None))
            return 0
        host_pages = pages_of(host_slots, self.page_size, "host")
        if int(host_pages.max()) >= self.host.num_pages:
            raise ValueError(
                f"host page {int(host_pages.max())} out of range [0, {self.host.num_pages})")
        job = Job(job_id, host_slots.numel() * self.host.bytes_per_token, None, issued=False)
        pending = _Pending(job, host_pages)
        if not device_slots.is_cuda:  # checked now: a bad job must not reach the queue
            pending.dev_pages = self._device_pages(device_slots, host_pages)
        if self._on_cuda:
            with self._fenced(to_host, ready) as stream:
                if device_slots.is_cuda:
                    pending.slots = torch.empty(device_slots.shape, dtype=device_slots.dtype,
                                                pin_memory=True)
                    pending.slots.copy_(device_slots, non_blocking=True)
                    pending.arrived = _recorded(stream)
                    job.keepalive = (device_slots,)
        jobs.push(job)
        if self._issuers is not None:
            self._issuers[to_host].put(pending)
        else:
            self._issue(to_host, pending, None)
        return job.num_bytes

    def _raise_failure(self) -> None:
        for issuer in (self._issuers or {}).values():
            if issuer.failure is not None:
                raise RuntimeError(f"DirectKVMover: a {issuer.name} copy failed; the mover is "
                                   f"unusable") from issuer.failure

    def _device_pages(self, slots: torch.Tensor, host_pages: torch.Tensor) -> torch.Tensor:
        dev_pages = pages_of(slots, self.page_size, "device")
        if int(dev_pages.max()) >= self.device_pages:
            raise ValueError(
                f"device page {int(dev_pages.max())} out of range [0, {self.device_pages})")
        if dev_pages.numel() != host_pages.numel():
            raise ValueError(
                f"{dev_pages.numel()} device pages but {host_pages.numel()} host pages")
        return dev_pages

    def _issue(self, to_host: bool, pending: _Pending, issuer: _Issuer | None) -> None:
        """Copy ``pending``'s pieces slice by slice (``issuer``: in its thread, with room
        limits); the job's event is its last slice's."""
        if pending.arrived is not None:
            pending.arrived.synchronize()  # releases the GIL
        dev_pages = pending.dev_pages
        if dev_pages is None:
            dev_pages = self._device_pages(pending.slots, pending.host_pages)
        dev, host = piece_addresses(self._plane_ptrs, dev_pages, self.host.buffer.data_ptr(),
                                    pending.host_pages, self.piece_bytes)
        dsts, srcs = (host, dev) if to_host else (dev, host)
        event = None
        for start in range(0, dsts.numel(), self.slice_pieces):
            piece = slice(start, start + self.slice_pieces)
            count = dsts[piece].numel()
            if issuer is not None:
                issuer.make_room(count)
            if start == 0 and self._on_cuda:
                pending.job.started = timing_event(self._stream(to_host))
            event = self._copy_slice(to_host, dsts[piece], srcs[piece])
            if issuer is not None:
                issuer.issued(event, count)
        pending.job.event = event
        pending.job.issued = True  # after the event: the scheduler thread reads them in this order

    def _copy_slice(self, to_host: bool, dsts: torch.Tensor,
                    srcs: torch.Tensor) -> torch.cuda.Event | None:
        """One batch call on the direction's stream, and its end event; on the CPU, memmove
        now (no event: done)."""
        if not self._on_cuda:
            for dst, src in zip(dsts.tolist(), srcs.tolist(), strict=True):
                ctypes.memmove(dst, src, self.piece_bytes)
            return None
        stream = self._stream(to_host)
        sizes = torch.full_like(dsts, self.piece_bytes)
        self._runtime.memcpy_batch(dsts, srcs, sizes, to_host, stream, self._device_index)
        return _recorded(stream)


class _Issuer:
    """One direction's jobs in a thread of their own, in order: wait for the slot numbers, then
    issue the pieces slice by slice, each once the stream has room (``max_queued_pieces``).
    It holds its mover weakly, so a dropped mover (and its pinned host pool) can be freed, and
    starts with its first job, so no thread of ours touches CUDA while SGLang still sets up
    (CUDA-graph capture)."""

    def __init__(self, mover: DirectKVMover, to_host: bool) -> None:
        self._mover = weakref.ref(mover)
        self.to_host, self.max_queued_pieces = to_host, mover.max_queued_pieces
        self.name = "device->host" if to_host else "host->device"
        self.failure: BaseException | None = None
        self._inbox: queue.Queue[_Pending | None] = queue.Queue()
        self._queued: deque[tuple[torch.cuda.Event, int]] = deque()  # issued, maybe not done
        device = mover.device if mover._on_cuda else None
        self.thread = threading.Thread(target=self._run, args=(device,), daemon=True,
                                       name=f"superinfer-{self.name}")
        _LIVE_ISSUERS.add(self)

    def put(self, pending: _Pending) -> None:
        if self.thread.ident is None:
            self.thread.start()
        self._inbox.put(pending)

    def join(self) -> None:
        """Block until every job put so far is issued (not necessarily copied)."""
        self._inbox.join()

    def stop(self) -> None:
        self._inbox.put(None)

    def make_room(self, pieces: int) -> None:
        queued = self._queued
        while queued and (queued[0][0].query()
                          or sum(n for _, n in queued) + pieces > self.max_queued_pieces):
            queued[0][0].synchronize()  # releases the GIL
            queued.popleft()

    def issued(self, event: torch.cuda.Event | None, pieces: int) -> None:
        if event is not None:
            self._queued.append((event, pieces))

    def _run(self, device: torch.device | None) -> None:
        if device is not None:
            torch.cuda.set_device(device)
        while (pending := self._inbox.get()) is not None:
            try:
                if self.failure is None:
                    self._handle(pending)
            except BaseException as exc:  # noqa: BLE001 - raised by the mover's next call
                self.failure = exc
            finally:
                self._inbox.task_done()
        self._inbox.task_done()

    def _handle(self, pending: _Pending) -> None:
        mover = self._mover()  # a local: the mover stays collectable while the thread waits
        if mover is not None:
            mover._issue(self.to_host, pending, self)


_LIVE_ISSUERS: weakref.WeakSet[_Issuer] = weakref.WeakSet()


@atexit.register
def _stop_issuers() -> None:
    """Stop and join the issuer threads before the interpreter finalizes: a daemon thread
    that wakes up then can abort the process ("terminate called without an active
    exception", seen with a mover still alive at exit)."""
    issuers = list(_LIVE_ISSUERS)
    for issuer in issuers:
        issuer.stop()
    for issuer in issuers:
        if issuer.thread.ident is not None:
            issuer.thread.join(timeout=5)


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event recorded on ``stream`` that an issuer thread waits on: a blocking-sync event,
    so the thread sleeps in the wait instead of spinning a CPU core for the whole copy (and a
    timing one: the last slice's times the job)."""
    return timing_event(stream, blocking=True)


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


def piece_addresses(
    plane_ptrs: torch.Tensor, device_pages: torch.Tensor, host_base: int,
    host_pages: torch.Tensor, piece_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start addresses of every (page, layer, plane) piece on both sides, page by page.

    ``plane_ptrs`` are the device planes in (layer, plane) order; a page-major host page holds
    the same pieces back to back in that order."""
    per_page = plane_ptrs.numel()
    dev = plane_ptrs[None, :] + device_pages[:, None] * piece_bytes
    host = (host_base + host_pages[:, None] * (per_page * piece_bytes)
            + torch.arange(per_page, dtype=torch.int64)[None, :] * piece_bytes)
    return dev.reshape(-1).contiguous(), host.reshape(-1).contiguous()
