"""Rotation against real SGLang objects on the CPU: pools, allocators, radix/chunk cache,
FutureMap and ScheduleBatch (see sglang_parts.py). Only the model forward is stood in for."""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from sglang_parts import SchedulerParts

from superinfer.adapters.sglang import compat, translate
from superinfer.adapters.sglang.pacing import joins_running
from superinfer.adapters.sglang.rotator import Rotator
from superinfer.adapters.sglang.stats import parse_records
from superinfer.adapters.sglang.tp_sync import TpAgreement
from superinfer.config import ConfigError, RotaConfig, parse_request_slo
from superinfer.host_tier.direct import mover_path
from superinfer.host_tier.manager import TierState
from superinfer.policy import Capacity, CostModel, Phase, StepSnapshot
from superinfer.policy.events import Finished

CONFIGS = [(1, True), (1, False), (16, True), (16, False)]
LLAMA_DIR = Path(__file__).resolve().parents[1] / "eval" / "models" / "llama-3.1-8b"
# The direct mover (page-major host pool, page copies; memmove on the CPU) on the same parts.
MOVER_CONFIGS = [(p, r, "auto") for p, r in CONFIGS] + [(16, True, "direct"), (16, False, "direct"),
                                                         (1, True, "direct")]


def fresh(size: int = 1024, page_size: int = 1, radix: bool = True, kv: str = "mha", **config):
    """Real SGLang parts and a Rotator on them, its clock started as the first iteration does."""
    parts = SchedulerParts(size=size, page_size=page_size, radix=radix, kv=kv)
    rot = Rotator(parts, RotaConfig(**config))
    rot.step(parts.empty_batch())
    return parts, rot


def enqueue(parts, rot, *reqs) -> None:
    """Requests arrive: into SGLang's waiting queue and the rotator's table (as the hook does)."""
    for r in reqs:
        parts.waiting_queue.append(r)
        rot.on_enqueue(r, parse_request_slo(r.sampling_params.custom_params, rot.config))


def prefill_and_decode(parts, rot, reqs, steps: int):
    """Prefill ``reqs`` as one batch, then ``steps`` decode steps, each result reported."""
    enqueue(parts, rot, *reqs)
    batch = parts.prefill(reqs)
    parts.waiting_queue.clear()
    rot.on_batch_result(batch)
    for _ in range(steps):
        parts.decode_step(batch)
        rot.on_batch_result(batch)
    return batch


def setup(page_size: int, radix: bool, n: int = 3, prompt: int = 40, host_gb: float = 0.0004,
          mover: str = "auto", kv: str = "mha"):
    parts, rot = fresh(page_size=page_size, radix=radix, host_kv_gb=host_gb, mover=mover, kv=kv)
    reqs = [parts.make_req(f"r{i}", prompt + 7 * i, max_new_tokens=64) for i in range(n)]
    return parts, rot, prefill_and_decode(parts, rot, reqs, steps=3)


def finish_all(parts, rot, batch):
    parts.finish(batch)
    rot.on_batch_result(batch)
    batch.filter_batch()


def finish_and_check_pools(parts, rot, batch):
    """Every request finishes; one more step drops what was kept for them; pools are whole."""
    finish_all(parts, rot, batch)
    rot.step(batch)
    assert_pools_initial(parts, rot)


def assert_pools_initial(parts, rot):
    assert parts.free_tokens() == parts.initial_free
    assert parts.tree_cache.protected_size() == 0
    assert rot.tier.pages.available_size() == rot.initial_host_tokens
    assert len(rot.policy) == 0 and not rot.busy()
    rot.check()


@pytest.mark.parametrize("kv", ["mha", "mla"])
@pytest.mark.parametrize("page_size,radix,mover", MOVER_CONFIGS)
def test_round_trip_restores_every_kv_byte(page_size, radix, mover, kv):
    parts, rot, batch = setup(page_size, radix, mover=mover, kv=kv)
    assert type(rot.tier.mover).__name__ == ("DirectKVMover" if mover == "direct" else "TorchMover")
    assert rot.tier.pages.page_major == (mover == "direct")
    assert rot.tier.pages.page_size == (page_size if mover == "direct" else 16)
    before = {r.rid: parts.kv_of(r) for r in batch.reqs}
    batch = rot.rotate_out(batch, {"r1"})
    assert [r.rid for r in batch.reqs] == ["r0", "r2"]
    assert rot.policy.table.phase_of("r1") is Phase.ROTATING_OUT
    batch = rot.step(batch)  # copy done -> device released -> plenty of room -> rotate-in planned
    assert rot.policy.table.phase_of("r1") is Phase.ROTATING_IN
    batch = rot.step(batch)  # copy back done -> rejoins as a decode request
    r1 = next(r for r in batch.reqs if r.rid == "r1")
    assert torch.equal(parts.kv_of(r1), before["r1"])
    assert rot.stats.rotations_out == 1 and rot.stats.rotations_in == 1
    # The rejoined request decodes on: SGLang allocates its next slot and reads its last token
    # from the FutureMap relay at its new request slot.
    last = r1.output_ids[-1]
    assert int(parts.future_map.output_tokens_buf[compat.req_pool_idx(r1)]) == last
    parts.decode_step(batch)
    rot.on_batch_result(batch)
    assert compat.kv_committed_len(r1) == len(r1.origin_input_ids) + len(r1.output_ids) - 1
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


def test_the_served_models_decode_profile_is_found_and_recorded(caplog, tmp_path):
    """--rota-decode-profile auto: the shipped profile of the model's shape (SGLang's hf_config);
    'off': none; a file that is not a profile stops the scheduler naming the flag."""
    from transformers import AutoConfig

    def start(**config):
        parts = SchedulerParts(size=256)
        parts.model_config.hf_config = AutoConfig.from_pretrained(LLAMA_DIR)
        caplog.clear()
        with caplog.at_level("INFO", logger="superinfer"):
            rot = Rotator(parts, RotaConfig(**config))
        (record,) = [r for r in parse_records(caplog.text) if r["kind"] == "start"]
        return rot, record["decode_profile"]

    rot, source = start()
    assert source == "llama-3.1-8b on h100 (shape only: no profile for this device)"
    assert rot.costs.costs().decode_profile is not None
    # each measured step calibrates the profile against the batch it ran (streams, KV read)
    parts = rot.scheduler
    rot.step(parts.empty_batch())
    reqs = [parts.make_req(f"r{i}", 30 + i, max_new_tokens=16) for i in range(3)]
    batch = prefill_and_decode(parts, rot, reqs, steps=3)
    assert translate.decode_kv_tokens(batch) == sum(
        len(r.origin_input_ids) + len(r.output_ids) for r in batch.reqs)
    assert rot._last_decode_shape[0] == 3
    assert rot.costs.costs().decode_calibration != 1.0  # CPU steps are not an H100's
    rot, source = start(decode_profile="off")
    assert source == "none" and rot.costs.costs().decode_profile is None
    bad = tmp_path / "p.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="--rota-decode-profile"):
        start(decode_profile=str(bad))


