"""RotaSched's decision core, alone: no torch, no SGLang."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import numpy as np
import pytest

from superinfer.config import ConfigError, RotaConfig
from superinfer.policy import (
    Capacity,
    CostModel,
    LvfPolicy,
    Phase,
    SloPolicy,
    StepPlan,
    StepSnapshot,
    TierReport,
    Transfer,
    create_policy,
    deadlines,
    late,
    pacing,
)
from superinfer.policy import events as ev
from superinfer.policy.costs import DEFAULT_COSTS

BPT = 131072  # Llama-3.1-8B KV bytes per token
COSTS = dataclasses.replace(DEFAULT_COSTS, d2h_bytes_per_s=50e9, h2d_bytes_per_s=50e9,
                            decode_step_s=0.02, prefill_s_per_token=2e-5, prefill_overhead_s=0.0)


def cap(free: int, total: int = 100_000, host: int = 1_000_000, ratio: float = 0.0) -> Capacity:
    return Capacity(available_device_tokens=free, total_device_tokens=total, free_host_tokens=host,
                    bytes_per_token=BPT, new_token_ratio=ratio)


def running(policy, rid: str, *, tokens: int, first_s: float, out: int, tbt: float = 0.1,
            max_new: int = 1000) -> None:
    policy.update([ev.Arrived(rid, first_s - 0.1, tokens, 1.0, tbt, max_new),
                   ev.PrefillDone(rid, first_s, tokens + out - 1, out)])


def add(policy, *args) -> None:
    policy.update([ev.Arrived(*args)])


def start_out(policy, rid: str, now_s: float) -> None:
    """The adapter submitted ``rid``'s rotate-out (its KV is still on the device)."""
    v = policy.view(rid)
    policy.update([ev.RotationStarted(rid, now_s, True, v.num_tokens, v.num_output_tokens)])


def park(policy, rid: str, now_s: float) -> None:
    """``rid`` rotated out and its copy landed: it is on the host."""
    start_out(policy, rid, now_s)
    policy.update([TierReport(now_s=now_s, finished_out=[rid])])


def plan_at(policy, now_s: float, capacity: Capacity, costs, max_prefill_tokens: int,
            gpu_free_at_s: float | None = None):
    return policy.plan(StepSnapshot(now_s, capacity, costs, max_prefill_tokens, gpu_free_at_s))


def test_edf_admission_order_and_late_last():
    p = SloPolicy(RotaConfig())
    add(p, "late", 0.0, 100, 1.0, 0.1, 10)  # deadline 1.0: already past at now=2
    add(p, "b", 1.5, 100, 1.0, 0.1, 10)  # deadline 2.5
    add(p, "a", 1.8, 100, 0.5, 0.1, 10)  # deadline 2.3 (tighter SLO)
    plan = plan_at(p, 2.0, cap(100_000), COSTS, 16384)
    assert plan.admit == ["a", "b", "late"]
    pure = SloPolicy(RotaConfig(late_last=False))
    for rid, arr, slo_s in (("late", 0.0, 1.0), ("b", 1.5, 1.0), ("a", 1.8, 0.5)):
        add(pure, rid, arr, 100, slo_s, 0.1, 10)
    assert plan_at(pure, 2.0, cap(100_000), COSTS, 16384).admit == ["late", "a", "b"]


def burst(config: RotaConfig, prompts: dict[str, int]) -> SloPolicy:
    """Requests all arriving at 0 with a 1 s TTFT SLO (COSTS: 2e-5 s a prompt token)."""
    p = SloPolicy(config)
    for rid, tokens in prompts.items():
        add(p, rid, 0.0, tokens, 1.0, 0.1, 10)
    return p


def test_fewest_late_is_moore_hodgson_on_deadlines_and_prefill_times():
    """The rule alone, without a table: the longest prefill so far goes late whenever the
    prefills in deadline order end past a deadline; equal lengths: the latest arrival."""
    due = np.array([1.0, 1.0, 1.0])
    seq = np.array([0, 1, 2])
    assert late.fewest_late(due, seq, np.array([0.8, 0.3, 0.3]), 0.0).tolist() == [
        True, False, False]
    assert late.fewest_late(due, seq, np.array([0.4, 0.3, 0.3]), 0.0).tolist() == [
        False, False, False]
    assert late.fewest_late(due, seq, np.array([0.4, 0.4, 0.4]), 0.0).tolist() == [
        False, False, True]
    # the start counts: 0.25 s in, two of three 0.3 s prefills still make a 1 s deadline
    assert int(late.fewest_late(due, seq, np.array([0.3, 0.3, 0.3]), 0.25).sum()) == 1
    # an earlier deadline is weighed first, whatever the input order
    assert late.fewest_late(np.array([2.0, 0.5]), np.array([0, 1]), np.array([0.6, 0.6]),
                            0.0).tolist() == [False, True]


def test_wait_for_slack_counts_the_decode_steps_the_shortest_stream_needs():
    """Each 20 ms step earns a resident stream its TBT minus the step and costs a stream on
    the host the step; the wait is whole steps, and None when steps never get there."""
    tbt = np.array([0.1, 0.05])
    resident = np.array([False, False])
    wait = pacing.wait_for_slack_s
    assert wait(0.05, np.array([0.06, 0.07]), resident, tbt, COSTS) == 0.0  # enough already
    # 0.05 s short at 0.03 s a step (TBT 50 ms): two steps; the other earns 0.08 s a step
    assert wait(0.06, np.array([0.05, 0.01]), resident, tbt, COSTS) == pytest.approx(0.04)
    # a TBT no longer than the step: decode steps never earn it slack
    assert wait(0.06, np.array([0.05, 0.01]), resident,
                np.array([0.1, 0.02]), COSTS) is None
    # a stream on the host short of the batch never gets slack from steps
    assert wait(0.06, np.array([0.05, 0.5]), np.array([True, False]), tbt, COSTS) is None
    # one with slack to spare still pays for the steps the others need: 0.07 - 2 steps < 0.06
    assert wait(0.06, np.array([0.07, 0.01]), np.array([True, False]), tbt, COSTS) is None
    assert wait(0.06, np.array([0.2, 0.01]), np.array([True, False]), tbt,
                COSTS) == pytest.approx(0.04)


