"""Holds SGLang's prefill to the plan: the queue order, which requests it may see, and how
many prompt tokens its next batch may take."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ...policy import Policy, StepPlan
from . import compat

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler


class PrefillPacer:
    def __init__(self, scheduler: Scheduler, policy: Policy, min_prefill_chunk: int) -> None:
        self.scheduler, self.policy = scheduler, policy
        self.min_prefill_chunk = min_prefill_chunk
        self.page_size = scheduler.page_size
        self.prefill_budget: int | None = None  # the last plan's; see paced_prefill
        self.admitted: list[str] = []  # the last plan's admissions, in order

    def follow(self, plan: StepPlan | None) -> None:
        """Take this step's plan (None: no plan, SGLang builds the batch its own way)."""
        self.prefill_budget = None if plan is None else plan.prefill_token_budget
        self.admitted = [] if plan is None else list(plan.admit)
        if self.admitted:
            self._reorder_waiting(self.admitted)

    def batch_token_limit(self) -> int:
        """The most prompt tokens one prefill batch takes without cutting a request: SGLang's
        prefill limit, and its chunk size when chunked prefill is on."""
        s = self.scheduler
        chunk = s.chunked_prefill_size
        return min(s.max_prefill_tokens, chunk) if chunk and chunk > 0 else s.max_prefill_tokens

    def chunked_remainder(self) -> int:
        """Prompt tokens the request in chunked prefill still has to allocate. SGLang counts
        on them: a chunk continues even with no free memory left (it would raise 'Out of
        memory' in alloc_for_extend), so rotate-ins and the plan must leave them free."""
        req = self.scheduler.chunked_req
        if req is None:
            return 0
        return max(len(req.origin_input_ids) - compat.kv_allocated_len(req), 0)

    @contextmanager
    def paced_prefill(self, streams_decoding: bool) -> Iterator[None]:
        """While SGLang builds this step's batch, hold its prefill to the plan: only the
        requests the plan admitted are in the waiting queue, under a prefill limit no larger
        than the budget; none at all (decode first) when a decoding stream has no slack left
        (``streams_decoding``: there is a decode step to run instead, counting the requests
        SGLang merges from the last prefill batch while it builds this one).

        Why hide the rest: with chunked prefill on, SGLang's PrefillAdder adds requests while
        any of its token limit remains and cuts the last one at the chunk size, and the cut
        request's next chunk runs in the next batch whatever the limit then, stalling every
        stream that just got its first token. The chunk size is left alone: small chunks only
        stretch the stall."""
        s, budget = self.scheduler, self.prefill_budget
        saved_limit, queue = s.max_prefill_tokens, s.waiting_queue
        if budget == 0 and streams_decoding:
            s.waiting_queue = []
        elif self.admitted:
            # A request the policy does not know (queued by a path no hook sees) stays
            # visible: the plan can never admit it, so hiding it would starve it.
            chosen, policy = set(self.admitted), self.policy
            s.waiting_queue = [r for r in queue if r.rid in chosen or r.rid not in policy]
        # Identities, not the list: SGLang appends to the visible list while it builds.
        shown = {id(r) for r in s.waiting_queue} if len(s.waiting_queue) < len(queue) else None
        if budget is not None:
            page = self.page_size
            limit = max(self.min_prefill_chunk, budget) // page * page
            s.max_prefill_tokens = min(s.max_prefill_tokens, max(limit, page))
        try:
            yield
        finally:
            s.max_prefill_tokens = saved_limit
            if shown is not None:  # hidden ones back behind what was shown and not taken
                after = s.waiting_queue
                s.waiting_queue = ([r for r in after if id(r) in shown]
                                   + [r for r in queue if id(r) not in shown]
                                   + [r for r in after if id(r) not in shown])

    def _reorder_waiting(self, front: list[str]) -> None:
        queue = self.scheduler.waiting_queue
        if [r.rid for r in queue[: len(front)]] == front:
            return
        by_rid = {r.rid: r for r in queue}
        head = [by_rid[rid] for rid in front if rid in by_rid]
        chosen = {id(r) for r in head}
        self.scheduler.waiting_queue = head + [r for r in queue if id(r) not in chosen]


def joins_running(last_batch: Any, chunked_req: Any) -> bool:
    """Whether SGLang merges requests of ``last_batch`` into the running batch when its next
    ``get_next_batch_to_run`` starts (after a hook on it has seen the running batch): those of
    a prefill batch, but not a prompt cut mid-way (``chunked_req``, the batch's or the
    scheduler's), which stays out until its last chunk."""
    mode = getattr(last_batch, "forward_mode", None)  # None: no batch, or one never built
    if mode is None or not mode.is_extend():
        return False
    cut = {id(chunked_req), id(getattr(last_batch, "chunked_req", None))}
    return any(id(r) not in cut and not r.finished() for r in last_batch.reqs)