def test_stats_record_carries_the_policys_cost_estimates(caplog):
    parts, rot, batch = setup(1, True)
    batch = rot.rotate_out(batch, {"r0"})
    with caplog.at_level("INFO", logger="superinfer"):
        rot._report()
    (record,) = [r for r in parse_records(caplog.text) if r["kind"] == "stats"]
    costs = rot.costs.costs()
    assert record["rotations_out"] == 1
    assert record["costs"]["decode_step_ms"] == pytest.approx(costs.decode_step_s * 1e3, abs=1e-3)
    assert set(record["costs"]) == {"decode_step_ms", "prefill_us_per_token",
                                    "prefill_overhead_ms", "d2h_gb_per_s", "h2d_gb_per_s",
                                    "arrivals_per_s", "mean_prompt_tokens"}
    rot._collect(batch)
    rot.on_abort("r0", abort_all=False)  # parked: let it go, and leave the pools as they were
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


@pytest.mark.parametrize("page_size,radix,mover", MOVER_CONFIGS)
def test_abort_while_parked_frees_host_and_device(page_size, radix, mover):
    parts, rot, batch = setup(page_size, radix, mover=mover)
    rot.config = rot.config  # the default policy would bring r0 back: park it by hand
    batch = rot.rotate_out(batch, {"r0"})
    rot._collect(batch)
    assert rot.policy.table.phase_of("r0") is Phase.ON_HOST
    rot.on_abort("r0", abort_all=False)
    assert parts.sent and parts.sent[-1].rid == "r0"
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)
    assert rot.stats.aborted_while_rotated == 1


@pytest.mark.parametrize("page_size,radix", CONFIGS[:2])
def test_abort_while_copying_out(page_size, radix):
    parts, rot, batch = setup(page_size, radix)
    batch = rot.rotate_out(batch, {"r2"})
    rot.on_abort("r2", abort_all=False)  # arrives before the copy is reported done
    batch = rot.step(batch)
    assert "r2" not in rot.policy and not rot.busy()
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


def test_victim_finished_by_the_step_in_flight_is_not_released_twice():
    parts, rot, batch = setup(1, True)
    victim = batch.reqs[0]
    batch = rot.rotate_out(batch, {victim.rid})
    # The forward that was in flight produced the victim's last token: SGLang finishes and
    # releases it while its device->host copy is pending.
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    in_flight = ScheduleBatch(reqs=[victim], batch_is_full=False)
    parts.finish(in_flight)
    batch = rot.step(batch)
    assert victim.rid not in rot.policy
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


def test_full_host_tier_falls_back_to_sglang():
    parts, rot, batch = setup(1, True, host_gb=0.000004)  # ~20 tokens of host tier
    batch = rot.rotate_out(batch, {"r0"})
    assert [r.rid for r in batch.reqs] == ["r0", "r1", "r2"]
    assert rot.stats.fallbacks == 1 and rot.stats.rotations_out == 0
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


def test_policy_driven_rotation_under_memory_pressure(monkeypatch):
    """No hand-picked victims: the policy rotates to admit a new request that does not fit,
    brings the victims back, and everything drains to the initial pool sizes."""
    parts, rot = fresh(size=512, host_kv_gb=0.001, reserve_window_s=0.0)
    # Decode steps priced as a GPU's (the default 25 ms), not as this test's microseconds: at
    # those the running streams would finish before the newcomer's deadline on their own, and
    # room that comes in time anyway moves no bytes.
    monkeypatch.setattr(CostModel, "observe_decode", lambda self, *measured: None)
    reqs = [parts.make_req(f"r{i}", 120, max_new_tokens=40) for i in range(3)]
    running = prefill_and_decode(parts, rot, reqs, steps=2)
    rot.policy.table.first_token_s[:] += 5.0  # far ahead of their 0.1 s pace: plenty of slack
    enqueue(parts, rot, parts.make_req("new", 200, max_new_tokens=8))
    # Due in 0.5 s, before the running streams' 37 tokens to go (0.9 s): only a rotation
    # admits it in time.
    rot.policy.table.ttft_slo_s[rot.policy.table.row("new")] = 0.5
    saw_rotation, rotating_steps = False, 0
    for _ in range(200):
        before = rot.stats.rotations_out
        running = rot.step(running)
        saw_rotation |= rot.stats.rotations_out > 0
        rotating_steps += rot.stats.rotations_out > before
        if parts.waiting_queue:
            admitted = parts.prefill(list(parts.waiting_queue), running)
            if admitted is not None:
                parts.waiting_queue.clear()
                rot.on_batch_result(admitted)
                running.merge_batch(admitted) if not running.is_empty() else None
                running = admitted if running.is_empty() else running
        if not running.is_empty():
            parts.decode_step(running)
            done = {r.rid for r in running.reqs
                    if len(r.output_ids) >= r.sampling_params.max_new_tokens}
            parts.finish(running, done)
            rot.on_batch_result(running)
            running.filter_batch()
        if running.is_empty() and not parts.waiting_queue and not rot.busy():
            break
    assert saw_rotation and rot.stats.rotations_in == rot.stats.rotations_out
    # One newcomer needed room once: one rotation, not a swap cycle (was 8 before the
    # non-urgent rule, with one request rotated 4 times). SGLang 0.5.22+ keeps a fixed-length
    # stream's whole remaining output free, so the room takes two victims there.
    assert rotating_steps == 1
    assert rot.stats.rotations_out == (1 if compat.fixed_length_reservation_ratio() is None else 2)
    assert_pools_initial(parts, rot)