def test_fewest_late_when_not_every_prefill_fits_before_its_deadline():
    # 0.8 s + 0.3 s + 0.3 s of prefill, all due at 1.0: latest-start order serves the long
    # prompt first and both short ones miss; the fewest late: the long one goes last.
    prompts = {"long": 40_000, "s1": 15_000, "s2": 15_000}
    plan = plan_at(burst(RotaConfig(), prompts), 0.0, cap(100_000), COSTS, 100_000)
    assert plan.admit == ["s1", "s2", "long"]
    plain = burst(RotaConfig(fewest_late=False), prompts)
    assert plan_at(plain, 0.0, cap(100_000), COSTS, 100_000).admit == ["long", "s1", "s2"]
    # 0.4 + 0.2 + 0.2 s all fit: deadline (latest start) order, nobody late
    fits = burst(RotaConfig(), {"long": 20_000, "s1": 10_000, "s2": 10_000})
    assert plan_at(fits, 0.0, cap(100_000), COSTS, 100_000).admit == ["long", "s1", "s2"]
    # equal prefills: the later arrival of the ones past the cut goes late
    even = burst(RotaConfig(), {"a": 20_000, "b": 20_000, "c": 20_000})
    assert plan_at(even, 0.0, cap(100_000), COSTS, 100_000).admit == ["a", "b", "c"]
    assert even._served_late(even._table.rows_in(Phase.WAITING), 0.0, COSTS).tolist() == [
        False, False, True]
    # a long queue: only the earliest late.HORIZON deadlines are weighed (0.1 s each, all
    # due at 1.0: the first ten make it, the rest of the horizon goes late)
    queue = burst(RotaConfig(), {f"q{i:03d}": 5_000 for i in range(300)})
    chosen = queue._served_late(queue._table.rows_in(Phase.WAITING), 0.0, COSTS)
    assert not chosen[:10].any() and chosen[10:late.HORIZON].all()
    assert int(chosen.sum()) == late.HORIZON - 10


def test_rotated_request_key_brought_forward_by_swap_in():
    p = SloPolicy(RotaConfig())
    running(p, "away", tokens=200_000, first_s=0.0, out=20)  # next token due at 2.0
    park(p, "away", 1.0)
    add(p, "new", 1.0, 10, 1.0, 0.1, 10)  # TTFT deadline 2.0, tiny prefill
    # 200k tokens at 50 GB/s take ~0.52 s to come back: the rotated one must go first.
    plan = plan_at(p, 1.2, cap(1_000_000, total=1_000_000), COSTS, 16384)
    assert plan.rotate_in == ["away"] and plan.admit == ["new"]
    assert deadlines.transfer_s(200_000, BPT, 50e9) > 0.5


def test_victims_most_slack_first_and_only_if_slack_covers_round_trip():
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "ahead", tokens=1000, first_s=0.0, out=30)  # due 3.0: 2 s of slack at now=1
    running(p, "way_ahead", tokens=1000, first_s=0.0, out=40)  # due 4.0: most slack
    running(p, "behind", tokens=1000, first_s=0.0, out=11)  # due 1.1: no slack
    add(p, "new", 0.9, 2500, 1.0, 0.1, 10)
    plan = plan_at(p, 1.0, cap(1000), COSTS, 16384)
    assert plan.admit == ["new"]
    # needs 2500 + 10 with 1000 free: one victim (~1039 tokens) is not enough, two are
    assert plan.rotate_out == ["way_ahead", "ahead"]
    assert "behind" not in plan.rotate_out
    # With a margin so large nobody qualifies, nobody is rotated (no partial rotations).
    strict = SloPolicy(RotaConfig(slack_margin=1000.0, reserve_window_s=0.0))
    running(strict, "ahead", tokens=1000, first_s=0.0, out=30)
    add(strict, "new", 0.9, 1500, 1.0, 0.1, 10)
    assert plan_at(strict, 1.0, cap(1000), COSTS, 16384).rotate_out == []


@pytest.mark.parametrize("share,victims", [(1.0, 7), (0.4, 2)])  # 1049-token victims
def test_link_share_bounds_one_steps_rotation_bytes(share, victims):
    """50 GB/s x 20 ms = 7.6k tokens per step at the full link; a share of it bounds the
    bytes (and so the SM time the copies take from the model)."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0, link_share=share))
    for i in range(10):
        running(p, f"r{i}", tokens=1000, first_s=0.0, out=50)
    add(p, "new", 0.9, 8000, 1.0, 0.1, 10)  # 8 victims would make room; the budget decides
    assert len(plan_at(p, 1.0, cap(1000), COSTS, 65536).rotate_out) == victims


def test_kept_host_copies_leave_the_link_budget_to_the_tails():
    """A request whose KV is mostly still on the host (``--rota-keep-host-copy``) costs its
    rotate-out only the tail: more victims fit one step's link budget, and one whose slack
    would not cover a full copy out qualifies."""
    def victims(host_tokens: int) -> int:
        p = SloPolicy(RotaConfig(reserve_window_s=0.0, link_share=0.4))
        for i in range(10):
            running(p, f"r{i}", tokens=1000, first_s=0.0, out=50)
        p.update([TierReport(host_tokens={f"r{i}": host_tokens for i in range(10)})])
        add(p, "new", 0.9, 8000, 1.0, 0.1, 10)
        return len(plan_at(p, 1.0, cap(1000), COSTS, 65536).rotate_out)

    assert victims(0) == 2  # as test_link_share_bounds_one_steps_rotation_bytes
    assert victims(992) == 7  # 57 tokens each to copy: the room needed binds, as at share 1.0
    t = SloPolicy(RotaConfig()).table
    t.add("a", 0.0, 100, 1.0, 0.1)
    t.prefill_done("a", 100, 0.1)
    t.apply(TierReport(host_tokens={"a": 96}))
    assert t.out_tokens(np.array([t.row("a")])).tolist() == [4]


def test_rotated_request_makes_room_only_when_it_must_come_back():
    """A rotated-out request far from its deadline waits for free room; pushing someone out
    early only swaps it with a victim that swaps back later (thrash)."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "resident", tokens=1000, first_s=0.0, out=40)  # due 4.0: lots of slack
    running(p, "away", tokens=1000, first_s=0.0, out=30)  # due 3.0
    park(p, "away", 0.5)
    early = plan_at(p, 1.0, cap(500), COSTS, 16384)
    assert early.rotate_in == [] and early.rotate_out == []
    due = plan_at(p, 2.96, cap(500), COSTS, 16384)  # its token is due in 40 ms: now it must return
    assert due.rotate_out == ["resident"]


