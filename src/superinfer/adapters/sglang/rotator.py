"""Drives rotation inside one SGLang scheduler process: keeps the policy's request table true,
asks the policy for a plan every iteration, and carries the plan out through ``SglangKV``
(mechanics) and a ``KVMover`` (bytes).

Lifecycle of a rotated request (phases of ``superinfer.policy.Phase``)::

    RUNNING --out--> ROTATING_OUT --d2h done: release device--> ON_HOST
    ON_HOST --in: alloc + h2d--> ROTATING_IN --h2d done: merge as decode--> RUNNING

Device slots are freed only after the device→host copy completes, and that copy waits on an
event recorded on the forward stream, so the KV written by the forward in flight is included.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...config import ConfigError, RotaConfig, parse_slo_override
from ...host_tier.direct import DIRECT_MIN_PIECE_BYTES, mover_path
from ...host_tier.interface import KVLayout, KVMover
from ...host_tier.pool import HostKVPool
from ...policy import Capacity, CostModel, Phase, create_policy
from ...policy.deadlines import link_tokens
from .host_copies import HostCopies
from .kv_ops import SglangKV
from .metrics import RotationMetrics, RotationStats
from .tracker import RequestTracker
from .write_through import WriteThrough

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger("superinfer")
_RECONCILE_EVERY = 512  # iterations between table/scheduler consistency sweeps
_HOST_PAGE_TOKENS = 16  # host page size of the token-major paths (staging, zerocopy, torch)
_REPORT_EVERY_S = 5.0  # seconds between stats log lines / metric updates


@dataclass(slots=True)
class Parked:
    """A request away from the running batch, with its host copy."""

    req: Req
    kv_len: int
    host_slots: torch.Tensor
    submitted_s: float
    abort: bool = False


class Rotator:
    def __init__(self, scheduler: Scheduler, config: RotaConfig) -> None:
        self.scheduler = scheduler
        self.config = config
        self.kv = SglangKV(scheduler)
        self.policy = create_policy(config)
        self.table = self.policy.table
        self.tracker = RequestTracker(self.table, config)
        self.costs = CostModel()
        self.stats = RotationStats()
        kv_pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
        if not (hasattr(kv_pool, "k_buffer") and hasattr(kv_pool, "v_buffer")):
            raise RuntimeError(f"--schedule-policy rotasched needs an MHA KV pool (k_buffer/v_buffer); "
                               f"this model uses {type(kv_pool).__name__} (MLA/hybrid pools are not "
                               f"supported yet)")
        k0 = kv_pool.k_buffer[0]
        self.layout = KVLayout(len(kv_pool.k_buffer), k0.shape[1], k0.shape[2], k0.element_size())
        piece = self.kv.page_size * k0[0].numel() * k0.element_size()  # one page, one layer's K
        path = mover_path(config.mover, k0.is_cuda, piece)
        # The direct path copies whole device pages into host pages of the same size.
        page = self.kv.page_size if path == "direct" else _HOST_PAGE_TOKENS
        num_tokens = int(config.host_kv_gb * 1e9 / self.layout.bytes_per_token) // page * page
        self.host = HostKVPool(self.layout, num_tokens, page, k0.dtype, pin_memory=k0.is_cuda,
                               numa_node=config.host_numa_node, page_major=path == "direct")
        self.mover = _make_mover(path, kv_pool.k_buffer, kv_pool.v_buffer, self.host)
        if path == "direct" and k0.is_cuda and piece < DIRECT_MIN_PIECE_BYTES:
            logger.warning("rotasched: --rota-mover direct with %.0f KiB page pieces: copy engines move "
                           "~60 GB/s both ways with 32 KiB pieces and less below; a larger --page-size "
                           "or --rota-mover staging moves more", piece / 1024)
        self.out: dict[str, Parked] = {}  # ROTATING_OUT
        self.parked: dict[str, Parked] = {}  # ON_HOST
        self.inbound: dict[str, Parked] = {}  # ROTATING_IN
        self.host_copies = HostCopies(self.host, self.table, self.stats)  # --rota-keep-host-copy
        self.write_through = (WriteThrough(self.host_copies, self.host, self.mover, self.kv, self.table,
                                           self.stats) if config.write_through else None)
        # Copies done on this rank, in submission order, not yet done on every TP rank.
        self._done_d2h: deque[str] = deque()
        self._done_h2d: deque[str] = deque()
        self.now_s = 0.0
        self._iteration = 0
        self._next_report_s = 0.0
        self._idle_checked = False
        self.prefill_budget: int | None = None  # from the last plan; see paced_prefill
        self.admitted: list[str] = []  # the last plan's admissions, in order; see paced_prefill
        self.metrics = RotationMetrics(bool(scheduler.server_args.enable_metrics), scheduler.ps.tp_rank)
        self.initial_host_tokens = self.host.available_size()
        self.times_rotated: dict[str, int] = {}  # rid -> rotate-outs, over the current busy period
        self._last_decode_launch: float | None = None
        self._launched_done_at_s = 0.0  # when the last launched batch should be done
        tp = scheduler.server_args.tp_size
        self._tp_group = scheduler.tp_cpu_group if tp > 1 else None
        logger.info("rotasched: policy=%s host tier %.1f GB (%d tokens, %d-token pages), mover %s (%s)",
                    config.policy, config.host_kv_gb, num_tokens, page, type(self.mover).__name__, path)

    # --- the per-iteration step -----------------------------------------------------------
    def step(self, running: ScheduleBatch) -> ScheduleBatch:
        """Before SGLang builds the next batch: finish transfers, plan, act."""
        self._iteration += 1
        running = self._collect(running)
        self.host_copies.drop_stale()
        self.prefill_budget, self.admitted = None, []
        if len(self.table):
            self._idle_checked = False
        if self._iteration % _RECONCILE_EVERY == 0:
            self._reconcile(running)
        if self.now_s >= self._next_report_s:
            self._report()
        if len(self.table) == 0:
            return running
        s = self.scheduler
        cap = Capacity(
            available_device_tokens=(self.kv.allocator.available_size() + self.kv.tree_cache.evictable_size()
                                     - self._chunked_remainder()),
            total_device_tokens=s.max_total_num_tokens,
            free_host_tokens=self.host.available_size() + self.host_copies.tokens(),
            bytes_per_token=self.layout.bytes_per_token,
            new_token_ratio=s.new_token_ratio_tracker.current,
        )
        # Overlap scheduling: the last batch's result is processed after this plan.
        unprocessed = [b for b, _ in getattr(s, "result_queue", ())]
        self.tracker.in_flight(unprocessed, s.chunked_req)
        gpu_free_at = self._launched_done_at_s if unprocessed else None
        costs = self.costs.costs()
        plan = self.policy.plan(self.now_s, cap, costs, self._batch_token_limit(), gpu_free_at)
        self.prefill_budget, self.admitted = plan.prefill_token_budget, list(plan.admit)
        self.stats.plans_decode_first += plan.prefill_token_budget == 0
        self.stats.plans_head_blocked += plan.head_blocked
        if plan.rotate_out:
            running = self.rotate_out(running, set(plan.rotate_out))
        for rid in plan.rotate_in:
            self.rotate_in(rid)
        if plan.admit:
            self._reorder_waiting(plan.admit)
        if self.write_through is not None and not plan.rotate_out and not self.out:
            budget = link_tokens(self.config.link_share, costs.d2h_bytes_per_s, costs.decode_step_s,
                                 self.layout.bytes_per_token)
            self.write_through.start(running.reqs, budget, self._forward_event())
        return running

    def _sync(self, local_d2h: int, local_h2d: int) -> tuple[int, int]:
        """Agree across TP ranks on the clock, the costs (rank 0's) and how many transfers are
        done: a copy counts as done only once it is done on every rank, since each rank moves
        its own KV shard at its own pace. Returns the agreed done counts per direction."""
        now = time.monotonic()
        if self._tp_group is None:
            self.now_s = now
            return local_d2h, local_h2d
        views: list = [None] * torch.distributed.get_world_size(self._tp_group)
        torch.distributed.all_gather_object(views, (now, self.costs, local_d2h, local_h2d),
                                            group=self._tp_group)
        self.now_s, self.costs = views[0][0], views[0][1]
        return min(v[2] for v in views), min(v[3] for v in views)

    # --- transfers finishing --------------------------------------------------------------
    def _collect(self, running: ScheduleBatch) -> ScheduleBatch:
        report = self.mover.poll()
        self._done_d2h.extend(report.done_d2h)
        self._done_h2d.extend(report.done_h2d)
        n_d2h, n_h2d = self._sync(len(self._done_d2h), len(self._done_h2d))
        for _ in range(n_d2h):
            job_id = self._done_d2h.popleft()
            if self.write_through is not None and self.write_through.owns(job_id):
                self.write_through.done(job_id)
            else:
                self._out_done(job_id)
        ready = [self.inbound.pop(self._done_h2d.popleft()) for _ in range(n_h2d)]
        if ready:
            running = self._rejoin(running, ready)
        return running

    def _out_done(self, rid: str) -> None:
        p = self.out.pop(rid)
        elapsed = max(self.now_s - p.submitted_s, 1e-6)
        self.costs.observe_transfer("d2h", p.kv_len * self.layout.bytes_per_token, elapsed)
        if p.req.finished():  # finished by the step that was in flight; SGLang released it
            self.host.free(p.host_slots)
            self.table.remove(rid)
            return
        self.kv.release(p.req)
        if p.abort:
            self._drop(p)
            return
        self.parked[rid] = p
        self.table.set_phase(rid, Phase.ON_HOST, self.now_s)

    def _rejoin(self, running: ScheduleBatch, ready: list[Parked]) -> ScheduleBatch:
        for p in ready:
            keep = self.config.keeps_host_copies and not p.abort
            self.host_copies.keep_or_free(p.req, p.host_slots, p.kv_len, keep)
            self.costs.observe_transfer("h2d", p.kv_len * self.layout.bytes_per_token,
                                        max(self.now_s - p.submitted_s, 1e-6))
            self.table.set_phase(p.req.rid, Phase.RUNNING, self.now_s)
            if p.abort:
                from sglang.srt.managers.schedule_batch import FINISH_ABORT

                p.req.to_finish = FINISH_ABORT()  # one more decode step, then SGLang cleans up
        self.mover.fence_compute(self._forward_stream())
        batch = self.kv.decode_batch([p.req for p in ready])
        if running.is_empty():
            return batch
        running.merge_batch(batch)
        running.batch_is_full = False
        return running

    # --- acting on a plan -----------------------------------------------------------------
    def rotate_out(self, running: ScheduleBatch, victims: set[str]) -> ScheduleBatch:
        """Start moving ``victims`` (running decode requests) to the host; returns the batch
        without them. Their device KV stays allocated until the copy is done."""
        keep, chosen = [], []
        for i, req in enumerate(running.reqs):
            (chosen if req.rid in victims and not req.finished() else keep).append(i)
        ready = self._forward_event()
        moved: list[int] = []
        for i in chosen:
            req = running.reqs[i]
            kv_len = self.kv.kv_len(req)
            kept = self.host_copies.take(req.rid, kv_len)
            start = kept.numel()
            tail = self.host_copies.alloc(kv_len - start) if kv_len > start else kept[:0]
            if tail is None:  # fragmented or full: leave it to SGLang's retraction
                self.host_copies.put_back(req, kept)
                self.stats.fallbacks += 1
                keep.append(i)
                continue
            self.table.set_counts(req.rid, kv_len, len(req.output_ids))
            self.table.set_phase(req.rid, Phase.ROTATING_OUT, self.now_s)
            nbytes = self.mover.submit_d2h(req.rid, self.kv.device_slots(req)[start:], tail, ready)
            self.stats.bytes_d2h_saved += start * self.layout.bytes_per_token
            self.out[req.rid] = Parked(req, kv_len, torch.cat([kept, tail]), self.now_s)
            self.times_rotated[req.rid] = self.times_rotated.get(req.rid, 0) + 1
            self.stats.rotations_out += 1
            self.stats.bytes_d2h += nbytes
            moved.append(i)
        if moved:
            running.filter_batch(keep_indices=sorted(keep))
            running.batch_is_full = False
        return running

    def rotate_in(self, rid: str) -> None:
        """Allocate device KV for a parked request and start copying it back; it rejoins the
        running batch when the copy is done (a later ``step``)."""
        p = self.parked[rid]
        req = p.req
        kv_len = len(req.origin_input_ids) + len(req.output_ids) - 1
        assert kv_len == p.kv_len, f"{rid}: KV length moved while rotated out ({p.kv_len} -> {kv_len})"
        if not self.kv.can_restore(kv_len + self._chunked_remainder()):
            return
        del self.parked[rid]
        prefix_len, new_slots = self.kv.restore(req, kv_len)
        p.submitted_s = self.now_s
        self.inbound[rid] = p
        self.table.set_phase(rid, Phase.ROTATING_IN, self.now_s)
        # NOTE: freshly allocated slots may still be read by the forward in flight (their
        # previous owner's last step), so the copy waits for it.
        nbytes = self.mover.submit_h2d(rid, p.host_slots[prefix_len:kv_len], new_slots,
                                       self._forward_event())
        self.stats.rotations_in += 1
        self.stats.bytes_h2d += nbytes

    def _chunked_remainder(self) -> int:
        """Prompt tokens the request in chunked prefill still has to allocate. SGLang counts
        on them: a chunk continues even with no free memory left (it would raise 'Out of
        memory' in alloc_for_extend), so rotate-ins and the plan must leave them free."""
        req = self.scheduler.chunked_req
        if req is None:
            return 0
        allocated = req.kv.kv_allocated_len if getattr(req, "kv", None) is not None else 0
        return max(len(req.origin_input_ids) - allocated, 0)

    @contextmanager
    def paced_prefill(self, running: ScheduleBatch) -> Iterator[None]:
        """While SGLang builds this step's batch, hold its prefill to the plan: only the
        requests the plan admitted are in the waiting queue, under a prefill limit no larger
        than the budget; none at all (decode first) when a decoding stream has no slack left.

        Why hide the rest: with chunked prefill on, SGLang's PrefillAdder adds requests while
        any of its token limit remains and cuts the last one at the chunk size, and the cut
        request's next chunk runs in the next batch whatever the limit then. A 3,000-token
        budget became an 8,192-token batch plus a forced follow-up on the H200 (code trace),
        stalling every stream that had just got its first token. The chunk size is left
        alone: small chunks only stretch the stall (256-token chunks ran at ~10k tokens/s)."""
        s, budget = self.scheduler, self.prefill_budget
        saved_limit, queue = s.max_prefill_tokens, s.waiting_queue
        if budget == 0 and not running.is_empty():
            s.waiting_queue = []
        elif self.admitted:
            # A request the table does not know (queued by a path no hook sees) stays visible:
            # the plan can never admit it, so hiding it would starve it.
            chosen, table = set(self.admitted), self.table
            s.waiting_queue = [r for r in queue if r.rid in chosen or r.rid not in table]
        # Identities, not the list: SGLang appends to the visible list while it builds.
        shown = {id(r) for r in s.waiting_queue} if len(s.waiting_queue) < len(queue) else None
        if budget is not None:
            limit = max(self.config.min_prefill_chunk, budget) // self.kv.page_size * self.kv.page_size
            s.max_prefill_tokens = min(s.max_prefill_tokens, max(limit, self.kv.page_size))
        try:
            yield
        finally:
            s.max_prefill_tokens = saved_limit
            if shown is not None:  # hidden ones back behind what was shown and not taken
                after = s.waiting_queue
                s.waiting_queue = ([r for r in after if id(r) in shown]
                                   + [r for r in queue if id(r) not in shown]
                                   + [r for r in after if id(r) not in shown])

    def _batch_token_limit(self) -> int:
        """The most prompt tokens one prefill batch takes without cutting a request: SGLang's
        prefill limit, and its chunk size when chunked prefill is on."""
        s = self.scheduler
        chunk = s.chunked_prefill_size
        return min(s.max_prefill_tokens, chunk) if chunk and chunk > 0 else s.max_prefill_tokens

    def _reorder_waiting(self, front: list[str]) -> None:
        queue = self.scheduler.waiting_queue
        if [r.rid for r in queue[: len(front)]] == front:
            return
        by_rid = {r.rid: r for r in queue}
        head = [by_rid[rid] for rid in front if rid in by_rid]
        chosen = {id(r) for r in head}
        self.scheduler.waiting_queue = head + [r for r in queue if id(r) not in chosen]

    # --- events from SGLang ---------------------------------------------------------------
    def on_enqueue(self, req: Req) -> None:
        """A request entered SGLang's waiting queue (new, or retracted by SGLang)."""
        self.host_copies.drop(req.rid)  # retracted: its KV will be recomputed, not restored
        if self.tracker.on_enqueue(req, self.now_s):
            self.costs.observe_arrival(self.now_s, len(req.origin_input_ids))

    def on_launch(self, batch: ScheduleBatch | None) -> None:
        """SGLang chose ``batch`` to run next. With the overlap scheduler its result comes back
        only after the following batch is planned, so the table learns now when it should be
        done and which first tokens it brings. From the agreed clock and costs: identical on
        TP ranks."""
        if batch is None or not batch.reqs:
            return
        costs = self.costs.costs()
        if batch.forward_mode.is_extend():
            duration = costs.prefill_s(batch.extend_num_tokens or 0)
        else:
            duration = costs.decode_step_s
        # NOTE: from this step's clock, not chained onto the last estimate: errors can't pile up.
        self._launched_done_at_s = self.now_s + duration
        self.tracker.on_launch(batch, self.scheduler.chunked_req, self.now_s, self._launched_done_at_s)

    def on_batch_result(self, batch: ScheduleBatch) -> None:
        """After SGLang processed a batch's results: costs (this rank's; rank 0's count) and
        the table."""
        if batch.forward_mode.is_decode():
            launch = batch.launch_ts
            if launch is not None and self._last_decode_launch is not None:
                self.costs.observe_decode(launch - self._last_decode_launch)
            self._last_decode_launch = launch
            self.tracker.on_decode(batch)
        elif batch.forward_mode.is_extend():
            self._last_decode_launch = None  # a decode step's cost must not include this one
            if batch.launch_ts is not None:
                self.costs.observe_prefill(batch.extend_num_tokens or 0, time.monotonic() - batch.launch_ts)
            self.tracker.on_extend(batch, self.scheduler.chunked_req, self.now_s)

    def on_abort(self, rid_prefix: str, abort_all: bool) -> None:
        def hit(rid: str) -> bool:
            return abort_all or rid.startswith(rid_prefix)

        for rid in [r for r in self.parked if hit(r)]:
            self.stats.aborted_while_rotated += 1
            self._drop(self.parked.pop(rid))
        for p in list(self.out.values()) + list(self.inbound.values()):
            if hit(p.req.rid) and not p.abort:
                self.stats.aborted_while_rotated += 1
                p.abort = True
        self.tracker.forget_waiting(hit, {r.rid for r in self.scheduler.waiting_queue})

    def _drop(self, p: Parked) -> None:
        """An aborted request that is on the host only: free its copy, tell the client."""
        from sglang.srt.managers.io_struct import AbortReq

        self.host.free(p.host_slots)
        self.table.remove(p.req.rid)
        self.scheduler.ipc_channels.send_to_tokenizer.send_output(AbortReq(rid=p.req.rid), p.req)

    def _reconcile(self, running: ScheduleBatch) -> None:
        s = self.scheduler
        live = {r.rid for r in s.waiting_queue} | {r.rid for r in running.reqs}
        live |= set(self.out) | set(self.parked) | set(self.inbound)
        if s.last_batch is not None:
            live |= {r.rid for r in s.last_batch.reqs}
        if s.chunked_req is not None:
            live.add(s.chunked_req.rid)
        self.tracker.reconcile(live)

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

    def _report(self) -> None:
        self._next_report_s = self.now_s + _REPORT_EVERY_S
        st = self.stats
        used = self.host.size - self.host.available_size()
        self.metrics.publish(st, used, len(self.out) + len(self.parked) + len(self.inbound))
        if st.rotations_out:
            logger.info("rotasched stats: out=%d in=%d d2h=%.2fGB h2d=%.2fGB fallbacks=%d away=%d "
                        "host_used=%d decode_first=%d head_blocked=%d d2h_saved=%.2fGB kept=%d "
                        "kept_evicted=%d written_through=%.2fGB", st.rotations_out, st.rotations_in,
                        st.bytes_d2h / 1e9, st.bytes_h2d / 1e9, st.fallbacks,
                        len(self.out) + len(self.parked) + len(self.inbound), used,
                        st.plans_decode_first, st.plans_head_blocked, st.bytes_d2h_saved / 1e9,
                        len(self.host_copies), st.host_copies_evicted, st.bytes_written_through / 1e9)

    def on_idle(self) -> None:
        """Fully idle: every pool must be back at its initial free size. Checked and logged once
        per idle period (``step`` re-arms it whenever a request is known)."""
        if self._idle_checked:
            return
        self._idle_checked = True
        self.host_copies.drop_stale()
        s = self.scheduler
        device_free = self.kv.allocator.available_size() + self.kv.tree_cache.evictable_size()
        host_free = self.host.available_size()
        try:
            self.check()
        except AssertionError as e:  # report, never take the server down from a self-check
            logger.error("rotasched idle check failed: %s", e)
        self._report()
        counts = self.times_rotated.values()
        logger.info("rotasched idle check: device_free=%d device_total=%d host_free=%d host_total=%d "
                    "table=%d rotations_out=%d rotated_reqs=%d multi_rotated_reqs=%d max_per_req=%d "
                    "aborted_while_rotated=%d", device_free, s.max_total_num_tokens, host_free,
                    self.initial_host_tokens, len(self.table), self.stats.rotations_out, len(counts),
                    sum(c > 1 for c in counts), max(counts, default=0), self.stats.aborted_while_rotated)
        self.times_rotated.clear()

    def busy(self) -> bool:
        """Requests away from the batch keep the scheduler awake (it must bring them back)."""
        return bool(self.out or self.parked or self.inbound or self.write_through)

    def check(self) -> None:
        """Invariants, for tests and the idle self-check."""
        self.host.check_integrity()
        held = sum(int(p.host_slots.numel()) for d in (self.out, self.parked, self.inbound) for p in d.values())
        held += self.host_copies.tokens()
        if self.write_through is not None:
            held += self.write_through.held_tokens()
        used = self.host.size - self.host.available_size()
        if held > used:
            raise AssertionError(f"rotations hold {held} host slots but only {used} are in use")


def _make_mover(path: str, k_buffers: list, v_buffers: list, host: HostKVPool) -> KVMover:
    if path == "torch":
        from ...host_tier.torch_mover import TorchMover

        return TorchMover(k_buffers, v_buffers, host)
    if path == "direct":
        from ...host_tier.direct import DirectKVMover

        return DirectKVMover(k_buffers, v_buffers, host)
    from ...host_tier.staging import StagingKVMover

    return StagingKVMover(k_buffers, v_buffers, host, path=path)


def validate_request_slo(req: Req) -> str | None:
    """The error message for a bad per-request SLO override, or None."""
    try:
        parse_slo_override(req.sampling_params.custom_params)
    except ConfigError as e:
        return str(e)
    return None