def test_a_rotation_the_host_tier_cannot_take_is_counted(monkeypatch):
    """The newcomer of the test above, with a host tier of a few tokens: no rotation, the
    plan counted as host-full (SGLang's own admission and retraction take over)."""
    parts, rot = fresh(size=512, host_kv_gb=0.000004, reserve_window_s=0.0)
    monkeypatch.setattr(CostModel, "observe_decode", lambda self, *measured: None)
    reqs = [parts.make_req(f"r{i}", 120, max_new_tokens=40) for i in range(3)]
    running = prefill_and_decode(parts, rot, reqs, steps=2)
    rot.policy.table.first_token_s[:] += 5.0
    enqueue(parts, rot, parts.make_req("new", 200, max_new_tokens=8))
    rot.policy.table.ttft_slo_s[rot.policy.table.row("new")] = 0.5
    running = rot.step(running)
    assert rot.stats.plans_host_full == 1 and rot.stats.rotations_out == 0
    assert rot.stats.fallbacks == 0  # the plan never asked for what the tier cannot hold
    parts.waiting_queue.clear()
    rot.policy.update([Finished("new")])
    finish_all(parts, rot, running)
    assert_pools_initial(parts, rot)


def hooked(**config):
    """Parts whose ``_add_request_to_queue`` goes through the hook, with a rotator of
    ``config`` (``streamed``: what went back to the client at once)."""
    parts, rot = fresh(**config)
    parts._superinfer_rotator = rot
    streamed = []
    parts.output_streamer = type("S", (),
                                 {"stream_output": lambda self, reqs, lp: streamed.extend(reqs)})()
    return parts, rot, streamed


def add_through_hook(parts, *reqs) -> None:
    from superinfer.adapters.sglang import hooks

    def original(scheduler, req, is_retracted=False):
        scheduler.waiting_queue.append(req)

    for req in reqs:
        hooks._add_request_to_queue(original, parts, req)


def test_bad_per_request_slo_is_rejected_with_400():
    parts, rot, streamed = hooked(min_request_slo_ratio=0.05)
    bad = parts.make_req("bad", 10, custom_params={"ttft_slo": -1})
    typo = parts.make_req("typo", 10, custom_params={"ttft_sloo": 0.25})
    ok = parts.make_req("ok", 10, custom_params={"ttft_slo": 0.25, "tbt_slo": 0.05})
    add_through_hook(parts, bad, typo, ok)
    assert streamed == [bad, typo]
    assert all(r.finished_reason.status_code == 400 for r in streamed)
    assert "ttft_slo" in bad.finished_reason.message
    assert "custom_params.ttft_sloo is not a known key" in typo.finished_reason.message
    assert parts.waiting_queue == [ok]
    assert "bad" not in rot.policy.table and "typo" not in rot.policy.table
    view = rot.policy.table.view("ok")
    assert (view.ttft_slo_s, view.tbt_slo_s) == (0.25, 0.05)


def test_tighter_per_request_slo_is_clamped_to_the_floor_by_default():
    """The default (clamp, ratio 1.0): an abusive client is queued, at the server's SLOs."""
    parts, rot, streamed = hooked(ttft_slo_s=1.0, tbt_slo_s=0.1)
    abuser = parts.make_req("abuser", 10, custom_params={"ttft_slo": 0.001, "tbt_slo": 1e-6})
    patient = parts.make_req("patient", 10, custom_params={"ttft_slo": 30.0, "tbt_slo": 0.5})
    add_through_hook(parts, abuser, patient)
    assert streamed == [] and parts.waiting_queue == [abuser, patient]
    view = rot.policy.table.view("abuser")
    assert (view.ttft_slo_s, view.tbt_slo_s) == (1.0, 0.1)
    view = rot.policy.table.view("patient")  # looser values are kept
    assert (view.ttft_slo_s, view.tbt_slo_s) == (30.0, 0.5)
    # An operator's lower floor lets a client tighten down to it, and no further.
    parts, rot, _ = hooked(ttft_slo_s=1.0, tbt_slo_s=0.1, min_request_slo_ratio=0.5)
    add_through_hook(parts, parts.make_req("a", 10, custom_params={"ttft_slo": 0.001,
                                                                   "tbt_slo": 0.08}))
    view = rot.policy.table.view("a")
    assert (view.ttft_slo_s, view.tbt_slo_s) == (0.5, 0.08)


def test_tighter_per_request_slo_is_answered_400_in_reject_mode():
    parts, rot, streamed = hooked(request_slo="reject", min_request_slo_ratio=0.5)
    abuser = parts.make_req("abuser", 10, custom_params={"ttft_slo": 0.001})
    allowed = parts.make_req("allowed", 10, custom_params={"ttft_slo": 0.5, "tbt_slo": 0.2})
    add_through_hook(parts, abuser, allowed)
    assert streamed == [abuser] and abuser.finished_reason.status_code == 400
    message = abuser.finished_reason.message
    assert "custom_params.ttft_slo 0.001" in message and "the floor is 0.5 s" in message
    assert parts.waiting_queue == [allowed] and "abuser" not in rot.policy.table
    view = rot.policy.table.view("allowed")
    assert (view.ttft_slo_s, view.tbt_slo_s) == (0.5, 0.2)


def test_off_mode_serves_every_request_at_the_server_slos():
    parts, rot, streamed = hooked(request_slo="off")
    req = parts.make_req("r", 10, custom_params={"ttft_slo": 0.001, "tbt_slo": 5.0})
    add_through_hook(parts, req)
    assert streamed == [] and parts.waiting_queue == [req]
    view = rot.policy.table.view("r")
    assert (view.ttft_slo_s, view.tbt_slo_s) == (1.0, 0.1)


class OtherRankBehind(TpAgreement):
    """Rank 0 of two whose peer has finished ``peer_done_d2h`` device->host copies."""

    def __init__(self) -> None:
        super().__init__(None)
        self.peer_done_d2h = 0

    def agree(self, now_s, costs, done_d2h, done_h2d):
        mine = super().agree(now_s, costs, done_d2h, done_h2d)
        return dataclasses.replace(mine, done_d2h=min(done_d2h, self.peer_done_d2h), done_h2d=0)


def test_copies_commit_only_when_every_rank_reports_them_done():
    """Under TP each rank moves its own shard; a copy is acted on only once all ranks agree
    (tests/test_tp_sync.py runs the agreement itself on two processes)."""
    parts, rot, batch = setup(1, True)
    rot.tp = OtherRankBehind()
    batch = rot.rotate_out(batch, {"r1"})
    batch = rot.step(batch)  # done here (CPU copies are synchronous), not yet on the other rank
    assert rot.policy.table.phase_of("r1") is Phase.ROTATING_OUT and rot.tier.collect() == (1, 0)
    rot.tp.peer_done_d2h = 1
    batch = rot.step(batch)
    assert rot.policy.table.phase_of("r1") in (Phase.ON_HOST, Phase.ROTATING_IN)