def test_urgency_covers_the_overlap_pipeline_of_a_swap():
    """Making room takes the victims' copy (behind the forward in flight), our copy (behind the
    one in flight after it) and our decode step; with SGLang planning one batch ahead that is
    six steps: a request is urgent that long before its key."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "resident", tokens=1000, first_s=0.0, out=40)
    running(p, "away", tokens=1000, first_s=0.0, out=30)  # due 3.0
    park(p, "away", 0.5)
    copy = deadlines.transfer_s(1000, BPT, 50e9)
    lag = deadlines.make_room_lag_s(1000, BPT, COSTS)
    assert lag == pytest.approx(6 * 0.02 + copy)
    key = 3.0 - copy
    assert plan_at(p, key - lag - 0.005, cap(500), COSTS, 16384).rotate_out == []
    assert plan_at(p, key - lag + 0.005, cap(500), COSTS, 16384).rotate_out == ["resident"]


def test_away_streams_are_bounded_by_the_slack_the_resident_ones_earn():
    """Rotating out for new work only while the resident streams earn the slack the ones on
    the host spend: 20 ms steps and a 100 ms TBT earn 4 s per second per stream, over the
    away margin (1.5 by default)."""
    assert deadlines.slack_gain(0.1, 0.02, 0.0) == pytest.approx(4.0)
    assert deadlines.slack_gain(0.1, 0.02, 0.5) == pytest.approx(1.5)
    assert deadlines.slack_gain(0.1, 0.2, 0.0) == 0.0
    assert deadlines.max_extra_away(resident=10, away=0, gain=2.0) == 7  # 7 <= (10 - 7 + 1) * 2
    assert deadlines.max_extra_away(resident=10, away=22, gain=2.0) == 0

    def plan_with_away(n_away: int, margin: float = 1.5) -> list[str]:
        p = SloPolicy(RotaConfig(reserve_window_s=0.0, away_margin=margin))
        for i in range(4):
            running(p, f"r{i}", tokens=1000, first_s=0.0, out=40)  # 3 s of slack at now=1
        for i in range(n_away):
            running(p, f"h{i}", tokens=10, first_s=0.0, out=90)
            park(p, f"h{i}", 0.5)
        add(p, "new", 0.9, 1500, 1.0, 0.1, 10)
        return plan_at(p, 1.0, cap(600), COSTS, 16384)

    assert plan_with_away(0).rotate_out == ["r0"]  # (4 + 1) * 4 / 1.5 - 0 >= 1 * (1 + 4 / 1.5)
    assert plan_with_away(9).rotate_out == ["r0"]  # 13.3 - 9 >= 3.67
    held = plan_with_away(10)  # 10 on the host already use what 4 resident streams earn
    assert held.rotate_out == [] and held.head_blocked and held.held_by == "away_bound"
    assert plan_with_away(9, margin=2.0).rotate_out == []  # a wider margin: 10 - 9 < 3


def test_streams_on_the_host_already_late_do_not_hold_prefill_back():
    """Decode steps cannot bring a late rotated-out stream back; with nothing else decoding,
    prefill is not paced at all."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "away", tokens=1000, first_s=0.0, out=5)  # token #5 was due at 0.5
    park(p, "away", 0.2)
    add(p, "new", 0.9, 1000, 1.0, 0.1, 10)
    assert plan_at(p, 1.0, cap(100_000), COSTS, 16384).prefill_token_budget is None


def test_a_stream_behind_pace_means_decode_first():
    """Only decode steps let a late stream catch up; once every stream was behind, unbounded
    prefill stalled them all for up to a second on the H200."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "late", tokens=100, first_s=0.0, out=5)  # token #5 was due at 0.5
    add(p, "new", 0.9, 1000, 1.0, 0.1, 10)
    assert plan_at(p, 1.0, cap(100_000), COSTS, 16384).prefill_token_budget == 0


def test_a_stream_whose_tbt_the_step_nearly_fills_does_not_hold_prefill_back():
    """A 20 ms step earns a stream with a 25 ms TBT 5 ms per step: pacing prefill for it
    leaves the queue waiting for many steps and buys it almost nothing. Streams with room in
    their TBT still pace."""
    def plan(tbt_s: float, share: float = 0.75):
        p = SloPolicy(RotaConfig(reserve_window_s=0.0, pacing_step_share=share))
        running(p, "s", tokens=100, first_s=0.0, out=5, tbt=tbt_s)  # behind its pace at 1.0
        add(p, "new", 0.9, 1000, 1.0, 0.1, 10)
        return plan_at(p, 1.0, cap(100_000), COSTS, 16384)

    assert plan(0.1).prefill_token_budget == 0  # 0.02 / 0.1 = 0.2 of its TBT: decode first
    assert plan(0.025).prefill_token_budget is None  # 0.8 of its TBT: unpaced
    assert plan(0.025, share=0.9).prefill_token_budget == 0
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "tight", tokens=100, first_s=0.0, out=5, tbt=0.025)
    running(p, "loose", tokens=100, first_s=0.95, out=1)  # 30 ms of slack at 1.0
    add(p, "new", 0.9, 1000, 1.0, 0.1, 10)
    # (1.05 - 1.0 - 0.02) / 2e-5 = 1500 tokens: the loose stream's slack bounds the batch
    assert plan_at(p, 1.0, cap(100_000), COSTS, 16384).prefill_token_budget == pytest.approx(
        1500, abs=1)


def test_room_already_leaving_is_not_freed_twice():
    """A victim's KV is released only when its copy is done, a step or more later; until then
    the same deficit must not pick new victims every step."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "ahead", tokens=1000, first_s=0.0, out=30)
    running(p, "way_ahead", tokens=1000, first_s=0.0, out=40)
    add(p, "new", 0.9, 1500, 1.0, 0.1, 10)
    first = plan_at(p, 1.0, cap(600), COSTS, 16384)
    assert first.rotate_out == ["way_ahead"]
    start_out(p, "way_ahead", 1.0)  # copy submitted, KV still held
    again = plan_at(p, 1.01, cap(600), COSTS, 16384)
    assert again.rotate_out == [] and again.admit == ["new"]


def test_rotation_respects_host_capacity_and_transfer_budget():
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    for i in range(10):
        running(p, f"r{i}", tokens=4000, first_s=0.0, out=50)
    add(p, "new", 0.9, 30_000, 1.0, 0.1, 10)
    budget_tokens = int(COSTS.d2h_bytes_per_s * COSTS.decode_step_s / BPT)  # ~7.6k tokens
    plan = plan_at(p, 1.0, cap(1000), COSTS, 65536)
    moved = 4000 * len(plan.rotate_out)
    assert 0 < moved <= max(budget_tokens, 4000) and not plan.host_full
    full = plan_at(p, 1.0, cap(1000, host=3999), COSTS, 65536)
    assert full.rotate_out == [] and full.host_full  # counted: SGLang's own fallback takes over


def test_adaptive_reserve_rotates_proactively_only_under_arrivals():
    def policy_with_load(rate: float):
        p = SloPolicy(RotaConfig(reserve_window_s=0.5))
        for i in range(4):
            running(p, f"r{i}", tokens=2000, first_s=0.0, out=60)  # far ahead of pace
        costs = dataclasses.replace(COSTS, arrival_rate_per_s=rate, mean_prompt_tokens=1000)
        return plan_at(p, 1.0, cap(500, total=20_000), costs, 16384)

    busy = policy_with_load(20.0)  # reserve = min(20 * 0.5 * 1000, 25% of 20k) = 5000
    assert busy.rotate_out and all("reserve" in busy.reasons[r] for r in busy.rotate_out)
    assert policy_with_load(0.0).rotate_out == []


