"""Write-through (``--rota-write-through``): while the device->host link is idle, copy the full
pages of running requests to the host in the background, so a later rotate-out moves only the
pages written since. The copies extend the kept host copies (``host_copies.py``) and share
their rules: evicted first for room, dropped with their request.

Only when nothing else moves out (no rotate-out planned or in flight), within one step's share
of the link (the same ``--rota-link-share`` that bounds rotations, since every copy costs the
decode step), and only into the free half of the host tier: rotations come first.

A copy in flight belongs to the kept copy it extends (the same object): if that copy is taken
by a rotate-out, dropped or replaced meanwhile, the finished pages are freed, not attached.
Write-through jobs share the device->host queue with rotate-outs, so a rotate-out planned while
one is in flight starts behind it: at most one step's share of the link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...host_tier.interface import KVMover
from ...host_tier.pool import HostKVPool
from ...policy import Phase
from ...policy.table import RequestTable
from .host_copies import HostCopies, HostCopy
from .kv_ops import SglangKV
from .metrics import RotationStats

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

JOB_PREFIX = "wt:"  # job ids of write-through copies; rotation jobs use the request id


@dataclass(slots=True)
class _InFlight:
    req: Req
    base: HostCopy  # the kept copy these pages extend
    base_len: int
    host_slots: torch.Tensor


class WriteThrough:
    def __init__(self, copies: HostCopies, host: HostKVPool, mover: KVMover, kv: SglangKV,
                 table: RequestTable, stats: RotationStats) -> None:
        self.copies, self.host, self.mover, self.kv = copies, host, mover, kv
        self.table, self.stats = table, stats
        self._inflight: dict[str, _InFlight] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._inflight)

    def owns(self, job_id: str) -> bool:
        return job_id.startswith(JOB_PREFIX)

    def held_tokens(self) -> int:
        return sum(int(f.host_slots.numel()) for f in self._inflight.values())

    def start(self, reqs: list[Req], budget_tokens: int, ready: object | None) -> None:
        """Copy up to ``budget_tokens`` of the running requests' unsaved full pages, the
        requests with the most first (the first one even past the budget, as the policy lets
        its first victim go: the link is idle); none while a copy of this kind is in flight."""
        if self._inflight:
            return
        page = self.host.page_size
        room = self.host.available_size() - self.host.size // 2
        wants = []
        for req in reqs:
            rid = req.rid
            if req.finished() or rid not in self.table or self.table.phase_of(rid) is not Phase.RUNNING:
                continue
            have = self.copies.size_of(rid)
            full = self.kv.kv_len(req) // page * page
            if full - have >= page:
                wants.append((full - have, req, have, full))
        wants.sort(key=lambda w: (-w[0], w[1].rid))
        first = True
        for want, req, have, full in wants:
            if want > room or (want > budget_tokens and not first):
                continue
            first = False
            slots = self.host.alloc(want)
            if slots is None:
                break
            base = self.copies.anchor(req)
            job_id = f"{JOB_PREFIX}{self._seq}"
            self._seq += 1
            self.mover.submit_d2h(job_id, self.kv.device_slots(req)[have:full], slots, ready)
            self._inflight[job_id] = _InFlight(req, base, have, slots)
            budget_tokens, room = budget_tokens - want, room - want
            self.stats.bytes_written_through += want * self.host.bytes_per_token

    def done(self, job_id: str) -> None:
        """A copy landed: extend its kept copy if that is still the same, else free the pages."""
        f = self._inflight.pop(job_id)
        if not self.copies.extend(f.req, f.base, f.base_len, f.host_slots):
            self.host.free(f.host_slots)
