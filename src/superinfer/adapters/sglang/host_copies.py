"""Kept host copies (``--rota-keep-host-copy``): the rotator's bookkeeping of KV that is still
valid on the host after a request came back to the device.

KV is never rewritten once written, so after a rotate-in the host copy of a request's whole
host pages stays true while the request decodes on; its next rotate-out copies only what was
written since. Copies live in the host tier's free space: the oldest go first when a rotate-out
needs room, and a copy goes when its request finishes, leaves the table or is retracted by
SGLang (whose recompute would make it stale). The policy learns each copy's size through
``RequestTable.set_host_tokens`` and prices a victim's copy-out by the tail alone.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...host_tier.pool import HostKVPool
from ...policy.table import RequestTable
from .metrics import RotationStats

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req


@dataclass(slots=True)
class HostCopy:
    """The first ``host_slots.numel()`` KV tokens (whole host pages) of a running request."""

    req: Req
    host_slots: torch.Tensor


class HostCopies:
    """Kept copies by request id, oldest first; the host pool and the table stay in step."""

    def __init__(self, host: HostKVPool, table: RequestTable, stats: RotationStats) -> None:
        self.host, self.table, self.stats = host, table, stats
        self._copies: OrderedDict[str, HostCopy] = OrderedDict()

    def __len__(self) -> int:
        return len(self._copies)

    def __contains__(self, rid: str) -> bool:
        return rid in self._copies

    def tokens(self) -> int:
        """Host tokens the copies hold: room the host tier can make by evicting them."""
        return sum(int(c.host_slots.numel()) for c in self._copies.values())

    def size_of(self, rid: str) -> int:
        copy = self._copies.get(rid)
        return 0 if copy is None else int(copy.host_slots.numel())

    def keep_or_free(self, req: Req, host_slots: torch.Tensor, kv_len: int, keep: bool) -> None:
        """``req`` is back on the device with its KV in ``host_slots``: keep its whole host
        pages (``keep``), free the rest (a partial last page, or everything)."""
        page = self.host.page_size
        kept = kv_len // page * page if keep else 0
        if kept:
            self._copies[req.rid] = HostCopy(req, host_slots[:kept])
            self.table.set_host_tokens(req.rid, kept)
        if host_slots.numel() > kept:
            self.host.free(host_slots[kept:])

    def take(self, rid: str, kv_len: int) -> torch.Tensor:
        """The host slots of ``rid``'s copy, which leaves the kept set (empty if none)."""
        copy = self._copies.pop(rid, None)
        if copy is None:
            return torch.empty(0, dtype=torch.int64)
        if copy.host_slots.numel() > kv_len:  # cannot happen while KV only grows; never trust it
            self._free(rid, copy)
            return torch.empty(0, dtype=torch.int64)
        self.table.set_host_tokens(rid, 0)
        return copy.host_slots

    def put_back(self, req: Req, host_slots: torch.Tensor) -> None:
        """Undo ``take`` (the rotate-out did not happen)."""
        if host_slots.numel():
            self._copies[req.rid] = HostCopy(req, host_slots)
            self.table.set_host_tokens(req.rid, int(host_slots.numel()))

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Host slots for ``num_tokens``, evicting copies (oldest first) while short."""
        slots = self.host.alloc(num_tokens)
        while slots is None and self._copies:
            rid, copy = self._copies.popitem(last=False)
            self._free(rid, copy)
            self.stats.host_copies_evicted += copy.host_slots.numel() > 0
            slots = self.host.alloc(num_tokens)
        return slots

    def anchor(self, req: Req) -> HostCopy:
        """``req``'s kept copy, an empty one if it has none: what a write-through extends."""
        copy = self._copies.get(req.rid)
        if copy is None:
            copy = self._copies[req.rid] = HostCopy(req, torch.empty(0, dtype=torch.int64))
        return copy

    def extend(self, req: Req, base: HostCopy, base_len: int, host_slots: torch.Tensor) -> bool:
        """Append pages copied after ``base``'s first ``base_len`` tokens, if ``base`` is still
        ``req``'s copy and unchanged; False (nothing attached) otherwise."""
        copy = self._copies.get(req.rid)
        if copy is not base or copy.host_slots.numel() != base_len or req.finished():
            return False
        copy.host_slots = torch.cat([copy.host_slots, host_slots])
        self.table.set_host_tokens(req.rid, int(copy.host_slots.numel()))
        return True

    def drop(self, rid: str) -> None:
        copy = self._copies.pop(rid, None)
        if copy is not None:
            self._free(rid, copy)

    def drop_stale(self) -> None:
        """Copies of requests that finished (or left the table) are of no further use."""
        for rid in [r for r, c in self._copies.items() if c.req.finished() or r not in self.table]:
            self._free(rid, self._copies.pop(rid))

    def _free(self, rid: str, copy: HostCopy) -> None:
        self.host.free(copy.host_slots)
        if rid in self.table:
            self.table.set_host_tokens(rid, 0)
