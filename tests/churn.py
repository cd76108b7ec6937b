"""A scheduler loop of real SGLang parts on the CPU, driven by random traffic: arrivals,
client aborts (waiting, running or rotated out), SGLang's own admission (PrefillAdder) and
decode retraction, and a Rotator deciding every step. Only the model forward is the stand-in
``SchedulerParts`` has. Every idle period checks what a leak would break (pools back at their
initial free size, an empty table, the rotator's self-check) and takes a sample of the
process's size, so a long run shows whether anything grows.

``tests/test_rotation_churn.py`` runs it briefly; ``SUPERINFER_CHURN_S=1800 pytest
tests/test_rotation_churn.py -k long`` runs it for that many seconds (issue 17's long soak,
on the rotation engine alone: no GPU, no server).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import resource
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import sglang_parts
from sglang_parts import SchedulerParts

from superinfer.adapters.sglang import binding_probe, compat, rotator
from superinfer.adapters.sglang.rotator import Rotator
from superinfer.config import parse_request_slo

# What a step costs on the virtual clock: a GPU's orders of magnitude, not this stand-in's.
DECODE_S, PREFILL_BASE_S, PREFILL_PER_TOKEN_S, IDLE_S = 0.025, 0.010, 2e-5, 0.005
STALL_STEPS = 20_000  # steps with requests live and none ending: something is stuck


class VirtualClock:
    """Model time for the loop: each decode step, prefill and idle iteration advances it as a
    GPU's would, so deadlines, measured costs and the policy's decisions do not hang on how
    fast this CPU runs the stand-in (runs still differ a little: the host tier's copies land
    on their own threads' time)."""

    def __init__(self) -> None:
        self.t = time.monotonic()  # on from the real clock: the rotator has read it already

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@contextlib.contextmanager
def virtual_time(clock: VirtualClock) -> Iterator[None]:
    """The rotator, its binding probe and the scheduler stand-in read ``clock``; the rotator
    still times its own steps on the real clock."""
    fake = types.SimpleNamespace(monotonic=clock.monotonic, time=clock.monotonic,
                                 perf_counter=time.perf_counter)
    modules = (rotator, binding_probe, sglang_parts)
    saved = [m.time for m in modules]
    for m in modules:
        m.time = fake
    try:
        yield
    finally:
        for m, t in zip(modules, saved, strict=True):
            m.time = t


@dataclasses.dataclass
class ChurnReport:
    steps: int = 0
    arrived: int = 0
    finished: int = 0
    aborted: int = 0  # by the client, in any phase
    retracted: int = 0  # by SGLang's decode retraction
    idle_checks: int = 0
    samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def max_rss_mb() -> float:
    """The process's peak resident size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def churn(parts: SchedulerParts, rot: Rotator, *, requests: int | None = None,
          seconds: float | None = None, seed: int = 0, burst_every: int = 60,
          abort_p: float = 0.01, prompt: tuple[int, int] = (16, 160),
          output: tuple[int, int] = (4, 64), sample_every_s: float = 10.0,
          clock: VirtualClock | None = None) -> ChurnReport:
    """Serve random traffic until ``requests`` have arrived (or ``seconds`` passed) and all are
    done. Arrivals come in bursts of a few every ``burst_every`` steps on average; each step a
    live request is aborted with probability ``abort_p``. Every idle period is checked; one
    every ``sample_every_s`` (and the last) is sampled (a full garbage collection: slow).
    ``clock``: run on that virtual clock (else the real one, as a server does)."""
    if (requests is None) == (seconds is None):
        raise ValueError("give requests or seconds")
    if clock is None:
        return _churn(parts, rot, requests, seconds, seed, burst_every, abort_p, prompt, output,
                      sample_every_s, lambda _s: None)
    with virtual_time(clock):
        return _churn(parts, rot, requests, seconds, seed, burst_every, abort_p, prompt, output,
                      sample_every_s, clock.advance)


def _churn(parts: SchedulerParts, rot: Rotator, requests: int | None, seconds: float | None,
           seed: int, burst_every: int, abort_p: float, prompt: tuple[int, int],
           output: tuple[int, int], sample_every_s: float,
           spend: Callable[[float], None]) -> ChurnReport:
    rng = random.Random(seed)
    report = ChurnReport()
    running = parts.empty_batch()
    start = time.monotonic()

    def arrivals_open() -> bool:
        if requests is not None:
            return report.arrived < requests
        return time.monotonic() - start < seconds

    ended_at = (0, 0)  # (requests ended so far, the step that ended the last of them)
    while True:
        report.steps += 1
        ended = report.finished + report.aborted
        if ended > ended_at[0] or ended == report.arrived:  # progress, or nothing live
            ended_at = (ended, report.steps)
        elif report.steps - ended_at[1] > STALL_STEPS:
            raise AssertionError(f"no request ended in {STALL_STEPS} steps: {_state(parts, rot)}")
        if arrivals_open() and rng.random() < 1 / burst_every:
            for _ in range(rng.randint(1, 8)):
                req = parts.make_req(f"c{seed}-{report.arrived}", rng.randint(*prompt),
                                     max_new_tokens=rng.randint(*output))
                # half stop at a length they do not announce (no ignore_eos): SGLang reserves
                # only part of their output (0.5.22+ reserves all of a fixed-length one's), so
                # decode can run out of memory and retract
                req.sampling_params.ignore_eos = rng.random() < 0.5
                report.arrived += 1
                parts.waiting_queue.append(req)
                rot.on_enqueue(req, parse_request_slo(None, rot.config))
        if rng.random() < abort_p:
            report.aborted += _abort_one(parts, rot, running, rng)
        running = rot.step(running)
        admitted = None
        with rot.pacer.paced_prefill(rot.streams_decoding):  # as the hook wraps SGLang's choice
            if parts.waiting_queue:
                admitted = parts.prefill(list(parts.waiting_queue), running)
            if admitted is not None:
                taken = {r.rid for r in admitted.reqs}
                parts.waiting_queue = [r for r in parts.waiting_queue if r.rid not in taken]
        if admitted is not None:
            spend(PREFILL_BASE_S + PREFILL_PER_TOKEN_S * (admitted.extend_num_tokens or 0))
            rot.on_batch_result(admitted)
            if running.is_empty():
                running = admitted
            else:
                running.merge_batch(admitted)
        if not running.is_empty():
            report.retracted += _retract_if_full(parts, rot, running)
        if running.is_empty():
            spend(IDLE_S)
        else:
            parts.decode_step(running)
            spend(DECODE_S)
            # SGLang's result processing: an abort (to_finish: a client's, or one that reached
            # a request while its KV was coming back) ends it, else its length does
            aborted = {r.rid for r in running.reqs if r.to_finish is not None}
            done = aborted | {r.rid for r in running.reqs
                              if len(r.output_ids) >= r.sampling_params.max_new_tokens}
            report.finished += len(done - aborted)
            parts.finish(running, done)
            rot.on_batch_result(running)
            running.filter_batch()
        if running.is_empty() and not parts.waiting_queue and not rot.busy():
            rot.on_idle()
            rot._idle_checked = False  # what a scheduler's next request does: re-armed
            _check_idle(parts, rot)
            report.idle_checks += 1
            closing = not arrivals_open()
            if not closing and report.samples and (
                    time.monotonic() - start - report.samples[-1]["t_s"] < sample_every_s):
                continue
            gc.collect()
            report.samples.append({"t_s": round(time.monotonic() - start, 1),
                                   "arrived": report.arrived, "max_rss_mb": max_rss_mb(),
                                   "gc_objects": len(gc.get_objects()), "table": len(rot.policy),
                                   "host_free": rot.tier.pages.available_size(),
                                   "device_free": parts.free_tokens(),
                                   "rotations_out": rot.stats.rotations_out})
            if closing:
                return report


def _abort_one(parts: SchedulerParts, rot: Rotator, running: Any, rng: random.Random) -> int:
    """Abort one live request the way SGLang's abort_request does, then the rotator's hook."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    live = ([r.rid for r in parts.waiting_queue]
            + [r.rid for r in running.reqs if r.to_finish is None]
            + [rid for rid in rot.away if not rot.tier.dropped(rid)])  # not aborted already
    if not live:
        return 0
    rid = rng.choice(live)
    parts.waiting_queue = [r for r in parts.waiting_queue if r.rid != rid]
    for r in running.reqs:
        if r.rid == rid:
            r.to_finish = FINISH_ABORT()  # the next step's result processing ends it
    rot.on_abort(rid, abort_all=False)
    return 1


def _retract_if_full(parts: SchedulerParts, rot: Rotator, running: Any) -> int:
    """SGLang's decode out-of-memory path: retract, and the retracted wait again."""
    if running.check_decode_mem():
        return 0
    retracted, _, aborted = compat.retract_decode(running, parts.server_args)
    assert not aborted, "a request too long for the whole pool was generated"
    for req in retracted:
        parts.waiting_queue.append(req)
        rot.on_enqueue(req, parse_request_slo(None, rot.config))
    return len(retracted)


def _state(parts: SchedulerParts, rot: Rotator) -> str:
    table = rot.policy.table
    return (f"waiting {[r.rid for r in parts.waiting_queue]}, away {list(rot.away)}, "
            f"table {[(rid, table.phase_of(rid).name) for rid in table.all_ids()]}, "
            f"device free {parts.free_tokens()} of {parts.initial_free}, host free "
            f"{rot.tier.pages.available_size()} of {rot.initial_host_tokens}")


def _check_idle(parts: SchedulerParts, rot: Rotator) -> None:
    from test_rotation_sglang import assert_pools_initial

    assert_pools_initial(parts, rot)  # device and host pools, table, the rotator's self-check
    assert not rot.away, "requests left away from the batch"