def test_idle_check_is_logged_once_per_idle_period(caplog):
    parts, rot, batch = setup(1, True)
    finish_all(parts, rot, batch)
    with caplog.at_level("INFO", logger="superinfer"):
        rot.on_idle()
        rot.on_idle()  # same idle period: no second line
        enqueue(parts, rot, parts.make_req("again", 30))
        rot.step(parts.empty_batch())  # busy again: re-armed
        parts.waiting_queue.clear()
        rot.policy.update([Finished("again")])
        rot.on_idle()
    idle = [r for r in parse_records(caplog.text) if r["kind"] == "idle"]
    assert len(idle) == 2
    assert idle[0]["device_free"] == 1024 and idle[0]["device_total"] == 1024
    assert idle[0]["table"] == 0
    # the plan counters ride on every idle record, so a replay that never rotates (no stats
    # records) still tells how often prefill waited for a decode step
    assert idle[1]["plans_decode_first"] == rot.stats.plans_decode_first
    assert idle[1]["plans_head_blocked"] == rot.stats.plans_head_blocked
    # and the rotator's own time in the scheduler loop: one more step since the first record
    assert idle[1]["steps"] == idle[0]["steps"] + 1 == rot.stats.steps
    assert 0 < idle[1]["step_us_max"] <= idle[1]["step_us"]


def test_chunked_prefill_request_is_never_a_victim():
    parts, rot = fresh(host_kv_gb=0.0004, reserve_window_s=0.0)
    short, long_ = parts.make_req("short", 30), parts.make_req("long", 300)
    enqueue(parts, rot, short, long_)
    batch = parts.prefill([short, long_], chunk=64)  # "long" is cut after its first chunk
    assert parts.chunked_req is long_
    rot.on_batch_result(batch)
    assert rot.policy.table.phase_of("short") is Phase.RUNNING
    assert rot.policy.table.phase_of("long") is Phase.PREFILLING
    # everyone far ahead of pace: only phase protects "long"
    rot.policy.table.first_token_s[:] += 5.0
    parts.waiting_queue = []
    enqueue(parts, rot, parts.make_req("new", 900))
    cap = Capacity(parts.free_tokens(), 1024, rot.tier.pages.available_size(),
                   rot.tier_spec.bytes_per_token)
    plan = rot.policy.plan(StepSnapshot(rot.now_s, cap, rot.costs.costs(), 16384))
    assert plan.rotate_out == ["short"]


def test_paced_prefill_limits_then_restores_the_scheduler():
    parts, rot, batch = setup(16, True)
    parts.chunked_prefill_size = 8192
    queue = [parts.make_req("w", 10)]
    parts.waiting_queue = list(queue)
    rot.pacer.prefill_budget = 1000
    with rot.pacer.paced_prefill(not batch.is_empty()):
        assert parts.max_prefill_tokens == 992  # page-aligned
        assert parts.chunked_prefill_size == 8192  # chunks run back to back: never shrunk
        assert parts.waiting_queue == queue
    rot.pacer.prefill_budget = 0  # no slack left: decode first, prefill waits
    with rot.pacer.paced_prefill(not batch.is_empty()):
        assert parts.waiting_queue == []
        parts.waiting_queue.append(late := parts.make_req("late", 10))  # arrives meanwhile
    assert (parts.max_prefill_tokens, parts.chunked_prefill_size) == (16384, 8192)
    assert parts.waiting_queue == queue + [late]
    rot.pacer.prefill_budget = None
    with rot.pacer.paced_prefill(not batch.is_empty()):
        assert parts.max_prefill_tokens == 16384


def test_paced_prefill_shows_sglang_only_the_admitted_requests():
    """SGLang's PrefillAdder takes requests while any of its limit remains and cuts the last
    at the chunk size: only the plan's admissions may be visible, in order; the rest come
    back behind them, and a retracted request SGLang appends meanwhile stays last."""
    parts, rot, batch = setup(16, True)
    a, b, c, d = (parts.make_req(r, 10) for r in "abcd")
    parts.waiting_queue = []
    enqueue(parts, rot, a, b, c, d)
    rot.pacer.prefill_budget, rot.pacer.admitted = 1000, ["c", "a"]
    with rot.pacer.paced_prefill(not batch.is_empty()):
        assert parts.waiting_queue == [a, c]  # SGLang's order kept; b and d hidden
        parts.waiting_queue = [c]  # SGLang took a
        parts.waiting_queue.append(late := parts.make_req("late", 10))
    assert parts.waiting_queue == [c, b, d, late]
    # no pacing: the admissions still bound it
    rot.pacer.prefill_budget, rot.pacer.admitted = None, ["d"]
    parts.waiting_queue = [b, d]
    with rot.pacer.paced_prefill(not batch.is_empty()):
        assert parts.waiting_queue == [d]
        assert parts.max_prefill_tokens == 16384
    assert parts.waiting_queue == [d, b]
    stray = parts.make_req("stray", 10)  # queued behind every hook's back: never hidden
    parts.waiting_queue = [b, stray, d]
    with rot.pacer.paced_prefill(not batch.is_empty()):
        assert parts.waiting_queue == [stray, d]


def test_plan_sees_one_chunk_as_the_batch_limit():
    """With chunked prefill on, the policy must not admit more than one chunk's worth, or
    SGLang cuts the last admission and runs its rest in the next batch, budget or not."""
    parts, rot, batch = setup(16, True)
    assert rot.pacer.batch_token_limit() == 16384
    parts.chunked_prefill_size = 8192
    assert rot.pacer.batch_token_limit() == 8192
    parts.chunked_prefill_size = -1  # disabled
    assert rot.pacer.batch_token_limit() == 16384