def test_victims_exclude_requests_about_to_finish():
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "ending", tokens=5000, first_s=0.0, out=50, max_new=51)
    add(p, "new", 0.9, 3000, 1.0, 0.1, 10)
    assert plan_at(p, 1.0, cap(100), COSTS, 16384).rotate_out == []


def test_no_bytes_move_when_finishing_streams_free_the_room_in_time():
    """The head needs 2510 tokens with 1000 free; it must start by 1.85 (deadline 1.9 minus
    its prefill). A stream 5 tokens from its end frees its room by ~1.1: if that covers the
    head, nothing moves; if not, a rotation makes the rest, and the nearly done stream is no
    victim (its room comes anyway). With 100 tokens left it is an ordinary victim."""
    def plan(ending_tokens: int, left: int):
        p = SloPolicy(RotaConfig(reserve_window_s=0.0))
        running(p, "ending", tokens=ending_tokens, first_s=0.0, out=40, max_new=40 + left)
        running(p, "long", tokens=3000, first_s=0.0, out=30, max_new=1000)
        add(p, "new", 0.9, 2500, 1.0, 0.1, 10)
        return plan_at(p, 1.0, cap(1000), COSTS, 16384)

    waits = plan(3000, 5)
    assert waits.rotate_out == [] and waits.admit == ["new"]
    assert waits.room_needed and waits.head_blocked and waits.held_by == "room_comes"
    rest = plan(1000, 5)  # frees 1000 of the 1510 missing: "long" makes the rest
    assert rest.rotate_out == ["long"] and rest.room_needed and not rest.head_blocked
    assert rest.held_by is None
    assert plan(1000, 100).rotate_out[0] == "ending"  # most slack first, as before


def test_room_that_comes_for_the_head_alone_is_not_enough_when_a_queue_waits_behind_it():
    """Finishing streams free the head's room in time, but not the room of the request behind
    it, which can still make its TTFT too: a rotation makes room now (a burst queued behind a
    head waiting for finishes used to leave the rest no time for a rotation). A request behind
    it that is late already does not count."""
    def plan(behind_arrival_s: float):
        p = SloPolicy(RotaConfig(reserve_window_s=0.0))
        running(p, "ending", tokens=3000, first_s=0.0, out=40, max_new=45)
        running(p, "long", tokens=3000, first_s=0.0, out=30, max_new=1000)
        add(p, "new", 0.9, 2500, 1.0, 0.1, 10)
        add(p, "behind", behind_arrival_s, 2000, 1.0, 0.1, 10)
        return plan_at(p, 1.0, cap(1000), COSTS, 16384)

    queued = plan(0.95)
    assert queued.admit == ["new"] and queued.rotate_out == ["long"]
    late = plan(-0.5)  # its deadline passed: it goes last and needs no room in time
    assert late.admit == ["new"] and late.rotate_out == [] and late.head_blocked


def test_the_queue_check_reads_the_walks_ranking_from_a_head_past_its_first_pass():
    """The walk can reach the blocked head past its first 64 candidates: the check behind it
    takes the walk's own ranking from the head on (nothing ranked again)."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    for i in range(200):
        add(p, f"w{i}", 0.5 + i / 1000, 100, 1.0, 0.1, 10)
    order, key = p._rank(0.6, cap(10**6), COSTS, 256, p._chosen_late(0.6, COSTS))  # 2nd pass
    at = int(np.flatnonzero(order == p.table.row("w150"))[0])
    queue = (order[at:], key[at:])
    assert p._room_comes_in_time(queue, 10**6, 0.6, cap(10**6), COSTS)
    assert not p._room_comes_in_time(queue, 100, 0.6, cap(10**6), COSTS)


def test_a_late_head_waits_for_finishing_streams_only_within_two_of_its_ttft_slos():
    """Every waiting request is past its latest start. A stream that finishes within two of
    the head's TTFT SLOs frees its room: no bytes move. One that runs on longer would leave it
    waiting while streams come and go from the host, to the end of a finite workload (its last
    tokens come later: throughput lost): a rotation makes the room."""
    def plan(max_new: int):
        p = SloPolicy(RotaConfig(reserve_window_s=0.0))
        running(p, "long", tokens=3000, first_s=0.0, out=30, max_new=max_new)
        add(p, "late", 0.0, 2500, 1.0, 0.1, 10)
        return plan_at(p, 1.5, cap(1000), COSTS, 16384)

    soon = plan(60)  # 30 tokens left at 20 ms a step: its room is free in 0.6 s
    assert soon.admit == ["late"] and soon.rotate_out == [] and soon.head_blocked
    assert soon.held_by == "room_comes"
    later = plan(1000)  # 970 left: 19.4 s
    assert later.admit == ["late"] and later.rotate_out == ["long"] and not later.head_blocked
    assert later.room_needed


def test_compute_bound_rotates_nothing_for_new_work_but_returns_urgent_streams():
    """When the GPU, not KV room, holds new work back, freeing room cannot admit it any
    sooner: no rotation for the head or the reserve. A stream on the host that is due still
    swaps back in."""
    def setup():
        p = SloPolicy(RotaConfig(reserve_window_s=0.0))
        running(p, "long", tokens=3000, first_s=0.0, out=30, max_new=1000)
        add(p, "new", 0.9, 2500, 1.0, 0.1, 10)
        return p

    snap = StepSnapshot(1.0, cap(1000), COSTS, 16384, bound="compute")
    plan = setup().plan(snap)
    assert plan.rotate_out == [] and plan.head_blocked and plan.room_needed
    assert plan.held_by == "compute"
    assert setup().plan(dataclasses.replace(snap, bound="memory")).rotate_out == ["long"]
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "resident", tokens=1000, first_s=0.0, out=40)
    running(p, "away", tokens=1000, first_s=0.0, out=30)  # due 3.0
    park(p, "away", 0.5)
    due = p.plan(StepSnapshot(2.96, cap(500), COSTS, 16384, bound="compute"))
    assert due.rotate_out == ["resident"]


def on_host_behind_a_head(**streams: tuple[int, int]) -> SloPolicy:
    """Streams (name=(tokens, tokens out), first token at 0 s, 100 ms TBT) parked on the host
    at 0.5 s, and a new request of 2,500 prompt tokens arrived at 0.9 s."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    for rid, (tokens, out) in streams.items():
        running(p, rid, tokens=tokens, first_s=0.0, out=out)
        park(p, rid, 0.5)
    add(p, "new", 0.9, 2500, 1.0, 0.1, 10)
    return p


