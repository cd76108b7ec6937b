"""Feeds policy.binding's monitor from SGLang's scheduler and logs its ``binding`` record.

Runs inside every rotasched scheduler (whose plans also say when the head needed room), and
under any other ``--schedule-policy`` with ``--rota-monitor``, so a baseline's run says which
resource bound it, measured the same way.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ...policy.binding import BindingMonitor, wait_reason
from . import compat
from .stats import format_record

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger("superinfer")
RECORD_EVERY_S = 5.0


class BindingProbe:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.monitor = BindingMonitor()
        self._ranks = compat.scheduler_ranks(scheduler)
        self._next_record_s: float | None = None

    def launched(self, batch: ScheduleBatch | None, now_s: float | None = None,
                 room_needed: bool | None = None) -> None:
        """SGLang chose ``batch`` (None: nothing) to run next. ``room_needed``: a rotation
        policy's word on whether its head waited for room (None: SGLang's own rule, under which
        requests that wait while no prefill runs wait for room)."""
        now_s = time.monotonic() if now_s is None else now_s
        s = self.scheduler
        if batch is None or not batch.reqs:
            gpu = "idle"
        else:
            gpu = "prefill" if batch.forward_mode.is_extend() else "decode"
        wait = wait_reason(gpu, bool(s.waiting_queue), room_needed)
        if gpu == "idle" and wait is None and self.monitor.paused:
            return  # idle since the last record: the scheduler's idle loop charges nothing
        self.monitor.observe(now_s, gpu, wait, self._kv_used())
        if self._next_record_s is None:
            self._next_record_s = now_s + RECORD_EVERY_S
        elif now_s >= self._next_record_s:
            self.record()
            self._next_record_s = now_s + RECORD_EVERY_S

    def idle(self, now_s: float | None = None) -> None:
        """The scheduler went idle: log what the busy period left unlogged, charge nothing
        until the next batch."""
        self.monitor.pause(time.monotonic() if now_s is None else now_s)
        self.record()
        self._next_record_s = None

    def record(self) -> None:
        window = self.monitor.take_window()
        if window.total_s > 0:
            logger.info(format_record("binding", *self._ranks,
                                      {"wall_s": round(time.time(), 3), **window.as_dict()}))

    def bound(self) -> str:
        """What bound over the last ``tau_s`` seconds or so (policy.binding)."""
        return self.monitor.recent_bound()

    def _kv_used(self) -> float:
        s = self.scheduler
        total = s.max_total_num_tokens
        free = s.token_to_kv_pool_allocator.available_size() + s.tree_cache.evictable_size()
        return max(total - free, 0) / total if total else 0.0