def test_launch_tells_the_table_what_the_batch_in_flight_will_produce():
    """The overlap scheduler's order: batch N+1 is planned before N's result is processed;
    tokens in flight are counted from SGLang's own queue of unprocessed results."""
    parts, rot, batch = setup(1, True)
    t = rot.policy.table
    parts.result_queue = deque()
    new = parts.make_req("new", 50)
    parts.waiting_queue = []
    enqueue(parts, rot, new)
    batch = rot.step(batch)
    prefill = parts.prefill([new], running=batch)
    parts.waiting_queue.clear()
    rot.on_launch(prefill)
    parts.result_queue.append((prefill.copy(), None))
    slot = t._row_of["new"]
    assert t.phase_of("new") is Phase.PREFILLING
    expected_first = t.first_token_s[slot]
    assert expected_first == pytest.approx(rot.now_s + rot.costs.costs().prefill_s(50))
    # Next iteration: planned with the prefill in flight, then merged and decoded with the rest.
    batch = rot.step(batch)
    assert t.tokens_in_flight[slot] == 1 and t.tokens_in_flight[t._row_of["r0"]] == 0
    batch.merge_batch(prefill)
    parts.decode_step(batch)
    rot.on_launch(batch)
    parts.result_queue.append((batch.copy(), None))
    rot.on_batch_result(parts.result_queue.popleft()[0])  # the prefill's result
    assert t.phase_of("new") is Phase.RUNNING
    assert t.first_token_s[slot] >= expected_first - 1.0
    batch = rot.step(batch)  # the decode step is in flight for everyone
    assert list(t.tokens_in_flight[[t._row_of[r] for r in ("new", "r0")]]) == [1, 1]
    assert list(t.next_token_index(np.array([slot]))) == [t.num_output_tokens[slot] + 1]
    rot.on_batch_result(parts.result_queue.popleft()[0])
    rot.step(batch)
    assert not t.tokens_in_flight.any()
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


def test_sglang_retraction_puts_the_request_back_to_waiting():
    """SGLang's own fallback (retract_decode, recompute later) keeps the table consistent."""
    parts, rot, batch = setup(1, True)
    retracted, _, aborted = compat.retract_decode(batch, parts.server_args)
    assert retracted and not aborted
    for req in retracted:
        parts.waiting_queue.append(req)
        rot.on_enqueue(req, parse_request_slo(req.sampling_params.custom_params, rot.config))
        view = rot.policy.table.view(req.rid)
        assert view.phase is Phase.WAITING
        assert view.num_prompt_tokens == len(req.origin_input_ids) + len(req.output_ids)
    assert rot.stats.requeued == len(retracted)
    parts.waiting_queue.clear()
    for req in retracted:
        # (they would be re-prefilled; not part of this test)
        rot.policy.update([Finished(req.rid)])
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


def test_batch_hook_reads_sglang_next_batch_plan():
    """SGLang 0.5.17's get_next_batch_to_run returns a NextBatchPlan, not the batch."""
    from sglang.srt.managers.schedule_batch import NextBatchPlan

    from superinfer.adapters.sglang import hooks

    parts, rot, batch = setup(1, True)
    parts._superinfer_rotator = rot
    new = parts.make_req("new", 50)
    parts.waiting_queue = []
    enqueue(parts, rot, new)

    def original(scheduler, running_batch, last_batch):
        prefill = parts.prefill(list(scheduler.waiting_queue), running=running_batch)
        scheduler.waiting_queue = []
        return NextBatchPlan(batch_to_run=prefill, running_batch=running_batch)

    plan = hooks._get_next_batch_to_run(original, parts, batch, None)
    assert isinstance(plan, NextBatchPlan) and plan.batch_to_run.reqs == [new]
    assert rot.policy.table.phase_of("new") is Phase.PREFILLING


def test_rotate_in_leaves_room_for_the_chunked_prompt_remainder():
    """SGLang continues a chunked prefill even when memory is gone (and then fails to
    allocate): the rest of that prompt is spoken for, rotate-ins must not take it."""
    parts, rot = fresh(host_kv_gb=0.001, reserve_window_s=0.0)
    batch = prefill_and_decode(parts, rot, [parts.make_req("away", 200)], steps=1)
    batch = rot.rotate_out(batch, {"away"})
    rot._collect(batch)  # copy done: device released, parked on the host
    assert rot.policy.table.phase_of("away") is Phase.ON_HOST
    long_ = parts.make_req("long", 900)
    enqueue(parts, rot, long_)
    first_chunk = parts.prefill([long_], chunk=64)
    parts.waiting_queue = []
    rot.on_batch_result(first_chunk)
    assert parts.chunked_req is long_ and rot.pacer.chunked_remainder() == 900 - 64
    need = 201 + 1  # its KV plus a page
    assert parts.free_tokens() >= need > parts.free_tokens() - 836  # fits on raw free memory...
    rot.rotate_in("away")
    assert rot.policy.table.phase_of("away") is Phase.ON_HOST  # ...but not beside the chunk's rest
    parts.chunked_req = None  # the prompt is done (or aborted): the room is free again
    rot.rotate_in("away")
    assert rot.policy.table.phase_of("away") is Phase.ROTATING_IN


def test_mover_path_auto_rule_and_cpu_fallback():
    llama_row = 8 * 128 * 2  # bytes of one token's K in one layer (Llama-3.1-8B, bf16)
    # 128 KiB: copy engines reach full duplex
    assert mover_path("auto", True, 64 * llama_row) == "direct"
    assert mover_path("auto", True, 16 * llama_row) == "staging"
    assert mover_path("zerocopy", True, 64 * llama_row) == "zerocopy"  # an explicit choice stands
    assert mover_path("auto", False, 64 * llama_row) == "torch"  # no CUDA: plain torch copies
    assert mover_path("staging", False, 64 * llama_row) == "torch"
    assert mover_path("direct", False, 64 * llama_row) == "direct"  # runs on the CPU too (memmove)


def rotate_round_trip(parts, rot, batch, rid: str):
    """Out, then (the policy brings it straight back: plenty of room) in; the batch after."""
    batch = rot.rotate_out(batch, {rid})
    batch = rot.step(batch)
    assert rot.policy.table.phase_of(rid) is Phase.ROTATING_IN
    return rot.step(batch)


def decode(parts, rot, batch, steps: int) -> None:
    for _ in range(steps):
        parts.decode_step(batch)
        rot.on_batch_result(batch)


