"""Replay a trace through the RotaSched policy (or SGLang's fcfs rule) on a simulated GPU.

Why: device time is scarce, and the policy's failures on the H200 were feedback loops (victims
picked again every step, prefill chunks shrinking to 256 tokens, prefill storms once every
stream was behind) that a cheap replay can show before a GPU run.

What is modelled here (this is not SGLang): the parts of SGLang's scheduler that decide who
runs (PrefillAdder's memory rule, chunked prefill, decode retraction, new_token_ratio decay),
one batch at a time, and SGLang's overlap scheduler's lag: the next batch is planned while
one runs, so a request that arrives during a batch waits for the one after next (off for a
server run with ``--disable-overlap-schedule``: ``--no-overlap``); the GPU's prefill and
decode costs and what a decode step pays while KV moves each way (``GpuModel``); a host link
of a fixed rate per direction that moves no bytes (``eval.lib.modelled_mover.ModelledMover``).

What is the product's own code: the policy and its cost model, fed only through
``update(events)`` and ``plan(StepSnapshot)`` as the SGLang adapter feeds them; and everything
host-side (host room, kept copies for rotasched-keep, write-through for rotasched-wt, eviction),
which is ``superinfer.host_tier.manager.HostTierManager`` over page accounting without memory
(``HostPages``), driven like the adapter drives it, except that copies are polled at
their own end (``Simulator._collect``). Figures are model estimates only.

    python -m eval.sim_policy \\
        --trace eval/data/azure_llm_2023/AzureLLMInferenceTrace_conv.csv \\
        --cap 60000 --rates 14 18 22 --num 300 --out /tmp/sim_conv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from eval.lib.gpu_model import MOVERS, GpuModel, ProfileNotFound, resolve_gpu_model
from eval.lib.jsonfiles import command_line, write_jsonl
from eval.lib.metrics import summarize
from eval.lib.modelled_mover import ModelledMover
from eval.lib.traces import RequestSpec, load_azure, make_specs
from superinfer.config import RotaConfig
from superinfer.host_tier.manager import HostTierManager, TierState, TierStats
from superinfer.host_tier.pool import HostPages
from superinfer.policy import (
    HELD_BY,
    Capacity,
    CostModel,
    Policy,
    StepSnapshot,
    create_policy,
    deadlines,
)
from superinfer.policy import events as ev
from superinfer.policy.binding import BindingMonitor, wait_reason
from superinfer.policy.table import CLIP_NEW_TOKENS
from superinfer.profiles import load_profile_file

# --rota-keep-host-copy, --rota-write-through
SYSTEMS = ("fcfs", "rotasched", "rotasched-keep", "rotasched-wt", "fcfs-mixed", "rotasched-mixed")
MIXED = "-mixed"  # a system name's suffix: SGLang with --enable-mixed-chunk
HOST_PAGE = 16  # the host tier's page on the staging path: a kept copy is whole pages


@dataclass
class SimReq:
    """A request as the modelled server holds it: SGLang's Req reduced to counts."""

    spec: RequestSpec
    rid: str
    prefilled: int = 0  # tokens of (prompt + recomputed output) with KV on the device
    kv: int = 0  # device KV tokens held (until its copy to the host is done, when rotated out)
    token_times: list[float] = field(default_factory=list)

    @property
    def out(self) -> int:
        return len(self.token_times)

    @property
    def done(self) -> bool:
        return self.out >= self.spec.output_len

    def to_prefill(self) -> int:
        """Tokens a prefill must still compute (a retracted request recomputes its output)."""
        return self.spec.prompt_len + max(self.out - 1, 0) - self.prefilled

    def device_slots(self) -> torch.Tensor:
        """Stand-ins for its device KV slots: the modelled mover only counts them."""
        return torch.arange(self.kv)


class NewTokenRatio:
    """SGLang's estimate of how much of its remaining output a running request will use:
    starts cautious, decays every decode step, jumps back after a retraction."""

    def __init__(self, init: float = 0.7, floor: float = 0.1, decay_steps: int = 600) -> None:
        self.init, self.floor, self.step = init, floor, (init - floor) / decay_steps
        self.value = init

    def decode(self) -> None:
        self.value = max(self.floor, self.value - self.step)

    def retracted(self) -> None:
        self.value = self.init


