"""What SGLang's scheduler did, as policy events (superinfer.policy.events): arrivals (and
SGLang's own retractions), prefill progress, decode steps, finishes. No decisions, no writes:
the rotator hands the events to the policy (and finishes to the host tier)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ...config import RequestSlo
from ...policy import Phase, Policy
from ...policy import events as ev
from . import compat

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch


def enqueued(req: Req, now_s: float, slo: RequestSlo, policy: Policy) -> ev.Arrived | ev.Requeued:
    """A request entered SGLang's waiting queue: new, or known (SGLang retracted it, and it
    must prefill its prompt plus output again)."""
    num_out = len(req.output_ids)
    if req.rid in policy:
        return ev.Requeued(req.rid, now_s, len(req.origin_input_ids) + num_out, num_out)
    params = req.sampling_params
    return ev.Arrived(req.rid, now_s, len(req.origin_input_ids), slo.ttft_s, slo.tbt_s,
                      params.max_new_tokens or ev.NO_LIMIT, bool(params.ignore_eos))


def launched(batch: ScheduleBatch, chunked_req: Req | None, now_s: float, done_at_s: float,
             policy: Policy) -> list[ev.Event]:
    """SGLang launched ``batch`` (done at about ``done_at_s``): its prefills are under way,
    and those on their prompt's last chunk will have their first token then."""
    if not batch.forward_mode.is_extend():
        return []
    return [ev.PrefillLaunched(r.rid, now_s, None if r is chunked_req else done_at_s)
            for r in batch.reqs if policy.phase_of(r.rid) in (Phase.WAITING, Phase.PREFILLING)]


def in_flight(batches: Iterable[ScheduleBatch], chunked_req: Req | None,
              policy: Policy) -> ev.InFlight:
    """The tokens on their way: one per request of every launched batch whose result is not
    processed yet (a prefill's first token unless its prompt was cut)."""
    counts: dict[str, int] = {}
    for batch in batches:
        decode = batch.forward_mode.is_decode()
        if not (decode or batch.forward_mode.is_extend()):
            continue
        for req in batch.reqs:
            if req.rid in policy and (decode or req is not chunked_req):
                counts[req.rid] = counts.get(req.rid, 0) + 1
    return ev.InFlight(counts)


# Phases of a request past its prefill: in a batch, it decoded a token
_DECODING = (Phase.RUNNING, Phase.ROTATING_OUT, Phase.ON_HOST, Phase.ROTATING_IN)


def decoded(batch: ScheduleBatch, policy: Policy) -> list[ev.Event]:
    """Every unfinished request of the batch produced a token (rotating-out ones too: the
    step was in flight when they left); finished running ones are gone."""
    return _decode_events([r for r in batch.reqs if r.rid in policy], policy)


def decode_kv_tokens(batch: ScheduleBatch) -> int:
    """KV tokens a decode batch reads: SGLang's host-side ``seq_lens_sum`` where it keeps one
    (0.5.17's ``prepare_for_decode`` clears it: then the requests' lengths; never the device
    tensor, reading it would wait for the GPU)."""
    total = getattr(batch, "seq_lens_sum", None)
    if total is not None:
        return int(total)
    return sum(len(r.origin_input_ids) + len(r.output_ids) for r in batch.reqs)


def _decode_events(reqs: list[Req], policy: Policy) -> list[ev.Event]:
    stepped: list[str] = []
    events: list[ev.Event] = []
    for r in reqs:
        if not r.finished():
            stepped.append(r.rid)
        elif policy.phase_of(r.rid) is Phase.RUNNING:
            events.append(ev.Finished(r.rid))
    if stepped:
        events.append(ev.Decoded(tuple(stepped)))
    return events


def extended(batch: ScheduleBatch, chunked_req: Req | None, now_s: float,
             policy: Policy) -> list[ev.Event]:
    """A prefill (chunk) ran: its first token starts the request's TBT pace, unless its
    prompt was cut (``chunked_req``) and more chunks follow. With ``--enable-mixed-chunk``
    the batch also carries one decode token of each running stream (SGLang's
    ``mix_with_running``): those count as a decode step."""
    events: list[ev.Event] = []
    mixed: list[Req] = []
    for req in batch.reqs:
        phase = policy.phase_of(req.rid)
        if phase is None:
            continue
        if phase in _DECODING:
            mixed.append(req)
        elif req.finished():
            events.append(ev.Finished(req.rid))
        elif req is chunked_req:
            events.append(ev.PrefillChunked(req.rid, now_s))
        else:
            events.append(ev.PrefillDone(req.rid, now_s, compat.kv_committed_len(req),
                                         len(req.output_ids)))
    return events + _decode_events(mixed, policy)


def aborted_waiting(hit: Callable[[str], bool], waiting_rids: set[str],
                    policy: Policy) -> list[ev.Event]:
    """Aborted while waiting: SGLang dropped them from its queue."""
    return [ev.Finished(rid) for rid in policy.ids_in(Phase.WAITING)
            if hit(rid) and rid not in waiting_rids]


def gone(live_rids: set[str], policy: Policy) -> list[ev.Event]:
    """Requests SGLang finished through paths nobody hooks (timeouts...)."""
    return [ev.Finished(rid) for rid in policy.table.all_ids() if rid not in live_rids]
