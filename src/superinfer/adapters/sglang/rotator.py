"""Drives rotation inside one SGLang scheduler process, once per iteration: collect finished
copies, agree across TP ranks, plan, act. Who decides is the policy (superinfer.policy); who
owns host pages and moves bytes is the host tier (superinfer.host_tier); this module only
translates between them and SGLang.

Lifecycle of a rotated request (phases of ``superinfer.policy.Phase``)::

    RUNNING --out--> ROTATING_OUT --d2h done: release device--> ON_HOST
    ON_HOST --in: alloc + h2d--> ROTATING_IN --h2d done: merge as decode--> RUNNING

Device slots are freed only after the device->host copy completes, and that copy waits on an
event recorded on the forward stream, so the KV written by the forward in flight is included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from ...config import RequestSlo, RotaConfig
from ...env import test_fail_copies
from ...host_tier.factory import build_host_tier
from ...host_tier.manager import TierState
from ...policy import Capacity, CostModel, StepSnapshot, TierReport, create_policy
from ...policy import events as ev
from ...policy.deadlines import link_tokens
from . import batch_surgery, compat, translate
from .binding_probe import BindingProbe
from .decode_profile import served_decode_profile
from .kv_ops import SglangKV, device_planes
from .metrics import RotationMetrics
from .pacing import PrefillPacer, joins_running
from .placement import tier_placement
from .stats import RotationStats, cost_fields, format_record
from .tp_sync import TpAgreement

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger("superinfer")
_RECONCILE_EVERY = 512  # iterations between policy/scheduler consistency sweeps
_REPORT_EVERY_S = 5.0  # seconds between stats records / metric updates


class Rotator:
    def __init__(self, scheduler: Scheduler, config: RotaConfig,
                 tp: TpAgreement | None = None) -> None:
        self.scheduler, self.config = scheduler, config
        self.kv = SglangKV(scheduler)
        self.policy = create_policy(config)
        self.stats = RotationStats()
        planes = device_planes(scheduler.token_to_kv_pool_allocator.get_kvcache())
        on_gpu = planes[0][0].is_cuda
        decode_profile = served_decode_profile(scheduler, config, on_gpu)
        self.costs = CostModel(decode_profile=decode_profile and decode_profile.profile)
        self.placement = tier_placement(scheduler.server_args,
                                        compat.scheduler_gpu_id(scheduler) if on_gpu else None,
                                        config.host_numa_node)
        self.tier, self.tier_spec = build_host_tier(
            planes, self.kv.page_size, config.host_kv_gb, config.mover,
            config.keep_host_copy, self.placement.numa_node,
            ranks_on_host=self.placement.ranks_on_host,
            ranks_on_node=self.placement.ranks_on_node, fail_copies=test_fail_copies())
        self.pacer = PrefillPacer(scheduler, self.policy, config.min_prefill_chunk)
        self.binding = BindingProbe(scheduler)
        self._room_needed = False  # the last plan's EDF head waited for room
        self.streams_decoding = False  # this step has a decode step to run (see step)
        group = scheduler.tp_cpu_group if scheduler.server_args.tp_size > 1 else None
        self.tp = tp if tp is not None else TpAgreement(group)
        self.away: dict[str, Req] = {}  # SGLang's objects of the requests the tier holds away
        self.now_s = 0.0
        self._iteration = 0
        self._next_report_s = 0.0
        self._idle_checked = False
        self._ranks = compat.scheduler_ranks(scheduler)
        self.metrics = RotationMetrics(bool(scheduler.server_args.enable_metrics), *self._ranks)
        self.initial_host_tokens = self.tier.pages.available_size()
        self.times_rotated: dict[str, int] = {}  # rid -> rotate-outs, over the current busy period
        self._last_decode_launch: float | None = None
        self._last_decode_shape = (0, 0)  # (streams, KV tokens) of the last decode batch
        self._launched_done_at_s = 0.0  # when the last launched batch should be done
        spec = self.tier_spec
        self._record("start", policy=config.policy, host_kv_gb=config.host_kv_gb,
                     host_tokens=spec.host_tokens, host_page=spec.host_page, mover=spec.mover,
                     path=spec.path, numa_node=self.placement.numa_node,
                     ranks_on_host=self.placement.ranks_on_host,
                     decode_profile=decode_profile.source if decode_profile else "none")

    # --- the per-iteration step -----------------------------------------------------------
    def step(self, running: ScheduleBatch, last_batch: ScheduleBatch | None = None
             ) -> ScheduleBatch:
        """Before SGLang builds the next batch: finish transfers, plan, act. ``last_batch``:
        SGLang's previous batch, whose prefilled requests it merges into ``running`` only
        after this step (they decode next unless another prefill comes first)."""
        started = time.perf_counter()
        running = self._step(running, last_batch)
        spent_us = int((time.perf_counter() - started) * 1e6)
        self.stats.steps += 1
        self.stats.step_us += spent_us
        self.stats.step_us_max = max(self.stats.step_us_max, spent_us)
        return running

    def _step(self, running: ScheduleBatch, last_batch: ScheduleBatch | None) -> ScheduleBatch:
        self._iteration += 1
        running = self._collect(running)
        self.pacer.follow(None)
        joining = joins_running(last_batch, self.scheduler.chunked_req)
        self.streams_decoding = joining or not running.is_empty()  # unless all rotate out
        if len(self.policy):
            self._idle_checked = False
        if self._iteration % _RECONCILE_EVERY == 0:
            self._reconcile(running.reqs)
        if self.now_s >= self._next_report_s:
            self._report()
        if len(self.policy) == 0:
            return running
        s = self.scheduler
        device_free = self.kv.allocator.available_size() + self.kv.tree_cache.evictable_size()
        cap = Capacity(
            available_device_tokens=device_free - self.pacer.chunked_remainder(),
            total_device_tokens=s.max_total_num_tokens,
            free_host_tokens=self.tier.free_tokens(),
            bytes_per_token=self.tier_spec.bytes_per_token,
            new_token_ratio=s.new_token_ratio_tracker.current,
            fixed_length_ratio=compat.fixed_length_reservation_ratio(),
        )
        # Overlap scheduling: the last batch's result is processed after this plan.
        unprocessed = [b for b, _ in getattr(s, "result_queue", ())]
        self._apply([translate.in_flight(unprocessed, s.chunked_req, self.policy)])
        costs = self.costs.costs()
        plan = self.policy.plan(StepSnapshot(self.now_s, cap, costs, self.pacer.batch_token_limit(),
                                             self._launched_done_at_s if unprocessed else None,
                                             self.binding.bound()))
        self._room_needed = plan.room_needed
        if plan.rotate_out:
            running = self.rotate_out(running, set(plan.rotate_out))
            self.streams_decoding = joining or not running.is_empty()
        # prefill held back for a decode step (counted as eval.sim_policy counts it: requests
        # waiting, streams decoding, no chunked prompt that SGLang continues anyway)
        self.stats.plans_decode_first += (plan.prefill_token_budget == 0 and bool(s.waiting_queue)
                                          and self.streams_decoding and s.chunked_req is None)
        self.stats.plans_head_blocked += plan.head_blocked
        self.stats.count_blocked(plan.held_by)
        self.stats.plans_host_full += plan.host_full
        for rid in plan.rotate_in:
            self.rotate_in(rid)
        self.pacer.follow(plan)
        if self.config.write_through and not plan.rotate_out and not self._moving_out():
            budget = link_tokens(self.config.link_share, costs.d2h_bytes_per_s, costs.decode_step_s,
                                 self.tier_spec.bytes_per_token)
            resident = [(r.rid, self.kv.kv_len(r)) for r in running.reqs
                        if not r.finished() and r.rid in self.policy]
            self.tier.write_through(resident, self._device_slots(running), budget,
                                    self._forward_event())
        return running

    def _apply(self, events: Iterable[ev.Event]) -> None:
        """Events to the policy; a finished request's host state (a kept copy) goes too."""
        events = list(events)
        self.policy.update(events)
        for e in events:
            if isinstance(e, ev.Finished):
                self.tier.drop(e.req_id)

    # --- transfers finishing --------------------------------------------------------------
    def _collect(self, running: ScheduleBatch) -> ScheduleBatch:
        """Copies done on every TP rank move their requests on (a copy counts as done only
        once each rank, moving its own KV shard, is done with it)."""
        local_d2h, local_h2d = self.tier.collect()
        agreed = self.tp.agree(time.monotonic(), self.costs, local_d2h, local_h2d)
        self.now_s, self.costs = agreed.now_s, agreed.costs
        report = self.tier.poll(self.now_s, agreed.done_d2h, agreed.done_h2d)
        for t in report.transfers:
            self.costs.observe_transfer(t)
        events: list[ev.Event] = [report]
        for rid in report.finished_out:
            req = self.away[rid]
            finished, cancelled = req.finished(), rid in report.cancelled
            if not finished:  # finished by the step in flight: SGLang released it already
                self.kv.release(req)
            if finished or cancelled:
                del self.away[rid]
                events.append(ev.Finished(rid))
                if cancelled and not finished:
                    self._tell_aborted(req)
        ready = [self.away.pop(rid) for rid in report.finished_in]
        for req in ready:
            if req.rid in report.cancelled:
                from sglang.srt.managers.schedule_batch import FINISH_ABORT

                req.to_finish = FINISH_ABORT()  # one more decode step, then SGLang cleans up
        ready += self._copies_failed(report, events)
        self._apply(events)
        if not ready:
            return running
        self.tier.mover.fence_compute(self._forward_stream())
        return batch_surgery.rejoin(self.scheduler, running, ready)

    def _copies_failed(self, report: TierReport, events: list[ev.Event]) -> list[Req]:
        """A failed rotate-out leaves the request's device KV in place: it goes on decoding
        (returned, to rejoin the batch). A failed rotate-in leaves it unusable: it is
        discarded (never cached) and the request fails with an error the client sees."""
        resume = []
        for rid in report.failed_out:
            req = self.away.pop(rid)
            logger.warning("rotasched: rotate-out copy of %s failed; it stays on the device", rid)
            if req.finished():  # finished by the step in flight: SGLang released it already
                events.append(ev.Finished(rid))
            else:
                resume.append(req)
        for rid in report.failed_in:
            req = self.away.pop(rid)
            logger.error("rotasched: rotate-in copy of %s failed; the request fails", rid)
            self.kv.discard(req)
            events.append(ev.Finished(rid))
            self._tell_aborted(req, "rotasched: restoring this request's KV cache from host "
                                    "memory failed", status_code=500)
        return resume

    # --- acting on a plan -----------------------------------------------------------------
    def rotate_out(self, running: ScheduleBatch, victims: set[str]) -> ScheduleBatch:
        """Start moving ``victims`` (running decode requests) to the host; returns the batch
        without them. Their device KV stays allocated until the copy is done."""
        keep, chosen = [], []
        for i, req in enumerate(running.reqs):
            (chosen if req.rid in victims and not req.finished() else keep).append(i)
        ready = self._forward_event()
        events: list[ev.Event] = []
        for i in chosen:
            req = running.reqs[i]
            slots = self.kv.device_slots(req)
            if self.tier.start_out(req.rid, slots, ready, self.now_s) is None:
                self.stats.fallbacks += 1  # no host room: SGLang's retraction takes over
                keep.append(i)
                continue
            self.away[req.rid] = req
            events.append(ev.RotationStarted(req.rid, self.now_s, True, int(slots.numel()),
                                             len(req.output_ids)))
            self.times_rotated[req.rid] = self.times_rotated.get(req.rid, 0) + 1
            self.stats.rotations_out += 1
        if chosen:  # kept copies may have been taken or evicted for room
            events.append(self.tier.report(self.now_s))
        self._apply(events)
        return batch_surgery.keep_only(running, keep) if events else running

    def rotate_in(self, rid: str) -> None:
        """Allocate device KV for a rotated-out request and start copying it back; it rejoins
        the running batch when the copy is done (a later ``step``)."""
        req = self.away[rid]
        kv_len = len(req.origin_input_ids) + len(req.output_ids) - 1
        held = self.tier.away_kv_len(rid)
        assert kv_len == held, f"{rid}: KV length moved while rotated out ({held} -> {kv_len})"
        if not self.kv.can_restore(kv_len + self.pacer.chunked_remainder()):
            return
        prefix_len, new_slots = self.kv.restore(req, kv_len)
        # NOTE: freshly allocated slots may still be read by the forward in flight (their
        # previous owner's last step), so the copy waits for it.
        self.tier.start_in(rid, new_slots, prefix_len, self._forward_event(), self.now_s)
        self._apply([ev.RotationStarted(rid, self.now_s, False)])
        self.stats.rotations_in += 1

    def _moving_out(self) -> bool:
        return any(self.tier.state(r) is TierState.ROTATING_OUT for r in self.away)

    def _device_slots(self, running: ScheduleBatch) -> Callable[[str], torch.Tensor]:
        by_rid = {r.rid: r for r in running.reqs}
        return lambda rid: self.kv.device_slots(by_rid[rid])

    # --- events from SGLang ---------------------------------------------------------------
    def on_enqueue(self, req: Req, slo: RequestSlo) -> None:
        """A request entered SGLang's waiting queue (new, or retracted by SGLang)."""
        event = translate.enqueued(req, self.now_s, slo, self.policy)
        self.tier.drop(req.rid)  # retracted: its KV will be recomputed, a kept copy is stale
        self._apply([event])
        if isinstance(event, ev.Arrived):
            self.costs.observe_arrival(self.now_s, len(req.origin_input_ids))
        else:
            self.stats.requeued += 1

    def on_launch(self, batch: ScheduleBatch | None) -> None:
        """SGLang chose ``batch`` to run next. With the overlap scheduler its result comes back
        only after the following batch is planned, so the policy learns now when it should be
        done and which first tokens it brings. From the agreed clock and costs: identical on
        TP ranks."""
        self.binding.launched(batch, self.now_s, self._room_needed)
        self._room_needed = False
        if batch is None or not batch.reqs:
            return
        costs = self.costs.costs()
        if batch.forward_mode.is_extend():
            duration = costs.prefill_s(batch.extend_num_tokens or 0)
        else:
            duration = costs.decode_step_s
        # NOTE: from this step's clock, not chained onto the last estimate: errors can't pile up.
        self._launched_done_at_s = self.now_s + duration
        self._apply(translate.launched(batch, self.scheduler.chunked_req, self.now_s,
                                       self._launched_done_at_s, self.policy))

    def on_batch_result(self, batch: ScheduleBatch) -> None:
        """After SGLang processed a batch's results: costs (this rank's; rank 0's count) and
        the policy's table."""
        if batch.forward_mode.is_decode():
            launch = batch.launch_ts
            if launch is not None and self._last_decode_launch is not None:
                # launch to launch: the step of the batch before this one
                self.costs.observe_decode(launch - self._last_decode_launch,
                                          *self._last_decode_shape)
            self._last_decode_launch = launch
            if self.costs.decode_profile is not None:  # only a profile's calibration reads it
                self._last_decode_shape = (len(batch.reqs), translate.decode_kv_tokens(batch))
            self._apply(translate.decoded(batch, self.policy))
        elif batch.forward_mode.is_extend():
            self._last_decode_launch = None  # a decode step's cost must not include this one
            if batch.launch_ts is not None:
                self.costs.observe_prefill(batch.extend_num_tokens or 0,
                                           time.monotonic() - batch.launch_ts)
            self._apply(
                translate.extended(batch, self.scheduler.chunked_req, self.now_s, self.policy))

    def on_abort(self, rid_prefix: str, abort_all: bool) -> None:
        def hit(rid: str) -> bool:
            return abort_all or rid.startswith(rid_prefix)

        events: list[ev.Event] = []
        for rid in [r for r in self.away if hit(r) and not self.tier.dropped(r)]:
            self.stats.aborted_while_rotated += 1
            if self.tier.drop(rid):  # on the host only: gone now; else when its copy lands
                self._tell_aborted(self.away.pop(rid))
                events.append(ev.Finished(rid))
        waiting = {r.rid for r in self.scheduler.waiting_queue}
        self._apply(events + translate.aborted_waiting(hit, waiting, self.policy))

    def _tell_aborted(self, req: Req, message: str | None = None,
                      status_code: int | None = None) -> None:
        """Tell the client its request ended (a client abort, or ``message``: an error)."""
        from sglang.srt.managers.io_struct import AbortReq

        reason = None if message is None else {"type": "abort", "message": message,
                                                 "status_code": status_code}
        out = AbortReq(rid=req.rid, finished_reason=reason, abort_message=message)
        self.scheduler.ipc_channels.send_to_tokenizer.send_output(out, req)

    def _reconcile(self, running: list[Req]) -> None:
        """Finish what SGLang no longer holds anywhere (paths no hook sees, e.g. timeouts)."""
        self._apply(translate.gone(self._live_rids(running), self.policy))

    def _live_rids(self, running: list[Req]) -> set[str]:
        s = self.scheduler
        live = {r.rid for r in s.waiting_queue} | {r.rid for r in running} | set(self.away)
        if s.last_batch is not None:
            live |= {r.rid for r in s.last_batch.reqs}
        if s.chunked_req is not None:
            live.add(s.chunked_req.rid)
        return live

    # --- streams --------------------------------------------------------------------------
    def _forward_stream(self) -> object | None:
        if not torch.cuda.is_available() or self.kv.device.type != "cuda":
            return None
        s = self.scheduler
        return s.forward_stream if s.enable_overlap else torch.cuda.current_stream()

    def _forward_event(self) -> object | None:
        stream = self._forward_stream()
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    # --- reporting and self-checks --------------------------------------------------------
    def _record(self, kind: str, **fields: object) -> None:
        logger.info(format_record(kind, *self._ranks, fields))

    def _report(self) -> None:
        self._next_report_s = self.now_s + _REPORT_EVERY_S
        tier = self.tier
        self.metrics.publish(self.stats, tier.stats, tier.used_tokens(), tier.num_away())
        if self.stats.rotations_out:
            self._record("stats", **self.stats.as_dict(), **tier.stats.as_dict(),
                         away=tier.num_away(), host_used=tier.used_tokens(),
                         kept=tier.num_kept(), at_s=round(self.now_s, 3),
                         costs=cost_fields(self.costs.costs()))

    def on_idle(self) -> None:
        """Fully idle: every pool must be back at its initial free size. Checked and recorded
        once per idle period (``step`` re-arms it whenever a request is known)."""
        if self._idle_checked:
            return
        self._idle_checked = True
        self.binding.idle(self.now_s)
        running = getattr(self.scheduler, "running_batch", None)
        live = self._live_rids(running.reqs if running is not None else [])
        for rid in self.tier.kept_ids():  # requests finished on paths no hook sees
            if rid not in live:
                self.tier.drop(rid)
        error = None
        try:
            self.check()
        except AssertionError as e:  # report, never take the server down from a self-check
            error = str(e)
            logger.error("rotasched idle check failed: %s", e)
        self._report()
        counts = self.times_rotated.values()
        device_free = self.kv.allocator.available_size() + self.kv.tree_cache.evictable_size()
        self._record("idle", device_free=device_free,
                     device_total=self.scheduler.max_total_num_tokens,
                     host_free=self.tier.pages.available_size(),
                     host_total=self.initial_host_tokens,
                     table=len(self.policy), rotated_reqs=len(counts),
                     multi_rotated_reqs=sum(c > 1 for c in counts),
                     max_per_req=max(counts, default=0), **self.stats.as_dict(),
                     check_error=error)
        self.times_rotated.clear()

    def away_load(self) -> tuple[int, int]:
        """Requests away from the device batch (rotating out, on the host, rotating in) and
        their KV tokens: load that SGLang's own figures miss (``load_signal``). One whose copy
        out is in flight still holds its device KV too, counted twice for a step or two."""
        return len(self.away), sum(r.seqlen for r in self.away.values())

    def busy(self) -> bool:
        """Requests away from the batch (or copies in flight) keep the scheduler awake."""
        return self.tier.busy()

    def check(self) -> None:
        """Invariants, for tests and the idle self-check: every host page has one owner, and
        the requests the tier holds away are the ones this rotator keeps."""
        self.tier.check()
        if set(self.tier.away_ids()) != set(self.away):
            raise AssertionError(f"tier holds {sorted(self.tier.away_ids())} away, "
                                 f"rotator {sorted(self.away)}")

