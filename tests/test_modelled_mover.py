"""eval.lib.modelled_mover: the simulator's byte-less KVMover keeps the mover contract (one
link per direction, jobs in submission order, done by the clock) and runs the product's
HostTierManager the way a real mover does."""

from __future__ import annotations

import pytest
import torch

from eval.lib.modelled_mover import ModelledMover
from superinfer.host_tier.manager import HostTierManager, TierState
from superinfer.host_tier.pool import HostPages

BPT = 1000  # bytes per token
RATE = 1e6  # bytes per second: 1,000 tokens a second, 1 ms a token


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def slots(n: int) -> torch.Tensor:
    return torch.arange(n)


def make() -> tuple[Clock, ModelledMover]:
    clock = Clock()
    return clock, ModelledMover(clock, RATE, BPT)


def test_jobs_of_one_direction_queue_and_finish_in_order_by_the_clock():
    clock, mover = make()
    assert mover.next_done_s() is None and mover.busy_until(True) <= clock.now
    assert mover.submit_d2h("a", slots(100), slots(100), None) == 100 * BPT
    assert mover.submit_d2h("b", slots(50), slots(50), None) == 50 * BPT  # behind a
    assert mover.next_done_s() == pytest.approx(0.1)
    clock.now = 0.099
    report = mover.poll()
    assert report.done_d2h == [] and mover.busy_until(True) > clock.now
    clock.now = 0.1
    report = mover.poll()
    assert report.done_d2h == ["a"] and report.bytes_d2h == 100 * BPT
    assert mover.next_done_s() == pytest.approx(0.15) and mover.busy_until(True) > clock.now
    clock.now = 1.0
    assert mover.poll().done_d2h == ["b"] and mover.poll().done_d2h == []
    assert mover.next_done_s() is None and mover.busy_until(True) <= clock.now


def test_the_two_directions_run_at_once_and_an_idle_link_starts_now():
    clock, mover = make()
    mover.submit_d2h("out", slots(100), slots(100), None)
    clock.now = 0.05
    mover.submit_h2d("in", slots(20), slots(20))  # its own link: not behind "out"
    assert mover.busy_until(True) > clock.now and mover.busy_until(False) > clock.now
    assert mover.next_done_s() == pytest.approx(0.07)
    clock.now = 0.07
    report = mover.poll()
    assert report.done_h2d == ["in"] and report.done_d2h == [] and report.bytes_h2d == 20 * BPT
    clock.now = 2.0  # idle since 0.1: the next job starts at 2.0, not at 0.1
    mover.poll()
    mover.submit_d2h("late", slots(10), slots(10), None)
    assert mover.next_done_s() == pytest.approx(2.01)


def test_bad_rates_are_refused():
    with pytest.raises(ValueError):
        ModelledMover(Clock(), 0.0, BPT)


def test_it_runs_the_host_tier_manager_through_a_round_trip_with_a_kept_copy():
    clock, mover = make()
    tier = HostTierManager(HostPages(256, 16), mover, BPT, keep_copies=True)
    assert tier.start_out("a", slots(40), None, now_s=0.0) == 40 * BPT
    assert tier.poll(0.02).finished_out == []  # 40 ms on the link
    clock.now = 0.04
    report = tier.poll(clock.now)
    assert report.finished_out == ["a"] and tier.state("a") is TierState.ON_HOST
    assert report.transfers[0].elapsed_s == pytest.approx(0.04)
    tier.start_in("a", slots(40), 0, None, clock.now)
    clock.now = 0.08
    assert tier.poll(clock.now).host_tokens == {"a": 32}  # back, with its whole pages kept
    assert tier.start_out("a", slots(45), None, clock.now) == 13 * BPT  # only the tail moves
    assert tier.stats.bytes_d2h_saved == 32 * BPT
    clock.now = 1.0
    (tail,) = tier.poll(clock.now).transfers
    # priced by the whole KV over the wait, and timed by what it moved over its own 13 ms
    assert tail.num_bytes == 45 * BPT and tail.elapsed_s == pytest.approx(0.92)
    assert tail.link == (13 * BPT, pytest.approx(0.013))
    tier.check()


def test_write_through_is_a_d2h_job_on_the_same_link():
    clock, mover = make()
    tier = HostTierManager(HostPages(256, 16), mover, BPT, keep_copies=True)
    tier.write_through([("a", 40)], lambda rid: slots(40), budget_tokens=100, ready=None)
    assert mover.busy_until(True) > clock.now and mover.next_done_s() == pytest.approx(0.032)
    tier.start_out("b", slots(10), None, clock.now)  # behind the write-through
    assert mover.next_done_s() == pytest.approx(0.032)
    clock.now = 0.042
    report = tier.poll(clock.now)
    assert report.host_tokens == {"a": 32} and report.finished_out == ["b"]
    assert report.transfers[0].elapsed_s == pytest.approx(0.042)  # waited for the link
    assert report.transfers[0].link == (10 * BPT, pytest.approx(0.01))  # ran 10 ms on it
    tier.check()