def test_streams_on_the_host_return_early_into_room_a_blocked_head_leaves_idle():
    """The head (2,510 tokens) waits for the GPU with 1,500 free: the stream on the host (due at
    3 s, not urgent at 1 s) comes back into that room rather than leaving it idle, but never into
    the reserve, and not when the rule is off."""
    def plan(free: int, costs=COSTS, **config) -> StepPlan:
        p = SloPolicy(RotaConfig(**{"reserve_window_s": 0.0, **config}))
        running(p, "resident", tokens=1000, first_s=0.0, out=40)
        running(p, "away", tokens=1000, first_s=0.0, out=30)
        park(p, "away", 0.5)
        add(p, "new", 0.9, 2500, 1.0, 0.1, 10)
        return p.plan(StepSnapshot(1.0, cap(free), costs, 16384, bound="compute"))

    early = plan(1500)
    assert early.head_blocked and early.held_by == "compute" and early.admit == ["new"]
    assert early.rotate_in == ["away"] and early.rotate_out == []
    assert "blocked head" in early.reasons["away"]
    assert plan(1500, early_returns=False).rotate_in == []
    assert plan(900).rotate_in == []  # 1,000 tokens do not fit
    # first fit in deadline order: a stream due sooner but too large for the room waits (it
    # comes back when due, with room made for it) and the one behind it comes back now
    p = on_host_behind_a_head(big=(2000, 25), small=(1000, 30))  # due at 2.5 s and 3 s
    fit = p.plan(StepSnapshot(1.0, cap(1500), COSTS, 16384, bound="compute"))
    assert fit.head_blocked and fit.rotate_in == ["small"]
    arrivals = dataclasses.replace(COSTS, arrival_rate_per_s=10.0, mean_prompt_tokens=300.0)
    assert plan(1500, arrivals, reserve_window_s=0.2).rotate_in == []  # 600 tokens kept free


def test_early_returns_count_the_room_of_the_walks_own_returns_once():
    """The walk brings "due" back (urgent, ahead of the head in deadline order) and counts its
    1,000 tokens; the blocked head then leaves 1,600 free, and "later" (1,000 tokens, not due)
    fits there. Counting "due" a second time would leave 600 and keep "later" on the host."""
    p = on_host_behind_a_head(due=(1000, 10), later=(1000, 30))  # next tokens due at 1 s, 3 s
    plan = p.plan(StepSnapshot(1.0, cap(2600), COSTS, 16384, bound="compute"))
    assert plan.head_blocked and plan.admit == ["new"]
    assert plan.rotate_in == ["due", "later"]
    assert plan.reasons["due"] == "urgent rotate-in" and "blocked head" in plan.reasons["later"]


def test_a_full_host_tier_holds_the_head_and_says_so():
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "long", tokens=3000, first_s=0.0, out=30, max_new=1000)
    add(p, "new", 0.9, 2500, 1.0, 0.1, 10)
    plan = plan_at(p, 1.0, cap(1000, host=2000), COSTS, 16384)  # 3000 tokens would go out
    assert plan.rotate_out == [] and plan.head_blocked and plan.host_full
    assert plan.held_by == "host_full"


def test_decode_reservation_counts_like_sglang():
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "r", tokens=100, first_s=0.0, out=10, max_new=1010)  # 1000 left
    add(p, "new", 0.9, 500, 1.0, 0.1, 10)
    assert plan_at(p, 1.0, cap(1000, ratio=0.0), COSTS, 16384).admit == ["new"]
    # ratio 0.7 reserves 700 tokens for "r": 510 no longer fits in 300 -> blocked head
    blocked = plan_at(p, 1.0, cap(1000, ratio=0.7), COSTS, 16384)
    assert blocked.reasons["new"] == "EDF head, blocked"
    assert blocked.head_blocked and not blocked.rotate_out  # "r" has no slack to lend
    assert blocked.held_by == "no_victims"
    assert not plan_at(p, 1.0, cap(1000, ratio=0.0), COSTS, 16384).head_blocked