@pytest.mark.parametrize("page_size,radix,mover", MOVER_CONFIGS)
def test_kept_host_copy_moves_only_the_tail_written_since(page_size, radix, mover):
    parts, rot = fresh(page_size=page_size, radix=radix, host_kv_gb=0.0004, mover=mover,
                       keep_host_copy=True)
    reqs = [parts.make_req(f"r{i}", 40 + 7 * i, max_new_tokens=64) for i in range(3)]
    batch = prefill_and_decode(parts, rot, reqs, steps=3)
    bpt, page = rot.tier_spec.bytes_per_token, rot.tier.pages.page_size
    batch = rotate_round_trip(parts, rot, batch, "r1")
    r1 = next(r for r in batch.reqs if r.rid == "r1")
    kept = rot.kv.kv_len(r1) // page * page  # whole host pages; a partial last one is freed
    assert kept > 0 and rot.tier.host_tokens("r1") == kept
    table = rot.policy.table
    assert table.out_tokens(np.array([table.row("r1")])).tolist() == [rot.kv.kv_len(r1) - kept]
    rot.check()
    decode(parts, rot, batch, page + 3)  # past a page boundary: the tail spans a new page
    before, d2h_before = parts.kv_of(r1), rot.tier.stats.bytes_d2h
    kv_len = rot.kv.kv_len(r1)
    batch = rotate_round_trip(parts, rot, batch, "r1")
    assert rot.tier.stats.bytes_d2h - d2h_before == (kv_len - kept) * bpt
    assert rot.tier.stats.bytes_d2h_saved == kept * bpt
    r1 = next(r for r in batch.reqs if r.rid == "r1")
    assert torch.equal(parts.kv_of(r1), before)  # kept pages + new tail = every byte
    assert rot.tier.host_tokens("r1") == kv_len // page * page
    decode(parts, rot, batch, 2)
    finish_all(parts, rot, batch)
    rot.step(batch)  # finished: the kept copy goes
    assert rot.tier.num_kept() == 0
    assert_pools_initial(parts, rot)


def test_kept_copies_give_way_when_the_host_tier_is_short():
    from sglang_parts import HEAD_DIM, HEADS, LAYERS

    bpt = 2 * LAYERS * HEADS * HEAD_DIM * 2
    parts, rot = fresh(host_kv_gb=80.5 * bpt / 1e9, keep_host_copy=True)  # five 16-token pages
    assert rot.tier.pages.available_size() == 80
    reqs = [parts.make_req(f"r{i}", 50, max_new_tokens=64) for i in range(2)]
    batch = prefill_and_decode(parts, rot, reqs, steps=2)  # 52 tokens of KV each: 4 pages
    batch = rotate_round_trip(parts, rot, batch, "r0")
    assert rot.tier.host_tokens("r0") == 48 and rot.tier.pages.available_size() == 32
    batch = rot.rotate_out(batch, {"r1"})  # needs 4 pages, 2 are free: r0's copy is evicted
    assert rot.tier.stats.host_copies_evicted == 1 and rot.stats.fallbacks == 0
    assert rot.tier.num_kept() == 0
    table = rot.policy.table
    assert table.out_tokens(np.array([table.row("r0")])).tolist() == [
        rot.kv.kv_len(batch.reqs[0])]
    batch = rot.step(batch)
    batch = rot.step(batch)
    finish_and_check_pools(parts, rot, batch)


def test_retraction_drops_a_kept_copy():
    """SGLang recomputes a retracted request's KV: a kept copy would restore stale bytes."""
    parts, rot = fresh(host_kv_gb=0.0004, keep_host_copy=True)
    reqs = [parts.make_req(f"r{i}", 40, max_new_tokens=64) for i in range(2)]
    batch = prefill_and_decode(parts, rot, reqs, steps=3)
    batch = rotate_round_trip(parts, rot, batch, "r0")
    assert rot.tier.state("r0") is TierState.KEPT
    retracted, _, _ = compat.retract_decode(batch, parts.server_args)
    for req in retracted:
        rot.on_enqueue(req, parse_request_slo(req.sampling_params.custom_params, rot.config))
        rot.policy.update([Finished(req.rid)])
    assert not any(rot.tier.state(req.rid) is not None for req in retracted)
    finish_and_check_pools(parts, rot, batch)


def test_without_the_flag_nothing_is_kept():
    parts, rot, batch = setup(1, True)
    batch = rotate_round_trip(parts, rot, batch, "r1")
    assert rot.tier.num_kept() == 0 and rot.tier.stats.bytes_d2h_saved == 0
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


def test_a_rotate_out_without_host_room_keeps_its_copy_for_later():
    from sglang_parts import HEAD_DIM, HEADS, LAYERS

    bpt = 2 * LAYERS * HEADS * HEAD_DIM * 2
    parts, rot = fresh(host_kv_gb=80.5 * bpt / 1e9, keep_host_copy=True)  # five 16-token pages
    reqs = [parts.make_req("r0", 50, max_new_tokens=64)]
    batch = prefill_and_decode(parts, rot, reqs, steps=2)
    batch = rotate_round_trip(parts, rot, batch, "r0")  # keeps 48 tokens, 32 stay free
    decode(parts, rot, batch, 34)  # 86 tokens of KV: the 38-token tail needs 3 pages, 2 are free
    r0 = batch.reqs[0]
    batch = rot.rotate_out(batch, {"r0"})
    assert [r.rid for r in batch.reqs] == ["r0"] and rot.stats.fallbacks == 1
    assert rot.tier.host_tokens("r0") == 48  # put back, and the policy still sees it
    table = rot.policy.table
    assert table.out_tokens(np.array([table.row("r0")])).tolist() == [rot.kv.kv_len(r0) - 48]
    rot.check()
    finish_and_check_pools(parts, rot, batch)


def written_through(rot, rid: str) -> int:
    return rot.tier.host_tokens(rid)


