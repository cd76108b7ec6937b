"""Keeps the policy's request table true to what SGLang's scheduler did: arrivals (and
SGLang's own retractions), prefill progress, decode steps, finishes. No decisions here."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ...config import RotaConfig, parse_slo_override
from ...policy import Phase, RequestTable

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch

_NO_LIMIT = 1 << 20  # max_new_tokens of a request that set none


class RequestTracker:
    def __init__(self, table: RequestTable, config: RotaConfig) -> None:
        self.table = table
        self.config = config

    def on_enqueue(self, req: Req, now_s: float) -> bool:
        """A request entered SGLang's waiting queue. Returns True for a new arrival; a known
        request is one SGLang retracted, and must prefill its prompt plus output again."""
        t, rid = self.table, req.rid
        if rid in t:
            if t.phase_of(rid) is not Phase.WAITING:
                t.set_phase(rid, Phase.WAITING, now_s)
            t.set_counts(rid, 0, len(req.output_ids))
            t.set_prompt_tokens(rid, len(req.origin_input_ids) + len(req.output_ids))
            return False
        ttft, tbt = parse_slo_override(req.sampling_params.custom_params)
        t.add(rid, now_s, len(req.origin_input_ids), ttft or self.config.ttft_slo_s,
              tbt or self.config.tbt_slo_s, req.sampling_params.max_new_tokens or _NO_LIMIT)
        return True

    def on_launch(self, batch: ScheduleBatch, chunked_req: Req | None, now_s: float,
                  done_at_s: float) -> None:
        """SGLang launched ``batch`` (done at about ``done_at_s``): its prefills are under
        way, and those on their prompt's last chunk will have their first token then."""
        if not batch.forward_mode.is_extend():
            return
        t = self.table
        for req in batch.reqs:
            if req.rid in t and t.phase_of(req.rid) in (Phase.WAITING, Phase.PREFILLING):
                t.prefill_launched(req.rid, now_s, None if req is chunked_req else done_at_s)

    def in_flight(self, batches: Iterable[ScheduleBatch], chunked_req: Req | None) -> None:
        """Count the tokens on their way: one per request of every launched batch whose result
        is not processed yet (a prefill's first token unless its prompt was cut)."""
        t, counts = self.table, {}
        for batch in batches:
            decode = batch.forward_mode.is_decode()
            if not (decode or batch.forward_mode.is_extend()):
                continue
            for req in batch.reqs:
                if req.rid in t and (decode or req is not chunked_req):
                    counts[req.rid] = counts.get(req.rid, 0) + 1
        t.set_in_flight(counts)

    def on_decode(self, batch: ScheduleBatch) -> None:
        """Every unfinished request of the batch produced a token (rotating-out ones too: the
        step was in flight when they left); finished running ones are gone."""
        t, stepped = self.table, []
        for req in batch.reqs:
            if req.rid not in t:
                continue
            if not req.finished():
                stepped.append(req.rid)
            elif t.phase_of(req.rid) is Phase.RUNNING:
                t.remove(req.rid)
        if stepped:
            t.advance(stepped)

    def on_extend(self, batch: ScheduleBatch, chunked_req: Req | None, now_s: float) -> None:
        """A prefill (chunk) ran: its first token starts the request's TBT pace, unless its
        prompt was cut (``chunked_req``) and more chunks follow."""
        t = self.table
        for req in batch.reqs:
            rid = req.rid
            if rid not in t or t.phase_of(rid) is Phase.RUNNING:
                continue
            if req.finished():
                t.remove(rid)
            elif req is chunked_req:
                if t.phase_of(rid) is Phase.WAITING:
                    t.set_phase(rid, Phase.PREFILLING, now_s)
            else:
                t.prefill_done(rid, req.kv_committed_len, now_s)
                t.set_counts(rid, req.kv_committed_len, len(req.output_ids))

    def forget_waiting(self, hit: Callable[[str], bool], waiting_rids: set[str]) -> None:
        """Aborted while waiting: SGLang dropped them from its queue."""
        for rid in self.table.ids(self.table.slots_in(Phase.WAITING)):
            if hit(rid) and rid not in waiting_rids:
                self.table.remove(rid)

    def reconcile(self, live_rids: Iterable[str]) -> None:
        """Forget requests SGLang finished through paths nobody hooks (timeouts...)."""
        live = set(live_rids)
        for rid in self.table.all_ids():
            if rid not in live:
                self.table.remove(rid)