def test_fixed_length_streams_reserve_their_whole_output_where_sglang_does():
    """SGLang 0.5.22+ keeps a running ignore_eos request's whole remaining output free
    (``Capacity.fixed_length_ratio``, set by the adapter); before, ``new_token_ratio`` of it."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    p.update([ev.Arrived("r", -0.1, 100, 1.0, 0.1, 1010, fixed_length=True),
              ev.PrefillDone("r", 0.0, 109, 10)])  # 1000 left, "r" has no slack to lend
    add(p, "new", 0.9, 500, 1.0, 0.1, 10)
    fixed = dataclasses.replace(cap(1000, ratio=0.0), fixed_length_ratio=1.0)
    assert plan_at(p, 1.0, cap(1000, ratio=0.0), COSTS, 16384).admit == ["new"]
    assert plan_at(p, 1.0, fixed, COSTS, 16384).head_blocked
    row = np.array([p.table.row("r")])
    assert p.table.decode_reservation(row, 0.3, 1.0)[0] == 1000
    assert p.table.decode_reservation(row, 0.3)[0] == 300


def test_lvf_fifo_and_longest_resident_victims():
    p = LvfPolicy(RotaConfig(lvf_budget_tokens=3000))
    for i, first in enumerate((0.3, 0.1, 0.2)):
        running(p, f"r{i}", tokens=1000, first_s=first, out=5)
    add(p, "w1", 0.5, 800, 1.0, 0.1, 10)
    add(p, "w0", 0.4, 800, 1.0, 0.1, 10)
    plan = plan_at(p, 1.0, cap(500), COSTS, 16384)
    assert plan.admit == ["w0"]  # FIFO head, does not fit: admission stops there
    assert plan.rotate_out == ["r1", "r2", "r0"][: len(plan.rotate_out)]
    assert plan.rotate_out[0] == "r1" and not plan.host_full
    assert plan_at(p, 1.0, cap(50_000), COSTS, 16384).rotate_out == []  # free >= budget: no trigger
    one_fits = plan_at(p, 1.0, cap(500, host=1500), COSTS, 16384)
    assert one_fits.rotate_out == ["r1"] and one_fits.host_full  # the next victim had no room


def test_table_rejects_illegal_transitions_and_duplicates():
    p = SloPolicy(RotaConfig())
    add(p, "x", 0.0, 10, 1.0, 0.1)
    with pytest.raises(ValueError, match="illegal transition"):
        p.table.set_phase("x", Phase.ON_HOST, 0.0)
    with pytest.raises(KeyError):
        add(p, "x", 0.0, 10, 1.0, 0.1)


def test_table_grows_and_reuses_slots():
    p = SloPolicy(RotaConfig())
    for i in range(3000):
        add(p, f"r{i}", float(i), 10, 1.0, 0.1)
    for i in range(0, 3000, 2):
        p.table.remove(f"r{i}")
    assert len(p.table) == 1500
    assert p.table.view("r1").arrival_s == 1.0


def test_cost_model_first_sample_replaces_default_then_smooths():
    cm = CostModel(alpha=0.5)
    assert cm.costs().decode_step_s == DEFAULT_COSTS.decode_step_s
    cm.observe_decode(0.04)
    assert cm.costs().decode_step_s == pytest.approx(0.04)
    cm.observe_decode(0.02)
    assert cm.costs().decode_step_s == pytest.approx(0.03)
    cm.observe_transfer(Transfer(True, 10**9, 0.02))
    assert cm.costs().d2h_bytes_per_s == pytest.approx(5e10)
    # a timed copy: the link's rate from what it moved and how long it ran, not the wait
    cm.observe_transfer(Transfer(False, 10**9, 0.5, link=(10**9, 0.025)))
    assert cm.costs().h2d_bytes_per_s == pytest.approx(4e10)
    for i in range(12):  # 10 req/s, the first five in one burst at t=0
        cm.observe_arrival(0.0 if i < 5 else (i - 4) * 0.1, 100)
    # window [0, 0.5): 5 + 4 arrivals -> 18 req/s (a burst counts, but never as infinite)
    assert cm.costs().arrival_rate_per_s == pytest.approx(18.0)
    assert cm.costs().mean_prompt_tokens == pytest.approx(100.0)


def test_prefill_cost_is_fitted_as_overhead_plus_rate():
    """Small chunks cost more per token: a rate alone would call 256-token chunks slow, and the
    pacing built on it shrank chunks further (256-token chunks at ~10k tokens/s on the H200)."""
    cm = CostModel(alpha=0.2)
    cm.observe_prefill(2000, 0.015 + 2000 * 24e-6)  # one size: default overhead kept, rate fitted
    assert cm.costs().prefill_overhead_s == pytest.approx(DEFAULT_COSTS.prefill_overhead_s)
    assert cm.costs().prefill_s(2000) == pytest.approx(0.015 + 2000 * 24e-6)
    rng = random.Random(0)
    for _ in range(200):
        n = rng.choice([256, 512, 1024, 4096, 8192])
        cm.observe_prefill(n, 0.015 + n * 24e-6)
    c = cm.costs()
    assert c.prefill_overhead_s == pytest.approx(0.015, rel=1e-3)
    assert c.prefill_s_per_token == pytest.approx(24e-6, rel=1e-3)
    assert c.prefill_tokens_within(0.015 + 0.024) == 1000
    assert c.prefill_tokens_within(0.01) == 0


def test_small_prefill_budget_waits_for_a_decode_step_instead():
    """Below the chunk whose fixed cost is half its time, decode first: one step adds a TBT
    minus a step to every stream's slack, so the next chunk can be worth its overhead."""
    costs = dataclasses.replace(COSTS, prefill_overhead_s=0.015)  # worthwhile from 750 tokens
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "s", tokens=100, first_s=0.95, out=1)  # token #1 due 1.05
    add(p, "new", 0.9, 700, 1.0, 0.1, 10)
    # (1.05 - 1.0 - 0.02 - 0.015) / 2e-5 = 750 tokens: just worth it
    budget = plan_at(p, 1.0, cap(100_000), costs, 16384).prefill_token_budget
    assert budget == pytest.approx(750, abs=1)
    assert plan_at(p, 1.002, cap(100_000), costs, 16384).prefill_token_budget == 0