def host_copy_is_true(parts, rot, req) -> bool:
    """The kept copy's bytes equal the request's device KV (a radix-matched rotate-in would not
    read them, so they are checked here directly)."""
    slots = rot.tier._entries[req.rid].host_slots
    host = rot.tier.pages
    if host.page_major:  # [pages, layers, 2, page, row] -> [n, layers, 2, row]
        rows = host.buffer[slots // host.page_size, :, :, slots % host.page_size]
    else:
        rows = host.buffer[slots]
    device = parts.kv_of(req)[:, :, : slots.numel()].flatten(3).permute(2, 0, 1, 3)
    return torch.equal(rows, device)


@pytest.mark.parametrize("page_size,radix,mover", MOVER_CONFIGS)
def test_write_through_saves_full_pages_so_a_rotate_out_moves_only_the_rest(page_size, radix,
                                                                            mover):
    parts, rot = fresh(page_size=page_size, radix=radix, host_kv_gb=0.0004, mover=mover,
                       write_through=True)
    reqs = [parts.make_req(f"r{i}", 40 + 7 * i, max_new_tokens=64) for i in range(3)]
    batch = prefill_and_decode(parts, rot, reqs, steps=3)
    page, bpt = rot.tier.pages.page_size, rot.tier_spec.bytes_per_token
    full = {r.rid: rot.kv.kv_len(r) // page * page for r in batch.reqs}
    batch = rot.step(batch)  # nothing to rotate: the idle link writes the full pages through
    assert rot.tier.num_writes_in_flight() == 3 and rot.busy()
    rot.check()
    batch = rot.step(batch)  # the copies landed: they are the requests' kept copies now
    assert {rid: written_through(rot, rid) for rid in full} == full and not rot.busy()
    assert rot.tier.stats.bytes_written_through == sum(full.values()) * bpt
    decode(parts, rot, batch, 2)
    r1 = next(r for r in batch.reqs if r.rid == "r1")
    before, d2h_before, kv_len = parts.kv_of(r1), rot.tier.stats.bytes_d2h, rot.kv.kv_len(r1)
    batch = rotate_round_trip(parts, rot, batch, "r1")
    assert rot.tier.stats.bytes_d2h - d2h_before == (kv_len - full["r1"]) * bpt
    r1 = next(r for r in batch.reqs if r.rid == "r1")
    assert torch.equal(parts.kv_of(r1), before)
    # Later pages extend the copy r1 came back with (written from the page it ends at).
    decode(parts, rot, batch, page + 3)
    kept = written_through(rot, "r1")
    for _ in range(6):  # one request past the step's link budget per round, most pages first
        batch = rot.step(batch)
        if written_through(rot, "r1") > kept:
            break
    kv_len = rot.kv.kv_len(r1)
    assert written_through(rot, "r1") == kv_len // page * page > kept
    assert all(host_copy_is_true(parts, rot, r) for r in batch.reqs)
    before, d2h_before = parts.kv_of(r1), rot.tier.stats.bytes_d2h
    saved = written_through(rot, "r1")
    batch = rotate_round_trip(parts, rot, batch, "r1")
    r1 = next(r for r in batch.reqs if r.rid == "r1")
    assert rot.tier.stats.bytes_d2h - d2h_before == (kv_len - saved) * bpt
    assert torch.equal(parts.kv_of(r1), before)
    finish_and_check_pools(parts, rot, batch)


def test_write_through_pages_that_land_after_their_request_left_are_freed():
    parts, rot = fresh(host_kv_gb=0.0004, write_through=True)
    reqs = [parts.make_req(f"r{i}", 40, max_new_tokens=64) for i in range(3)]
    batch = prefill_and_decode(parts, rot, reqs, steps=3)
    batch = rot.step(batch)  # copies start
    assert rot.tier.num_writes_in_flight() == 3
    before = parts.kv_of(batch.reqs[0])
    batch = rot.rotate_out(batch, {"r0"})  # r0 leaves while its write-through is in flight
    batch = rot.step(batch)  # both land: r0's own copy is complete, the write-through is not used
    assert not rot.tier.host_tokens("r0") and rot.policy.table.phase_of("r0") is Phase.ROTATING_IN
    batch = rot.step(batch)
    r0 = next(r for r in batch.reqs if r.rid == "r0")
    assert torch.equal(parts.kv_of(r0), before)
    finish_all(parts, rot, batch)  # r1 and r2 finish with their written-through copies
    rot.step(batch)
    assert not rot.busy()
    assert_pools_initial(parts, rot)


@pytest.mark.parametrize("page_size,radix,mover", MOVER_CONFIGS)
def test_a_failed_rotate_out_copy_leaves_the_request_decoding_on_the_device(
        monkeypatch, page_size, radix, mover):
    monkeypatch.setenv("SUPERINFER_TEST_FAIL_COPY", "d2h:1")
    parts, rot, batch = setup(page_size, radix, mover=mover)
    before = parts.kv_of(next(r for r in batch.reqs if r.rid == "r1"))
    batch = rot.rotate_out(batch, {"r1"})
    batch = rot.step(batch)  # the copy "failed": r1 is back in the batch, its KV untouched
    r1 = next(r for r in batch.reqs if r.rid == "r1")
    assert torch.equal(parts.kv_of(r1), before)
    assert rot.policy.table.phase_of("r1") is Phase.RUNNING and not rot.busy()
    assert rot.tier.stats.copies_failed_d2h == 1
    decode(parts, rot, batch, 2)  # it decodes on from its device KV
    assert compat.kv_committed_len(r1) == len(r1.origin_input_ids) + len(r1.output_ids) - 1
    rot.check()
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


@pytest.mark.parametrize("page_size,radix,mover", MOVER_CONFIGS)
def test_a_failed_rotate_in_copy_fails_the_request_with_an_error_and_leaks_nothing(
        monkeypatch, page_size, radix, mover):
    from sglang.srt.managers.io_struct import AbortReq

    monkeypatch.setenv("SUPERINFER_TEST_FAIL_COPY", "h2d:1")
    parts, rot, batch = setup(page_size, radix, mover=mover)
    batch = rot.rotate_out(batch, {"r1"})
    batch = rot.step(batch)  # out done, in planned
    assert rot.policy.table.phase_of("r1") is Phase.ROTATING_IN
    batch = rot.step(batch)  # the copy back "failed": r1 fails, the others go on
    assert "r1" not in rot.policy and "r1" not in [r.rid for r in batch.reqs]
    errors = [o for o in parts.sent if isinstance(o, AbortReq) and o.rid == "r1"]
    assert len(errors) == 1 and "failed" in errors[0].abort_message
    assert errors[0].finished_reason["status_code"] == 500
    assert rot.tier.stats.copies_failed_h2d == 1 and not rot.busy()
    rot.check()
    finish_all(parts, rot, batch)
    assert_pools_initial(parts, rot)


def test_decode_first_counts_only_prefill_held_back(monkeypatch):
    """``plans_decode_first`` counts the plans that held waiting prefill back for a decode step,
    as eval.sim_policy counts them, not every plan with a zero budget (nothing waiting)."""
    parts, rot, batch = setup(16, True)
    real_plan = rot.policy.plan

    def decode_first(snapshot):
        return dataclasses.replace(real_plan(snapshot), prefill_token_budget=0)

    monkeypatch.setattr(rot.policy, "plan", decode_first)
    parts.waiting_queue = []
    rot.step(batch)  # streams decoding, nobody waiting: nothing was held back
    assert rot.stats.plans_decode_first == 0
    enqueue(parts, rot, parts.make_req("new", 10))
    rot.step(batch)
    assert rot.stats.plans_decode_first == 1


def test_a_mixed_chunk_batch_counts_as_a_decode_step_for_the_running_streams():
    """With --enable-mixed-chunk SGLang runs the running streams' decode tokens inside the
    prefill batch (mix_with_running, forward mode MIXED): each stream's output count advances
    and the new request starts; a stream that finished there leaves the table."""
    parts, rot, batch = setup(16, True)
    before = {r.rid: rot.policy.view(r.rid).num_output_tokens for r in batch.reqs}
    new = parts.make_req("new", 30)
    enqueue(parts, rot, new)
    mixed = parts.prefill([new], running=batch)
    parts.waiting_queue.clear()
    batch.prepare_for_decode()
    mixed.mix_with_running(batch)
    assert mixed.forward_mode.is_extend() and len(mixed.reqs) == len(before) + 1
    for r in mixed.reqs:
        if r.rid != "new":
            r.output_ids.append(7)
    parts.finish(mixed, {"r0"})
    rot.on_batch_result(mixed)
    assert rot.policy.phase_of("new") is Phase.RUNNING
    assert "r0" not in rot.policy
    for rid in ("r1", "r2"):
        assert rot.policy.phase_of(rid) is Phase.RUNNING
        assert rot.policy.view(rid).num_output_tokens == before[rid] + 1


def test_published_load_counts_rotated_out_requests():
    """SGLang's load snapshot (what /v1/loads, /get_load and the router read) keeps a request
    that is on the host: as running, with its KV as tokens the server must hold again."""
    from sglang.srt.managers.load_snapshot import LoadSnapshot

    from superinfer.adapters.sglang import hooks

    parts, rot, batch = setup(1, False)
    base = LoadSnapshot(num_running_reqs=3, num_used_tokens=200, num_total_tokens=200,
                        num_active_tokens=200)
    sched = types.SimpleNamespace(_superinfer_rotator=rot, load_inquirer=types.SimpleNamespace(
        get_loads=lambda: msgspec.structs.replace(base), max_running_requests=7))
    hooks._init_load_inquirer(None, sched)
    assert sched.load_inquirer.get_loads() == base  # nothing away: SGLang's figures as they are
    assert sched.load_inquirer.max_running_requests == 7  # the rest is SGLang's inquirer's
    batch = rot.rotate_out(batch, {"r1"})
    rot._collect(batch)
    assert rot.policy.table.phase_of("r1") is Phase.ON_HOST
    r1 = rot.away["r1"]
    assert rot.away_load() == (1, r1.seqlen)
    load = sched.load_inquirer.get_loads()
    assert (load.num_running_reqs, load.num_total_tokens, load.num_active_tokens) == (
        4, 200 + r1.seqlen, 200 + r1.seqlen)
    assert load.num_used_tokens == 200  # device KV in use is what it is
    finish_all(parts, rot, batch)
    rot.on_abort("r1", abort_all=False)
    assert rot.away_load() == (0, 0)


def test_no_rotator_no_wrapper():
    from superinfer.adapters.sglang import hooks

    inner = types.SimpleNamespace(get_loads=lambda: None)
    sched = types.SimpleNamespace(load_inquirer=inner)
    hooks._init_load_inquirer(None, sched)
    assert sched.load_inquirer is inner


def test_decode_first_holds_right_after_a_prefill_with_nothing_else_running():
    """SGLang merges the last prefill batch into the running batch inside the very call the
    hook wraps, so the running batch the hook sees can be empty while streams that just got
    their first token are about to decode. Decode first must still hide the queue: else the
    next prefill (and the chunks after it) stalls those streams."""
    parts, rot = fresh()
    a = parts.make_req("a", 40)
    enqueue(parts, rot, a)
    last = parts.prefill([a])
    parts.waiting_queue.clear()
    rot.on_batch_result(last)
    enqueue(parts, rot, parts.make_req("b", 30))
    queue = list(parts.waiting_queue)
    running = parts.empty_batch()  # `a` not merged yet
    rot.step(running, last)
    assert rot.streams_decoding
    rot.pacer.prefill_budget = 0
    with rot.pacer.paced_prefill(rot.streams_decoding):
        assert parts.waiting_queue == []
    assert parts.waiting_queue == queue
    # nothing prefilled last and nothing running: no decode step to put first
    rot.step(running, None)
    assert not rot.streams_decoding
    with rot.pacer.paced_prefill(rot.streams_decoding):
        assert parts.waiting_queue == queue


def test_a_prompt_cut_mid_way_does_not_join_the_running_batch():
    parts, rot = fresh()
    c = parts.make_req("c", 100)
    enqueue(parts, rot, c)
    last = parts.prefill([c], chunk=32)
    assert parts.chunked_req is c
    assert not joins_running(last, parts.chunked_req)
    assert not joins_running(None, None)
    assert not joins_running(parts.empty_batch(), None)
    d = parts.make_req("d", 20)
    enqueue(parts, rot, d)
    assert joins_running(parts.prefill([d]), c)


def test_the_hook_hands_sglangs_last_batch_to_the_step():
    """SGLang 0.5.17-0.5.23 call get_next_batch_to_run(running_batch=..., last_batch=...)."""
    from superinfer.adapters.sglang import hooks

    seen = []

    class Rot:
        streams_decoding = True
        pacer = types.SimpleNamespace(paced_prefill=lambda flag: seen.append(("paced", flag))
                                      or contextlib.nullcontext())

        def step(self, running, last):
            seen.append(("step", running, last))
            return running

        def on_launch(self, batch):
            seen.append(("launch", batch))

    sched = types.SimpleNamespace(_superinfer_rotator=Rot())
    plan = types.SimpleNamespace(batch_to_run="b")
    out = hooks._get_next_batch_to_run(lambda self, running, **kw: plan, sched, "r",
                                       last_batch="L")
    assert out is plan and seen == [("step", "r", "L"), ("paced", True), ("launch", "b")]
