"""HostTierManager: the one owner of host-side state, keyed by request id.

A request has an entry here while any of its KV lives in the host tier::

    (no entry) --start_out--> ROTATING_OUT --copy done--> ON_HOST --start_in--> ROTATING_IN
    ROTATING_IN --copy done--> KEPT (whole pages kept, if asked) or no entry
    KEPT --start_out--> ROTATING_OUT (copies only the tail written since)
    KEPT --write_through copy done--> KEPT (longer)

``KEPT`` entries are resident requests whose first pages are still valid on the host (KV is
never rewritten once written): the oldest are evicted first when a rotate-out needs room.

Protocol: queries (``plan_out``, ``state``, ``free_tokens``) have no side effects; ``start_*``
commit and return None when the tier has no room (nothing changed then). Completions come back
only through ``poll`` as a ``TierReport``; device pages of a rotate-out may be released only
once it lists the request. ``drop`` is the single way a request's host state ends early (it
finished, was retracted or aborted): pages of a copy in flight are freed when it lands.

It takes device slot tensors and a ``KVMover`` (or a modelled one, in the simulator) and never
touches SGLang or the policy's table.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from enum import IntEnum

import torch

from ..policy.types import TierReport, Transfer
from .interface import KVMover
from .pool import HostPages


class HostTierFault(RuntimeError):
    """A copy failed in a way that leaves the device state unknown: the server must stop."""


class TierState(IntEnum):
    KEPT = 0  # resident on the device, with a host copy of its first whole pages
    ROTATING_OUT = 1  # device->host copy in flight; the device KV is still allocated
    ON_HOST = 2  # all of its KV is on the host only
    ROTATING_IN = 3  # host->device copy in flight into freshly allocated device slots


_AWAY = (TierState.ROTATING_OUT, TierState.ON_HOST, TierState.ROTATING_IN)
_EMPTY = torch.empty(0, dtype=torch.int64)


@dataclass(slots=True)
class HostEntry:
    state: TierState
    host_slots: torch.Tensor  # the whole KV while away; whole pages while KEPT
    kv_len: int  # KV tokens the host copy stands for while away
    submitted_s: float = 0.0
    num_bytes: int = 0  # of the copy in flight
    dropped: bool = False  # drop() came while a copy was in flight
    version: int = 0  # changes whenever host_slots is replaced (not extended)


@dataclass(slots=True)
class _Job:
    req_id: str
    to_host: bool
    write_through: bool = False
    version: int = 0  # write-through: the KEPT entry's version it extends...
    base_len: int = 0  # ...and its length then
    host_slots: torch.Tensor = _EMPTY  # write-through: the pages being filled
    fails: bool = False  # reported as failed when it lands (fault injection)


@dataclass(slots=True)
class TierStats:
    bytes_d2h: int = 0  # rotate-outs
    bytes_h2d: int = 0
    bytes_d2h_saved: int = 0  # not copied out: already on the host in a kept copy
    host_copies_evicted: int = 0  # kept copies dropped to make host room
    bytes_written_through: int = 0
    copies_failed_d2h: int = 0  # rotate-outs whose copy failed: the request stayed on the device
    copies_failed_h2d: int = 0  # rotate-ins whose copy failed: the request failed with an error

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class HostTierManager:
    def __init__(self, pages: HostPages, mover: KVMover, bytes_per_token: int,
                 keep_copies: bool, fail_copies: dict[bool, frozenset[int]] | None = None) -> None:
        """``fail_copies`` (tests only): per direction (keyed by to_host), the 1-based numbers
        of the rotation copies to report as failed (see superinfer.env)."""
        self.pages, self.mover = pages, mover
        self.bytes_per_token = bytes_per_token
        self.keep_copies = keep_copies
        self.stats = TierStats()
        self._entries: dict[str, HostEntry] = {}  # insertion order = eviction order of KEPT
        self._jobs: dict[str, _Job] = {}
        # Jobs per direction (keyed by to_host) in submission order, and those the mover has
        # finished: a direction's done count is the finished prefix of its order, the same
        # jobs on every TP rank (see ``collect``).
        self._order: dict[bool, deque[str]] = {True: deque(), False: deque()}
        # done on this rank, not reported yet: job id -> (bytes, seconds on the link) or None
        self._finished: dict[str, tuple[int, float] | None] = {}
        self._ids = itertools.count()
        self._fail_copies = fail_copies or {}
        self._num_copies = {True: 0, False: 0}  # rotation copies submitted, per direction

    # --- queries --------------------------------------------------------------------------
    def state(self, req_id: str) -> TierState | None:
        entry = self._entries.get(req_id)
        return None if entry is None else entry.state

    def away_ids(self) -> list[str]:
        return [r for r, e in self._entries.items() if e.state in _AWAY]

    def num_away(self) -> int:
        return sum(e.state in _AWAY for e in self._entries.values())

    def away_kv_len(self, req_id: str) -> int:
        """KV tokens an away request's host copy stands for."""
        entry = self._entries[req_id]
        if entry.state not in _AWAY:
            raise ValueError(f"request {req_id!r} is not away ({entry.state.name})")
        return entry.kv_len

    def dropped(self, req_id: str) -> bool:
        """``drop`` was called while a copy of ``req_id`` was in flight."""
        entry = self._entries.get(req_id)
        return entry is not None and entry.dropped

    def host_tokens(self, req_id: str) -> int:
        """Tokens of ``req_id``'s kept copy (0 without one)."""
        entry = self._entries.get(req_id)
        return int(entry.host_slots.numel()) if entry and entry.state is TierState.KEPT else 0

    def kept_ids(self) -> list[str]:
        return [r for r, e in self._entries.items() if e.state is TierState.KEPT]

    def num_kept(self) -> int:
        """Resident requests with a kept host copy."""
        return sum(self.host_tokens(r) > 0 for r in self._entries)

    def kept_tokens(self) -> int:
        return sum(self.host_tokens(r) for r in self._entries)

    def free_tokens(self) -> int:
        """Host room a rotate-out can have: free pages plus the kept copies it may evict."""
        return self.pages.available_size() + self.kept_tokens()

    def used_tokens(self) -> int:
        return self.pages.size - self.pages.available_size()

    def num_writes_in_flight(self) -> int:
        return sum(j.write_through for j in self._jobs.values())

    def busy(self) -> bool:
        """Requests away, or copies of any kind in flight."""
        return bool(self._jobs) or self.num_away() > 0

    def plan_out(self, req_id: str, kv_len: int) -> int | None:
        """Tokens a rotate-out of ``req_id`` (``kv_len`` KV tokens) would copy, or None if the
        tier cannot make room for them (evicting other requests' kept copies)."""
        entry = self._entries.get(req_id)
        if entry is not None and entry.state is not TierState.KEPT:
            raise ValueError(f"request {req_id!r} is already away ({entry.state.name})")
        have = self.host_tokens(req_id)
        tail = kv_len - have if have <= kv_len else kv_len
        room = self.pages.available_size() + self.kept_tokens() - have
        needed = -(-tail // self.pages.page_size) * self.pages.page_size
        return tail if needed <= room else None

    # --- commits --------------------------------------------------------------------------
    def start_out(self, req_id: str, device_slots: torch.Tensor, ready: object | None,
                  now_s: float) -> int | None:
        """Start copying the KV at ``device_slots`` (positions [0, kv_len)) to the host; only
        what a kept copy lacks moves. Returns the bytes queued, or None (nothing changed) if
        the tier has no room. The device slots stay the caller's until ``poll`` reports it."""
        kv_len = int(device_slots.numel())
        tail_len = self.plan_out(req_id, kv_len)
        if tail_len is None:
            return None
        entry = self._entries.pop(req_id, None)
        kept = entry.host_slots if entry is not None else _EMPTY
        if kept.numel() > kv_len:  # cannot happen while KV only grows; never trust it
            self.pages.free(kept)
            kept = _EMPTY
        tail = self._alloc(tail_len) if tail_len else _EMPTY
        if tail is None:  # plan_out counted the room: a bug, not a full tier
            raise AssertionError(f"host tier: room for {tail_len} tokens vanished")
        job_id = self._job(req_id, to_host=True)
        nbytes = (self.mover.submit_d2h(job_id, device_slots[kept.numel():], tail, ready)
                  if tail_len else 0)
        self._entries[req_id] = HostEntry(TierState.ROTATING_OUT, torch.cat([kept, tail]), kv_len,
                                          now_s, nbytes, version=next(self._ids))
        self.stats.bytes_d2h += nbytes
        self.stats.bytes_d2h_saved += int(kept.numel()) * self.bytes_per_token
        if not tail_len:
            self._finished[job_id] = None  # nothing to copy: done once the jobs before it are
        return nbytes

    def start_in(self, req_id: str, device_slots: torch.Tensor, prefix_len: int,
                 ready: object | None, now_s: float) -> int:
        """Copy positions [prefix_len, kv_len) back into ``device_slots`` (freshly allocated;
        [0, prefix_len) is still on the device, e.g. in the radix tree). Returns bytes."""
        entry = self._entries[req_id]
        if entry.state is not TierState.ON_HOST:
            raise ValueError(f"request {req_id!r} is not on the host ({entry.state.name})")
        if device_slots.numel() != entry.kv_len - prefix_len:
            raise ValueError(f"{req_id!r}: {device_slots.numel()} device slots for "
                             f"[{prefix_len}, {entry.kv_len})")
        job_id = self._job(req_id, to_host=False)
        entry.num_bytes = self.mover.submit_h2d(job_id, entry.host_slots[prefix_len:entry.kv_len],
                                                device_slots, ready)
        entry.state, entry.submitted_s = TierState.ROTATING_IN, now_s
        self.stats.bytes_h2d += entry.num_bytes
        return entry.num_bytes

    def write_through(self, running: Iterable[tuple[str, int]],
                      device_slots: Callable[[str], torch.Tensor], budget_tokens: int,
                      ready: object | None) -> None:
        """Copy resident requests' unsaved full pages to the host while the link is idle, so a
        later rotate-out moves only the pages written since. ``running``: (request id, KV
        length) of the decoding requests. The requests with the most unsaved pages go first
        (the first even past ``budget_tokens``), only into the free half of the tier, and none
        while a write-through copy is in flight: rotations come first."""
        if self.num_writes_in_flight():
            return
        page = self.pages.page_size
        room = self.pages.available_size() - self.pages.size // 2
        wants = []
        for req_id, kv_len in running:
            entry = self._entries.get(req_id)
            if entry is not None and entry.state is not TierState.KEPT:
                continue
            have = self.host_tokens(req_id)
            full = kv_len // page * page
            if full - have >= page:
                wants.append((full - have, req_id, have, full))
        wants.sort(key=lambda w: (-w[0], w[1]))
        first = True
        for want, req_id, have, full in wants:
            if want > room or (want > budget_tokens and not first):
                continue
            first = False
            slots = self.pages.alloc(want)
            if slots is None:
                break
            entry = self._anchor(req_id)
            job_id = self._job(req_id, to_host=True, write_through=True, version=entry.version,
                               base_len=have, host_slots=slots)
            self.mover.submit_d2h(job_id, device_slots(req_id)[have:full], slots, ready)
            budget_tokens, room = budget_tokens - want, room - want
            self.stats.bytes_written_through += want * self.bytes_per_token

    def drop(self, req_id: str) -> bool:
        """End ``req_id``'s host state (finished, retracted by the server, or aborted). Returns
        True if nothing of it is left here; False if a copy is in flight: its pages are freed
        when it lands, and ``poll`` lists it in ``cancelled``."""
        entry = self._entries.get(req_id)
        if entry is None:
            return True
        if entry.state in (TierState.KEPT, TierState.ON_HOST):
            del self._entries[req_id]
            self.pages.free(entry.host_slots)
            return True
        entry.dropped = True
        return False

    # --- completions ----------------------------------------------------------------------
    def collect(self) -> tuple[int, int]:
        """Take the mover's finished jobs. Returns how many are done on this rank and not yet
        reported, per direction (d2h, h2d): under TP, ``poll`` reports only the agreed counts."""
        try:
            report = self.mover.poll()
        except Exception as e:  # a copy engine or kernel fault: the CUDA context is suspect
            raise HostTierFault(f"a DuplexKV copy failed ({e}); KV of the requests in flight is "
                                "lost and the CUDA context may be unusable: stopping") from e
        for job_id in (*report.done_d2h, *report.done_h2d):
            self._finished[job_id] = report.timings.get(job_id)
        return self._finished_prefix(True), self._finished_prefix(False)

    def _finished_prefix(self, to_host: bool) -> int:
        count = 0
        for job_id in self._order[to_host]:
            if job_id not in self._finished:
                break
            count += 1
        return count

    def poll(self, now_s: float, num_d2h: int | None = None,
             num_h2d: int | None = None) -> TierReport:
        """Finish the first ``num_d2h``/``num_h2d`` collected jobs (all by default: one rank)."""
        if num_d2h is None or num_h2d is None:
            local = self.collect()
            num_d2h = local[0] if num_d2h is None else num_d2h
            num_h2d = local[1] if num_h2d is None else num_h2d
        report = TierReport(now_s=now_s)
        for to_host, count in ((True, num_d2h), (False, num_h2d)):
            for _ in range(count):
                job_id = self._order[to_host].popleft()
                link = self._finished.pop(job_id)  # KeyError: asked to finish a running job
                self._finish(self._jobs.pop(job_id), now_s, report, link)
        self._fill_usage(report)
        return report

    def report(self, now_s: float) -> TierReport:
        """A report of no completions: the kept copies and usage as they are now (after a
        rotate-out evicted copies, say)."""
        return self._fill_usage(TierReport(now_s=now_s))

    def _fill_usage(self, report: TierReport) -> TierReport:
        report.host_tokens = {r: int(e.host_slots.numel()) for r, e in self._entries.items()
                              if e.state is TierState.KEPT and e.host_slots.numel()}
        report.free_host_tokens = self.free_tokens()
        report.used_host_tokens = self.used_tokens()
        return report

    def _finish(self, job: _Job, now_s: float, report: TierReport,
                link: tuple[int, float] | None) -> None:
        if job.write_through:
            self._extend(job)
            return
        entry = self._entries[job.req_id]
        elapsed = max(now_s - entry.submitted_s, 1e-6)
        # NOTE: where the mover did not time the copy (``link``), it is priced by the whole KV
        # it stands for, not the bytes it moved: the policy prices a request's return by its
        # whole KV, so a radix hit or a kept copy reads as a faster link (and a copy of nothing
        # still times the round of polling it took).
        report.transfers.append(
            Transfer(job.to_host, entry.kv_len * self.bytes_per_token, elapsed, link))
        if job.fails and not entry.dropped:
            self._fail(job, entry, report)
            return
        (report.finished_out if job.to_host else report.finished_in).append(job.req_id)
        if entry.dropped:
            report.cancelled.add(job.req_id)
            del self._entries[job.req_id]
            self.pages.free(entry.host_slots)
        elif job.to_host:
            entry.state = TierState.ON_HOST
        else:
            self._keep_or_free(job.req_id, entry)

    def _fail(self, job: _Job, entry: HostEntry, report: TierReport) -> None:
        """A rotation copy failed. Out: the device KV was never released, so the request goes
        on from there (its host copy, kept part included, is dropped). In: the host copy may
        be fine but the device KV is not; the adapter discards it and fails the request."""
        del self._entries[job.req_id]
        self.pages.free(entry.host_slots)
        if job.to_host:
            report.failed_out.append(job.req_id)
            self.stats.copies_failed_d2h += 1
        else:
            report.failed_in.append(job.req_id)
            self.stats.copies_failed_h2d += 1

    def _keep_or_free(self, req_id: str, entry: HostEntry) -> None:
        """Back on the device: keep the copy's whole pages (if asked), free the rest."""
        del self._entries[req_id]
        page = self.pages.page_size
        kept = entry.kv_len // page * page if self.keep_copies else 0
        if entry.host_slots.numel() > kept:
            self.pages.free(entry.host_slots[kept:])
        if kept:  # re-inserted: the newest copy is evicted last
            self._entries[req_id] = HostEntry(TierState.KEPT, entry.host_slots[:kept], kept,
                                              version=next(self._ids))

    def _extend(self, job: _Job) -> None:
        """A write-through landed: extend its kept copy if that is still the same, else free."""
        entry = self._entries.get(job.req_id)
        if (entry is None or entry.state is not TierState.KEPT or entry.version != job.version
                or entry.host_slots.numel() != job.base_len):
            self.pages.free(job.host_slots)
            return
        entry.host_slots = torch.cat([entry.host_slots, job.host_slots])
        entry.kv_len = int(entry.host_slots.numel())

    # --- internals ------------------------------------------------------------------------
    def _job(self, req_id: str, to_host: bool, **kw: object) -> str:
        kind = "wt" if kw.get("write_through") else "d2h" if to_host else "h2d"
        job_id = f"{kind}:{next(self._ids)}"
        job = self._jobs[job_id] = _Job(req_id, to_host, **kw)  # type: ignore[arg-type]
        if not job.write_through:
            self._num_copies[to_host] += 1
            job.fails = self._num_copies[to_host] in self._fail_copies.get(to_host, ())
        self._order[to_host].append(job_id)
        return job_id

    def _anchor(self, req_id: str) -> HostEntry:
        entry = self._entries.get(req_id)
        if entry is None:
            entry = HostEntry(TierState.KEPT, _EMPTY, 0, version=next(self._ids))
            self._entries[req_id] = entry
        return entry

    def _alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Host slots for ``num_tokens``, evicting kept copies (oldest first) while short."""
        slots = self.pages.alloc(num_tokens)
        while slots is None:
            victim = next((r for r, e in self._entries.items() if e.state is TierState.KEPT), None)
            if victim is None:
                return None
            entry = self._entries.pop(victim)
            self.pages.free(entry.host_slots)
            self.stats.host_copies_evicted += entry.host_slots.numel() > 0
            slots = self.pages.alloc(num_tokens)
        return slots

    def check(self) -> None:
        """Raise AssertionError unless every used host page has exactly one owner (an entry or
        a write-through in flight) and every owned page is in use. For tests and idle checks."""
        self.pages.check_integrity()
        owned = [e.host_slots for e in self._entries.values()]
        owned += [j.host_slots for j in self._jobs.values() if j.write_through]
        page = self.pages.page_size
        per_owner = [torch.unique(s // page) for s in owned if s.numel()]
        pages = torch.cat(per_owner) if per_owner else _EMPTY
        if pages.numel() != torch.unique(pages).numel():
            raise AssertionError("a host page has two owners")
        used = self.pages.used_pages()
        if not torch.equal(torch.sort(pages).values, used):
            raise AssertionError(f"host pages owned ({pages.numel()}) and in use ({used.numel()}) "
                                 "differ: a leak or a double owner")