def test_head_prompt_must_fit_the_budget_whole():
    """SGLang runs a chunked prompt's chunks back to back with decode waiting, so a head that
    does not fit the budget whole waits for a decode step instead of being cut to size."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "s", tokens=100, first_s=0.95, out=1)  # budget 1500 at now=1.0 (see above)
    add(p, "big", 0.9, 5000, 1.0, 0.1, 10)
    plan = plan_at(p, 1.0, cap(100_000), COSTS, 16384)
    assert plan.admit == ["big"] and plan.prefill_token_budget == 0
    # A prompt longer than SGLang's batch limit only needs its first batch to fit.
    budget = plan_at(p, 1.0, cap(100_000), COSTS, 1024).prefill_token_budget
    assert budget == pytest.approx(1500, abs=1)


def test_config_validation():
    with pytest.raises(ConfigError, match="--rota-ttft-slo"):
        RotaConfig(ttft_slo_s=0)
    with pytest.raises(ConfigError, match="--rota-policy"):
        RotaConfig(policy="fifo")
    with pytest.raises(ConfigError):
        RotaConfig(tbt_slo_s=float("nan"))
    with pytest.raises(ConfigError, match="--rota-host-numa-node"):
        RotaConfig(host_numa_node="node1")


def _simulate(seed: int, policy_name: str, steps: int = 300, bursts: bool = False
              ) -> list[tuple]:
    """A toy engine driving the policy; returns every plan it made. ``bursts``: now and then
    a hundred or so requests arrive in one iteration with a few short prompt lengths (equal
    EDF keys), in a pool with room for them."""
    rng = random.Random(seed)
    p = create_policy(RotaConfig(policy=policy_name))
    total = 200_000 if bursts else 20_000  # room for a burst: the walk goes past 64
    free, host, plans, now, n = total, 2 * total, [], 0.0, 0
    max_out: dict[str, int] = {}
    for _ in range(steps):
        now += 0.02
        burst = bursts and rng.random() < 0.05
        for _ in range(rng.randrange(80, 200) if burst else rng.randrange(3)):
            rid = f"q{n}"
            n += 1
            prompt = rng.choice((16, 32, 64)) if burst else rng.randrange(100, 2000)
            add(p, rid, now, prompt, 1.0, 0.1, 300)
            max_out[rid] = rng.randrange(10, 200)
        costs = dataclasses.replace(COSTS, arrival_rate_per_s=25.0, mean_prompt_tokens=1000)
        plan = plan_at(p, now, cap(free, total=total, host=host), costs, 8192)
        plans.append((tuple(plan.admit), tuple(plan.rotate_in), tuple(plan.rotate_out)))
        for rid in plan.rotate_out:
            park(p, rid, now)
            k = p.view(rid).num_tokens
            free, host = free + k, host - k
        for rid in plan.rotate_in:
            k = p.view(rid).num_tokens
            p.update([ev.RotationStarted(rid, now, False),
                      TierReport(now_s=now, finished_in=[rid])])
            free, host = free - k, host + k
        for rid in plan.admit:
            need = p.view(rid).num_prompt_tokens
            if need <= free:
                p.update([ev.PrefillDone(rid, now, need, 1)])
                free -= need
        run = p.ids_in(Phase.RUNNING)
        if run:
            p.update([ev.Decoded(tuple(run))])
            free -= len(run)
        for rid in run:
            v = p.view(rid)
            if v.num_output_tokens >= max_out[rid]:
                free += v.num_tokens
                p.update([ev.Finished(rid)])
        assert host >= 0
    return plans


@pytest.mark.parametrize("name", ["slo", "lvf"])
def test_two_ranks_reach_identical_decisions(name):
    rank0, rank1 = _simulate(7, name), _simulate(7, name)
    assert rank0 == rank1
    assert any(p[2] for p in rank0), "the simulation never rotated: it tests nothing"


@pytest.mark.parametrize("seed", range(4))
def test_plans_stay_consistent_through_bursts_of_equal_requests(seed):
    # every plan passes StepPlan.check (no request twice, nothing both admitted and rotated);
    # bursts of short equal prompts in one iteration (over 64 fit one prefill batch) made the
    # admission walk take requests twice
    plans = _simulate(seed, "slo", steps=400, bursts=True)
    assert any(p[2] for p in plans) and sum(len(p[0]) for p in plans) > 200


def test_policy_core_imports_without_torch_or_sglang():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['sglang'] = None; "
            "import superinfer.policy, superinfer.config; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_slo_arithmetic_vectorizes():
    first = np.array([0.0, 1.0])
    assert list(deadlines.next_token_deadline(first, np.array([10, 0]), 0.1)) == [1.0, 1.0]
    assert deadlines.next_token_deadline(0.5, 3, 0.1) == pytest.approx(0.8)


def test_prefill_budget_follows_the_least_slack_of_on_pace_streams():
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "tight", tokens=100, first_s=0.95, out=1)  # next token due 1.05: 30 ms slack at 1.0
    running(p, "loose", tokens=100, first_s=0.0, out=30)  # due 3.0
    for i in range(3):  # TTFT due 1.05: the 3000-token batch had to start by 0.99
        add(p, f"n{i}", 0.05, 1000, 1.0, 0.1, 10)
    plan = plan_at(p, 1.0, cap(100_000), COSTS, 16384)
    # (1.05 - 1.0 - 0.02 s step) / 2e-5 s per token = 1500 tokens: one 1000-token prompt fits
    assert plan.prefill_token_budget == pytest.approx(1500, abs=1)
    assert plan.admit == ["n0"]
    # Too little slack left on an on-time stream for a worthwhile chunk: decode first.
    # 5 ms: 250 tokens
    assert plan_at(p, 1.025, cap(100_000), COSTS, 16384).prefill_token_budget == 0
    off = SloPolicy(RotaConfig(prefill_pacing=False))
    running(off, "tight", tokens=100, first_s=0.95, out=1)
    assert plan_at(off, 1.0, cap(100_000), COSTS, 16384).prefill_token_budget is None


def test_short_budget_waits_for_decode_steps_that_earn_the_whole_batch():
    """A budget short of the batch the queue fills waits for decode steps (each earns a stream
    its TBT minus the step) when they earn the slack for all of it before a waiting request
    that can still make its TTFT must start: cutting the queue into what the slack allows at
    once pays the prefill's fixed cost again for every cut."""
    costs = dataclasses.replace(COSTS, prefill_overhead_s=0.01)
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "s", tokens=100, first_s=0.95, out=1)  # token #1 due 1.05: 30 ms of slack at 1.0
    for i in range(3):  # TTFT due 1.9: the 3000-token batch (70 ms) must start by 1.83
        add(p, f"n{i}", 0.9, 1000, 1.0, 0.1, 10)
    # 1000 tokens fit now; the whole batch needs 70 ms: one 20 ms step earns 80 ms more
    plan = plan_at(p, 1.0, cap(100_000), costs, 16384)
    assert plan.prefill_token_budget == 0 and plan.admit == ["n0"]
    # ... unless a request that can still make its TTFT would miss it by then: take the cut
    q = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(q, "s", tokens=100, first_s=0.95, out=1)
    add(q, "n0", 0.0, 1000, 1.05, 0.1, 10)  # due 1.05: the whole batch starts too late for it
    for i in (1, 2):
        add(q, f"n{i}", 0.9, 1000, 1.0, 0.1, 10)
    plan = plan_at(q, 1.0, cap(100_000), costs, 16384)
    assert plan.prefill_token_budget == pytest.approx(1000, abs=1) and plan.admit == ["n0"]
    # ... or if decode steps earn nothing (one takes a TBT; by default such a stream would not
    # hold prefill back at all, pacing_step_share): take what fits now
    flat = dataclasses.replace(COSTS, decode_step_s=0.06)
    r = SloPolicy(RotaConfig(reserve_window_s=0.0, pacing_step_share=2.0))
    running(r, "s", tokens=100, first_s=0.95, out=2, tbt=0.06)  # due 1.07: 10 ms of slack
    for i in range(3):
        add(r, f"n{i}", 0.9, 400, 1.0, 0.1, 10)
    plan = plan_at(r, 1.0, cap(100_000), flat, 16384)
    assert plan.prefill_token_budget == pytest.approx(500, abs=1) and plan.admit == ["n0"]


def test_where_compute_binds_and_requests_are_late_the_whole_queue_fills_the_batch():
    """Where compute binds and requests already wait past their latest start, the batch worth
    waiting for is the one the whole queue fills, and a request that could make its TTFT only
    in a smaller batch is served late; otherwise only the requests that can still make their
    TTFT count."""
    costs = dataclasses.replace(COSTS, prefill_overhead_s=0.01)

    def policy(late: bool) -> SloPolicy:
        p = SloPolicy(RotaConfig(reserve_window_s=0.0))
        running(p, "s", tokens=100, first_s=0.95, out=1)  # 30 ms of slack at 1.0
        # past its TTFT (served after the others), or not due for a while
        add(p, "other", 0.0 if late else 0.95, 2000, 0.5 if late else 1.0, 0.1, 10)
        add(p, "soon", 0.01, 1000, 1.05, 0.1, 10)  # due 1.06: makes it in a 1000-token batch
        return p

    def budget(p: SloPolicy, bound: str) -> int | None:
        return p.plan(StepSnapshot(1.0, cap(100_000), costs, 16384, bound=bound)
                      ).prefill_token_budget

    # Memory binds: the batch of those that can make it is "soon" alone (whose own key comes
    # first), and its 1000 tokens (30 ms) fit now, so it goes now.
    assert budget(policy(late=True), "memory") == pytest.approx(1000, abs=1)
    # Compute binds and "other" is late: the 3000-token batch, which "soon" cannot make, is
    # worth a decode step.
    assert budget(policy(late=True), "compute") == 0
    # Compute binds but nobody is late: "other" (due 1.95) can make it in a later batch, and
    # the batch of the two (3000 tokens) must start by 1.06 - 0.07 for "soon": it goes now.
    assert budget(policy(late=False), "compute") == pytest.approx(1000, abs=1)