class Simulator:
    """One replay of ``specs``. This class models the server (who runs, when, at what cost);
    under rotasched the policy decides and the product's HostTierManager owns every host page,
    both driven the way the SGLang adapter drives them (adapters/sglang/rotator.py)."""

    def __init__(self, specs: list[RequestSpec], system: str, cap: int, gpu: GpuModel,
                 ttft_slo: float, tbt_slo: float, host_tokens: int, horizon_s: float,
                 overlap: bool = True, settings: dict[str, Any] | None = None) -> None:
        self.gpu, self.cap, self.horizon = gpu, cap, horizon_s
        self.overlap = overlap
        self._seen_until = 0.0  # arrivals up to here are in the scheduler's queue
        self.ttft_slo, self.tbt_slo = ttft_slo, tbt_slo
        self.reqs = [SimReq(s, f"r{s.idx}") for s in specs]
        self.pending = deque(sorted(self.reqs, key=lambda r: r.spec.arrival))
        self.waiting: list[SimReq] = []
        self.running: list[SimReq] = []
        self.chunked: SimReq | None = None
        self.admitted: set[str] = set()  # the last plan's admissions (the queue SGLang is shown)
        self.away: dict[str, SimReq] = {}  # held by the tier: rotating out, on host, rotating in
        self.ratio = NewTokenRatio()
        self.costs = CostModel()
        self.now = 0.0
        self.last_was_decode = False
        self.stats = {"rotations_out": 0, "rotations_no_room": 0, "retractions": 0,
                      "prefill_batches": 0, "prefill_tokens": 0, "decode_steps": 0,
                      "decode_first": 0, "mixed_decode_tokens": 0, "head_blocked": 0,
                      **{f"blocked_{why}": 0 for why in HELD_BY}}
        self.binding = BindingMonitor()  # what bound, measured as the adapter measures it
        self._room_needed = False  # the last plan's EDF head waited for room
        self.policy: Policy | None = None
        self.mover: ModelledMover | None = None
        self.tier: HostTierManager | None = None
        self.write_through = False
        # --enable-mixed-chunk: each prefill batch also carries the running streams' decode
        # tokens (SGLang's mix_with_running), at the decode batch's cost less its fixed part
        self.mixed = system.endswith(MIXED)
        system = system.removesuffix(MIXED)
        if system != "fcfs":
            cfg = RotaConfig(policy="lvf" if system == "rotasched-lvf" else "slo",
                             ttft_slo_s=ttft_slo, tbt_slo_s=tbt_slo,
                             keep_host_copy=system == "rotasched-keep",
                             write_through=system == "rotasched-wt", **(settings or {}))
            self.policy = create_policy(cfg)
            # 'auto': the GPU model's own, as the server finds the shipped profile of a model
            # the simulator has one of; a path: that file's shape on this model's steps
            if cfg.decode_profile != "off":
                self.costs.decode_profile = (gpu.decode_profile if cfg.decode_profile == "auto"
                                             else load_profile_file(cfg.decode_profile).profile)
            self.write_through = cfg.write_through
            self.mover = ModelledMover(lambda: self.now, gpu.link_bytes_per_s,
                                       gpu.bytes_per_token)
            pages = HostPages(host_tokens // HOST_PAGE * HOST_PAGE, HOST_PAGE)
            self.tier = HostTierManager(pages, self.mover, gpu.bytes_per_token,
                                        keep_copies=cfg.keep_host_copy)

    # --- memory as SGLang's PrefillAdder counts it --------------------------------------------
    def used(self) -> int:
        return sum(r.kv for r in self.reqs)

    def reservation(self) -> float:
        return sum(min(r.spec.output_len - r.out, CLIP_NEW_TOKENS) * self.ratio.value
                   for r in self.running)

    def all_stats(self) -> dict[str, int]:
        """The simulator's counters plus the tier's, in tokens (its stats count bytes)."""
        tier = self.tier.stats if self.tier is not None else TierStats()
        bpt = self.gpu.bytes_per_token
        return {**self.stats, "d2h_tokens": tier.bytes_d2h // bpt,
                "d2h_tokens_saved": tier.bytes_d2h_saved // bpt,
                "kept_copies_evicted": tier.host_copies_evicted,
                "written_through_tokens": tier.bytes_written_through // bpt}

    # --- main loop -----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        done = 0
        while done < len(self.reqs) and self.now < self.horizon:
            if not self._iterate():
                break
            done = sum(r.done for r in self.reqs)
        # write-through copies may still land after the last request finished
        while self.mover is not None and (done_s := self.mover.next_done_s()) is not None:
            self.now = max(self.now, done_s)
            self._collect()
        return self.records()

    def records(self) -> list[dict]:
        """Every request's record, as the replay client writes it."""
        return [{"send": r.spec.arrival, "token_times": r.token_times, "aborted": False,
                 "error": None if r.done else "not finished in the horizon"}
                for r in self.reqs]

    def run_until(self, until_s: float) -> None:
        """Run up to ``until_s`` (a batch in flight may end past it), idling when nothing is
        left to run: a router routes its next request then (eval.sim_replicas)."""
        while self.now < min(until_s, self.horizon) and self._iterate(until_s):
            pass

    def add_request(self, spec: RequestSpec) -> None:
        """A request routed here; it arrives at ``spec.arrival`` (at the next iteration, if a
        batch in flight runs past that)."""
        r = SimReq(spec, f"r{spec.idx}")
        self.reqs.append(r)
        self.pending.append(r)

    def load_tokens(self, count_rotated_out: bool) -> int:
        """SGLang's load figure for routing (``num_total_tokens``): device KV in use plus the
        waiting prompts; with SuperInfer's load hook also the KV of rotated-out requests."""
        queued = sum(r.to_prefill() for r in self.waiting)
        if not count_rotated_out or self.tier is None:
            return self.used() + queued
        # on the host: copied out, device pages released (the others still count in used())
        away = sum(self.tier.away_kv_len(rid) for rid, r in self.away.items() if r.kv == 0)
        return self.used() + queued + away

    def _iterate(self, until_s: float | None = None) -> bool:
        """One scheduler iteration; False once nothing is left that could ever happen."""
        self._arrivals()
        self._collect()
        budget = self._plan()
        started = self.now
        if self._prefill(budget) or self._decode():
            # Overlap scheduling planned the next batch when this one started: what arrived
            # while it ran is first seen at the plan after that.
            self._seen_until = started if self.overlap else self.now
            return True
        if not self._wait(until_s):
            return False
        self._seen_until = self.now  # an idle scheduler loop sees arrivals at once
        return True

    def _wait(self, until_s: float | None = None) -> bool:
        """Nothing to run: move the clock to the next arrival or copy end (or ``until_s``, when
        more requests may be routed here then). False: nothing is left that could ever happen."""
        nxt = [self.pending[0].spec.arrival] if self.pending else []
        if until_s is not None:
            nxt.append(until_s)
        if self.mover is not None and (done_s := self.mover.next_done_s()) is not None:
            nxt.append(done_s)
        if nxt:
            self._observe("idle", self.waiting)
            self.now = max(self.now, min(nxt))
            return True
        # A rotate-out with nothing to copy (all of it kept) ends at the next poll.
        return self.tier is not None and any(self.tier.collect())

    def _observe(self, gpu: str, waiting: list[SimReq]) -> None:
        """What the GPU runs from now on, and why the ``waiting`` requests (not in the batch)
        wait, as the adapter tells the monitor (``policy.binding.wait_reason``)."""
        room_needed = self._room_needed if self.policy is not None else None
        wait = wait_reason(gpu, bool(waiting), room_needed)
        self.binding.observe(self.now, gpu, wait, self.used() / self.cap)

    def _apply(self, events: list[ev.Event]) -> None:
        """Events to the policy, as the adapter's ``_apply``: a finished request's host state
        (a kept copy) goes too."""
        if self.policy is None or self.tier is None:
            return
        self.policy.update(events)
        for e in events:
            if isinstance(e, ev.Finished):
                self.tier.drop(e.req_id)

    def _arrivals(self) -> None:
        while self.pending and self.pending[0].spec.arrival <= self._seen_until:
            r = self.pending.popleft()
            self.waiting.append(r)
            self.costs.observe_arrival(self.now, r.spec.prompt_len)
            self._apply([ev.Arrived(r.rid, r.spec.arrival, r.spec.prompt_len, self.ttft_slo,
                                    self.tbt_slo, r.spec.output_len)])

    # --- the host tier -------------------------------------------------------------------------
    def _collect(self) -> None:
        """Copies that ended by now move their requests on, polled once per iteration as the
        adapter polls; the cost model learns the link's rate from each copy's own time on it
        (``Transfer.link``), as the adapter does from CUDA events."""
        if self.tier is None or self.policy is None:
            return
        report = self.tier.poll(self.now)
        if report.cancelled:  # requests away neither finish nor get retracted here
            raise AssertionError(f"dropped while a copy ran: {sorted(report.cancelled)}")
        for t in report.transfers:
            self.costs.observe_transfer(t)
        for rid in report.finished_out:
            self.away[rid].kv = 0  # its device pages are released once the copy is done
        for rid in report.finished_in:
            self.running.append(self.away.pop(rid))
        self.policy.update([report])

    def _plan(self) -> int | None:
        self.admitted = set()
        if self.policy is None or self.tier is None or len(self.policy) == 0:
            return None
        chunk_left = self.chunked.to_prefill() if self.chunked else 0
        cap = Capacity(available_device_tokens=self.cap - self.used() - chunk_left,
                       total_device_tokens=self.cap, free_host_tokens=self.tier.free_tokens(),
                       bytes_per_token=self.gpu.bytes_per_token,
                       new_token_ratio=self.ratio.value)
        # as the adapter passes it; one batch at a time, so the GPU is free now
        limit = min(self.gpu.max_prefill_tokens, self.gpu.chunked_prefill_size)
        costs = self.costs.costs()
        plan = self.policy.plan(StepSnapshot(self.now, cap, costs, limit,
                                             bound=self.binding.recent_bound()))
        self._room_needed = plan.room_needed
        self.stats["head_blocked"] += plan.head_blocked
        if plan.held_by is not None:
            self.stats[f"blocked_{plan.held_by}"] += 1
        self.admitted = set(plan.admit)
        if plan.rotate_out:
            self._rotate_out(set(plan.rotate_out))
        for rid in plan.rotate_in:
            self._rotate_in(rid, chunk_left)
        if self.write_through and not plan.rotate_out and not self._moving_out():
            budget = deadlines.link_tokens(self.policy.config.link_share,
                                           self.gpu.link_bytes_per_s, costs.decode_step_s,
                                           self.gpu.bytes_per_token)
            by_rid = {r.rid: r for r in self.running}
            self.tier.write_through([(r.rid, r.kv) for r in self.running],
                                    lambda rid: by_rid[rid].device_slots(), budget, None)
        if plan.admit:
            front = [r for rid in plan.admit for r in self.waiting if r.rid == rid]
            self.waiting = front + [r for r in self.waiting if r not in front]
        return plan.prefill_token_budget

    def _rotate_out(self, victims: set[str]) -> None:
        """Start the victims' copies to the host; their device KV stays held until it lands.
        A victim the tier has no room for stays (SGLang's retraction would take over)."""
        assert self.tier is not None
        events: list[ev.Event] = []
        for r in [r for r in self.running if r.rid in victims]:
            if self.tier.start_out(r.rid, r.device_slots(), None, self.now) is None:
                self.stats["rotations_no_room"] += 1
                continue
            self.running.remove(r)
            self.away[r.rid] = r
            events.append(ev.RotationStarted(r.rid, self.now, True, r.kv, r.out))
            self.stats["rotations_out"] += 1
        events.append(self.tier.report(self.now))  # kept copies taken or evicted for room
        self._apply(events)

    def _rotate_in(self, rid: str, chunk_left: int) -> None:
        """Allocate its device KV (if it fits beside the chunked prefill's rest) and start the
        copy back; it rejoins the running batch when the copy lands."""
        assert self.tier is not None
        r = self.away[rid]
        need = r.spec.prompt_len + r.out - 1
        held = self.tier.away_kv_len(rid)
        assert need == held, f"{rid}: KV length moved while rotated out ({held} -> {need})"
        if self.cap - self.used() - chunk_left < need:
            return
        r.kv = need
        self.tier.start_in(rid, r.device_slots(), 0, None, self.now)
        self._apply([ev.RotationStarted(rid, self.now, False)])

    def _moving_out(self) -> bool:
        assert self.tier is not None
        return any(self.tier.state(rid) is TierState.ROTATING_OUT for rid in self.away)

    # --- the server's batches ------------------------------------------------------------------
    def _prefill(self, budget: int | None) -> bool:
        """One prefill batch the way SGLang's PrefillAdder forms it with chunked prefill on: the
        chunked request first (even without memory to spare), then the queue in order while
        memory allows and any of the token limit remains; the request that meets the chunk size
        is cut there and its rest runs next batch. Under RotaSched the adapter shows SGLang only
        the plan's admissions, under a limit no larger than the budget; 0 hides the queue
        (decode first)."""
        g = self.gpu
        limit, hide = g.max_prefill_tokens, False
        if budget is not None:
            hide = budget == 0 and bool(self.running)
            if hide and not self.chunked:
                self.stats["decode_first"] += 1
                return False
            limit = min(limit, max(budget, 256))
        room = self.cap - self.used() - self.reservation()
        batch: list[tuple[SimReq, int]] = []
        mix = list(self.running) if self.mixed else []
        rem_input, rem_chunk = limit, g.chunked_prefill_size - len(mix)
        shown = [] if hide else [r for r in self.waiting if r is not self.chunked
                                 and (not self.admitted or r.rid in self.admitted)]
        queue = ([self.chunked] if self.chunked else []) + shown
        for r in queue:
            need = r.to_prefill()
            forced = r is self.chunked
            reserve = min(r.spec.output_len, CLIP_NEW_TOKENS)
            if not forced and need + reserve > room:
                break
            take = min(need, rem_chunk)
            batch.append((r, take))
            rem_input, rem_chunk = rem_input - take, rem_chunk - take
            room -= take + (0 if forced else reserve)  # SGLang books a new request's whole output
            if take < need or rem_input <= 0 or rem_chunk <= 0:
                break
        tokens = sum(take for _, take in batch)
        if not batch:
            return False
        if mix and room < len(mix):
            mix = []  # no room for the decode tokens: SGLang's own decode step retracts
        self._observe("prefill", [r for r in self.waiting
                                  if r is not self.chunked and all(r is not b for b, _ in batch)])
        dur = g.prefill_s(tokens, sum(g.attn_pairs(take, r.prefilled) for r, take in batch))
        if mix:
            dur += self._decode_step_s(mix) - g.decode_base_s
        self.now += dur
        self.costs.observe_prefill(tokens + len(mix), dur)
        self.last_was_decode = False
        self.stats["prefill_batches"] += 1
        self.stats["prefill_tokens"] += tokens
        self.chunked = None
        events: list[ev.Event] = []
        for r, take in batch:
            r.prefilled += take
            r.kv += take
            if r in self.waiting:
                self.waiting.remove(r)
            if r.to_prefill() > 0:
                self.chunked = r
                events.append(ev.PrefillChunked(r.rid, self.now))
                continue
            if not r.token_times:
                r.token_times.append(self.now)
            events.append(ev.PrefillDone(r.rid, self.now, r.kv, r.out))
            events += self._after_token(r)
        if mix:
            self.stats["mixed_decode_tokens"] += len(mix)
            events.append(ev.Decoded(tuple(r.rid for r in mix)))
            for r in mix:
                r.kv += 1
                r.token_times.append(self.now)
                events += self._after_token(r)
        self._apply(events)
        return True

    def _decode(self) -> bool:
        if not self.running:
            return False
        while self.running and self.cap - self.used() < len(self.running):
            victim = max(self.running, key=lambda r: r.out)  # SGLang retracts the longest output
            self.running.remove(victim)
            victim.kv, victim.prefilled = 0, 0
            self.waiting.insert(0, victim)
            self.ratio.retracted()
            self.stats["retractions"] += 1
            if self.tier is not None:
                self.tier.drop(victim.rid)  # its KV is recomputed: a kept copy would be stale
            self._apply([ev.Requeued(victim.rid, self.now, victim.to_prefill(), victim.out)])
        if not self.running:
            return False
        self._observe("decode", self.waiting)
        dur = self._decode_step_s(self.running)
        self.now += dur
        if self.last_was_decode:
            self.costs.observe_decode(dur, len(self.running), sum(r.kv for r in self.running))
        self.last_was_decode = True
        self.ratio.decode()
        self.stats["decode_steps"] += 1
        batch = list(self.running)
        events: list[ev.Event] = [ev.Decoded(tuple(r.rid for r in batch))]
        for r in batch:
            r.kv += 1
            r.token_times.append(self.now)
            events += self._after_token(r)
        self._apply(events)
        return True

    def _decode_step_s(self, batch: list[SimReq]) -> float:
        """A decode step of ``batch`` now, slowed by the copies running each way for the part
        of the step they run. (Charging the whole step for any copy still running at its
        start made a fast link look slow: a 4 ms copy cost a 30 ms step ~90% more at 450
        GB/s, and a faster link lost TBT attainment.)"""
        base = self.gpu.decode_s(len(batch), sum(r.kv for r in batch))
        if self.mover is None:
            return base
        d2h, h2d = (min(max(self.mover.busy_until(to_host) - self.now, 0.0), base) / base
                    for to_host in (True, False))
        return base * (1 + self.gpu.copy_slowdown(d2h, h2d))

    def _after_token(self, r: SimReq) -> list[ev.Event]:
        """A finished request leaves (its events); an unfinished one decodes from now on."""
        if r.done:
            if r in self.running:
                self.running.remove(r)
            r.kv = 0
            return [ev.Finished(r.rid)]
        if r not in self.running:
            self.running.append(r)
        return []


def simulate(specs: list[RequestSpec], system: str, cap: int, gpu: GpuModel, ttft_slo: float,
             tbt_slo: float, host_tokens: int, horizon_s: float, overlap: bool = True,
             settings: dict[str, Any] | None = None) -> dict:
    """One replay; ``settings``: RotaConfig fields for rotasched (a diagnostic's variants)."""
    sim = Simulator(specs, system, cap, gpu, ttft_slo, tbt_slo, host_tokens, horizon_s, overlap,
                    settings)
    records = sim.run()
    if sim.tier is not None:
        sim.tier.check()  # every host page has one owner
    # What is still held once every request is done: anything but zeros is a leak.
    held = {"device_tokens": sim.used(),
            "host_tokens": sim.tier.used_tokens() if sim.tier is not None else 0,
            "table_entries": len(sim.policy) if sim.policy is not None else 0}
    sim._observe("idle", [])  # charge the last batch
    binding = sim.binding.take_window()
    return {"summary": summarize(records, ttft_slo, tbt_slo),
            "stats": {**sim.all_stats(), "held_at_end": held},
            "binding": binding.as_dict(),
            "sim_seconds": round(sim.now, 2), "records": records}


def _write_raw(raw_dir: Path, system: str, rate: float, records: list[dict]) -> dict:
    path = raw_dir / f"{system}_rate{rate:g}.jsonl"
    write_jsonl(path, records)
    return {"path": str(path), "n": len(records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--cap", type=int, required=True, help="device KV tokens")
    ap.add_argument("--rates", type=float, nargs="+", required=True)
    ap.add_argument("--num", type=int, default=300)
    ap.add_argument("--arrival", default="poisson", choices=("poisson", "gamma", "trace"))
    ap.add_argument("--cv", type=float, default=1.0,
                    help="gamma arrivals: gap coefficient of variation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1,
                    help="arrival draws per point (seed, seed+1, ...): figures are their means, "
                         "since one draw can move attainment by several points; raw records come "
                         "from the first")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tbt-slo", type=float, default=0.1)
    ap.add_argument("--host-kv-gb", type=float, default=64.0,
                    help="host tier size, like --rota-host-kv-gb")
    ap.add_argument("--horizon", type=float, default=600.0,
                    help="simulated seconds before giving up")
    ap.add_argument("--mover", choices=MOVERS, default="staging",
                    help="KV data path whose decode-step cost the model charges "
                         "(rotasched's --rota-mover)")
    ap.add_argument("--model", default=None,
                    help="simulate this model's GPU profile (eval/models/MODEL/profile_GPU.json, "
                         "from eval.profile_model); default: the built-in H200 Llama-3.1-8B")
    ap.add_argument("--gpu", default=None, help="the profile's GPU, e.g. h100, h200, h100-tp2")
    ap.add_argument("--link-gbps", type=float, default=None,
                    help="host link GB/s each way (default 50: PCIe Gen5 as measured on the H200)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="model a server run with --disable-overlap-schedule (arrivals seen at "
                    "the next plan, not the one after)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--raw-dir", type=Path,
                    help="also write per-request records (JSON lines) here, "
                    "for plot_slo.py's TTFT CDF")
    args = ap.parse_args()
    if args.cap <= 0 or any(r <= 0 for r in args.rates) or args.host_kv_gb <= 0 or args.seeds < 1:
        ap.error("--cap, --rates, --host-kv-gb and --seeds must be positive")
    if args.link_gbps is not None and args.link_gbps <= 0:
        ap.error("--link-gbps must be positive")
    try:
        gpu = resolve_gpu_model(args.model, args.gpu, mover=args.mover,
                                link_bytes_per_s=args.link_gbps and args.link_gbps * 1e9)
    except ProfileNotFound as e:
        ap.error(str(e))
    rows = load_azure(args.trace)
    host_tokens = int(args.host_kv_gb * 1e9) // gpu.bytes_per_token
    if host_tokens < HOST_PAGE:
        ap.error(f"--host-kv-gb must hold at least one host page ({HOST_PAGE} tokens)")
    # Same keys as sweep_slo.py's results, so plot_slo.py draws it too.
    trace = Path(args.trace).stem.replace("AzureLLMInferenceTrace_", "azure_")
    result = {"trace": trace + " (simulated)", "trace_path": args.trace,
              "gpu": f"modelled {gpu.gpu_name}", "model": gpu.model_name,
              "cap_tokens": args.cap, "rates": args.rates,
              "num_requests": [args.num] * len(args.rates),
              "arrival": args.arrival, "cv": args.cv, "ttft_slo": args.ttft_slo,
              "tbt_slo": args.tbt_slo,
              "gpu_model": asdict(gpu), "host_kv_gb": args.host_kv_gb, "seeds": args.seeds,
              "overlap": not args.no_overlap,
              "systems": {}, "command": command_line("eval.sim_policy"),
              "note": ("eval.sim_policy: the real policy on a modelled GPU; estimates, "
                       "not measurements")}
    keys = ("ttft_attainment", "tbt_attainment", "both_attainment", "throughput_tok_s", "ttft_p50",
            "ttft_p99")
    t0 = time.monotonic()
    for system in args.systems:
        per = result["systems"].setdefault(system, {**{k: [] for k in keys}, "stats": [], "raw": [],
                                                    "per_seed": []})
        for rate in args.rates:
            runs = [simulate(make_specs(rows, num=args.num, arrival=args.arrival, rate=rate,
                                        cv=args.cv,
                                        seed=args.seed + k),
                             system, args.cap, gpu, args.ttft_slo, args.tbt_slo, host_tokens,
                             args.horizon, overlap=not args.no_overlap)
                    for k in range(args.seeds)]
            s = {k: statistics.mean(r["summary"][k] for r in runs) for k in keys}
            for k in keys:
                per[k].append(s[k])
            res = runs[0]
            per["stats"].append(res["stats"])
            per["per_seed"].append([{k: r["summary"][k] for k in keys} | {"stats": r["stats"]}
                                    for r in runs])
            per["raw"].append(_write_raw(args.raw_dir, system, rate, res["records"])
                              if args.raw_dir else None)
            print(f"{system:>14} @ {rate:g} req/s: TTFT {100 * s['ttft_attainment']:5.1f}%  "
                  f"TBT {100 * s['tbt_attainment']:5.1f}%  {s['throughput_tok_s']:6.0f} tok/s  "
                  f"[{time.monotonic() - t0:.0f}s] {res['stats']}",
                  flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