def test_prefill_budget_counts_from_the_batches_in_flight():
    """Overlap scheduling: the next batch starts when the one in flight ends, and only tokens
    not launched yet can be delayed by it."""
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    running(p, "s", tokens=100, first_s=0.95, out=1)  # token #1 due 1.05
    # No batch in flight: (1.05 - 1.0 - 0.02) / 2e-5.
    budget = plan_at(p, 1.0, cap(100_000), COSTS, 16384).prefill_token_budget
    assert budget == pytest.approx(1500, abs=1)
    # Its token #1 is in a decode batch that ends at 1.02: the next batch risks token #2 (1.15).
    p.update([ev.InFlight({"s": 1})])
    plan = plan_at(p, 1.0, cap(100_000), COSTS, 16384, gpu_free_at_s=1.02)
    assert plan.prefill_token_budget == pytest.approx((1.15 - 1.02 - 0.02) / 2e-5, abs=1)
    p.update([ev.InFlight({})])  # the result came back: counts are set afresh, never drift
    assert p.table.tokens_in_flight[p.table._row_of["s"]] == 0


def test_prefill_in_flight_paces_its_stream_from_the_expected_first_token():
    p = SloPolicy(RotaConfig(reserve_window_s=0.0))
    t = p.table
    add(p, "a", 0.9, 3000, 1.0, 0.1, 100)
    add(p, "b", 0.95, 3500, 1.0, 0.1, 100)
    p.update([ev.PrefillLaunched("a", 1.0, first_token_s=1.06),  # last chunk; result not back yet
              ev.InFlight({"a": 1})])
    assert t.phase_of("a") is Phase.PREFILLING
    plan = plan_at(p, 1.0, cap(100_000), COSTS, 16384, gpu_free_at_s=1.06)
    # a's second token is due 1.16: after the batch in flight, (1.16 - 1.06 - 0.02) / 2e-5.
    assert plan.prefill_token_budget == pytest.approx(4000, abs=1)
    assert plan.admit == ["b"]  # a is not admitted twice; b is the head and fits the budget
    p.update([ev.PrefillDone("a", 1.07, 3000, 1)])  # the real first token replaces the estimate
    assert t.first_token_s[t._row_of["a"]] == pytest.approx(1.07)
    assert t.num_output_tokens[t._row_of["a"]] == 1
    # A non-final chunk gives no first token and no pace.
    p.update([ev.PrefillLaunched("b", 1.07, first_token_s=None)])
    assert np.isnan(t.first_token_s[t._row_of["b"]])


def test_admission_walks_past_its_first_pass_without_admitting_anyone_twice():
    # Requests that arrive in one scheduler receive share an arrival time; with equal prompts
    # their EDF keys tie across the first pass's cut, and the deeper ranking may order the
    # tied ones differently. Each must be taken once (a twice-admitted request failed
    # StepPlan.check, an AssertionError in the scheduler).
    for n, room in ((100, 100 * 200), (300, 150 * 200 + 50)):
        p = SloPolicy(RotaConfig(prefill_pacing=False))
        for i in range(n):
            add(p, f"r{i}", (i % 2) / 10, 100, 1.0, 0.1, 100)
        plan = plan_at(p, 0.5, cap(room), COSTS, 10**6)
        fits = room // 200
        assert len(plan.admit) == len(set(plan.admit)) == min(n, fits + 1)
        assert [int(r[1:]) % 2 for r in plan.admit[:fits]] == sorted(
            int(r[1:]) % 2 for r in plan.admit[:fits])  # earlier arrivals first


def test_where_compute_binds_pacing_spends_only_its_share_of_gpu_time():
    """A decode step put ahead of a prefill that could run costs a step of throughput where
    compute binds: pacing pays for it from a credit that grows by ``pacing_cost_share`` of the
    elapsed time. Without credit, prefill runs unpaced. Where compute does not bind, pacing is
    free and never stops."""
    cfg = RotaConfig(reserve_window_s=0.0, pacing_cost_share=0.05)

    def policy() -> SloPolicy:
        p = SloPolicy(cfg)
        running(p, "s", tokens=100, first_s=0.0, out=1)  # behind its pace: decode first
        add(p, "w", 0.95, 1000, 1.0, 0.1, 10)
        return p

    def budget(p: SloPolicy, now_s: float, bound: str) -> int | None:
        return p.plan(StepSnapshot(now_s, cap(100_000), COSTS, 16384, bound=bound)
                      ).prefill_token_budget

    paced = int(pacing.CREDIT_MAX_S / COSTS.decode_step_s + 0.5)  # steps the full credit buys
    p = policy()
    assert [budget(p, 1.0, "compute") for _ in range(paced)] == [0] * paced
    plan = p.plan(StepSnapshot(1.0, cap(100_000), COSTS, 16384, bound="compute"))
    assert plan.prefill_token_budget is None and plan.admit == ["w"]  # the credit is spent
    # 0.4 s later the credit has grown by 0.05 x 0.4 = 0.02 s: one more paced step, then none.
    assert budget(p, 1.4, "compute") == 0
    assert budget(p, 1.4, "compute") is None
    p = policy()
    assert all(budget(p, 1.0, bound) == 0 for _ in range(3 * paced) for bound in ("memory", "none"))


def test_pacing_pays_for_a_decode_step_first_and_for_a_batch_cut_short():
    """What pacing costs where compute binds: a decode step ahead of a runnable prefill costs
    the step; a batch cut short of what the queue would fill costs a forward's fixed part
    again; a batch that memory or the queue limits costs pacing nothing."""
    costs = dataclasses.replace(COSTS, prefill_overhead_s=0.03)
    p = SloPolicy(RotaConfig())
    add(p, "w", 0.9, 3000, 1.0, 0.1, 10)
    credit = p.pacer.credit_s
    p.pacer.charge(0, 16384, costs)
    assert p.pacer.credit_s == pytest.approx(credit - 0.02)
    p.pacer.charge(1000, 16384, costs)  # the queue's 3000 tokens would fit: a cut
    assert p.pacer.credit_s == pytest.approx(credit - 0.05)
    p.pacer.charge(3000, 16384, costs)  # the whole queue
    p.pacer.charge(1000, 800, costs)  # memory allows less than the budget anyway
    assert p.pacer.credit_s == pytest.approx(credit - 0.05)
