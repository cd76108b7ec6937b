"""HostTierManager alone, on the CPU with the real pool and TorchMover: who owns which host
pages through rotate-out, rotate-in, kept copies, write-through and drops (no SGLang)."""

from __future__ import annotations

import pytest
import torch

from superinfer.host_tier.interface import KVLayout, mha_planes
from superinfer.host_tier.manager import HostTierManager, TierState
from superinfer.host_tier.pool import HostKVPool
from superinfer.host_tier.torch_mover import TorchMover

LAYERS, HEADS, HEAD_DIM, DEVICE_SLOTS, PAGE = 2, 2, 4, 256, 16


def make(host_tokens: int = 256, keep: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.rand((LAYERS, 2, DEVICE_SLOTS, HEADS, HEAD_DIM), generator=gen) + 0.5
    layout = KVLayout(LAYERS, HEADS, HEAD_DIM, 4)
    pool = HostKVPool(layout, host_tokens, PAGE, torch.float32, pin_memory=False)
    mover = TorchMover(mha_planes(kv[:, 0], kv[:, 1]), pool)
    return kv, HostTierManager(pool, mover, layout.bytes_per_token, keep_copies=keep)


def held(tier: HostTierManager) -> int:
    return tier.pages.size - tier.pages.available_size()


def test_round_trip_restores_every_byte_and_frees_every_page():
    kv, tier = make()
    slots = torch.randperm(DEVICE_SLOTS)[:40]
    before = kv[:, :, slots].clone()
    assert tier.plan_out("a", 40) == 40
    nbytes = tier.start_out("a", slots, None, now_s=1.0)
    assert nbytes == 40 * tier.bytes_per_token and tier.state("a") is TierState.ROTATING_OUT
    report = tier.poll(1.5)
    assert report.finished_out == ["a"] and tier.state("a") is TierState.ON_HOST
    assert report.transfers[0].to_host and report.transfers[0].elapsed_s == pytest.approx(0.5)
    kv[:, :, slots] = 0  # the device slots go back to SGLang and are reused
    new = torch.randperm(DEVICE_SLOTS)[:30]
    tier.start_in("a", new, prefix_len=10, ready=None, now_s=2.0)  # 10 tokens still on device
    assert tier.poll(2.1).finished_in == ["a"]
    assert torch.equal(kv[:, :, new], before[:, :, 10:])
    assert tier.state("a") is None and held(tier) == 0
    tier.check()


def test_kept_copy_moves_only_the_tail_and_is_evicted_oldest_first():
    kv, tier = make(host_tokens=128, keep=True)
    a, b = torch.arange(0, 40), torch.arange(100, 160)
    for rid, slots in (("a", a), ("b", b)):
        tier.start_out(rid, slots, None, 0.0)
        tier.poll(0.0)
        tier.start_in(rid, slots, 0, None, 0.0)
        report = tier.poll(0.0)
    assert report.host_tokens == {"a": 32, "b": 48}  # whole pages kept
    assert tier.state("a") is TierState.KEPT and tier.free_tokens() == 128
    # a decoded 9 more tokens: only [32, 49) moves out
    a = torch.arange(0, 49)
    assert tier.plan_out("a", 49) == 17
    assert tier.start_out("a", a, None, 1.0) == 17 * tier.bytes_per_token
    assert tier.stats.bytes_d2h_saved == 32 * tier.bytes_per_token
    # the cost model hears of the whole KV the copy stands for (the policy prices whole KV)
    assert tier.poll(1.0).transfers[0].num_bytes == 49 * tier.bytes_per_token
    # c needs 64 tokens (4 pages); 1 is free: b's kept copy (3 pages) goes, a is away
    assert tier.pages.available_size() == 16
    tier.start_out("c", torch.arange(180, 244), None, 1.0)
    assert tier.state("b") is None and tier.stats.host_copies_evicted == 1
    tier.check()


def test_no_room_changes_nothing():
    kv, tier = make(host_tokens=64, keep=True)
    tier.start_out("a", torch.arange(0, 48), None, 0.0)
    tier.poll(0.0)
    assert tier.plan_out("b", 20) is None
    assert tier.start_out("b", torch.arange(50, 70), None, 0.0) is None
    assert tier.state("b") is None and held(tier) == 48
    tier.check()


def test_drop_while_a_copy_runs_frees_its_pages_when_it_lands():
    kv, tier = make()
    tier.start_out("a", torch.arange(0, 20), None, 0.0)
    assert tier.collect() == (1, 0)
    tier.poll(0.0, num_d2h=0, num_h2d=0)  # the other TP rank is not done yet
    assert not tier.drop("a") and tier.dropped("a") and held(tier) == 32
    report = tier.poll(0.1)
    assert report.finished_out == ["a"] and report.cancelled == {"a"}
    assert tier.state("a") is None and held(tier) == 0
    tier.check()


def test_a_rotate_out_with_nothing_to_copy_completes_behind_the_jobs_before_it():
    """A kept copy covering the whole KV moves nothing, but its completion still waits for
    earlier jobs: every TP rank must finish the same jobs in the same order."""
    kv, tier = make(keep=True)
    tier.start_out("a", torch.arange(0, 32), None, 0.0)
    tier.poll(0.0)
    tier.start_in("a", torch.arange(0, 32), 0, None, 0.0)
    tier.poll(0.0)
    tier.start_out("b", torch.arange(40, 60), None, 0.0)  # a real copy first...
    assert tier.start_out("a", torch.arange(0, 32), None, 0.0) == 0  # ...then an empty one
    tier.poll(0.0, num_d2h=0, num_h2d=0)
    assert tier.collect() == (2, 0)
    assert tier.poll(0.0, num_d2h=1, num_h2d=0).finished_out == ["b"]
    assert tier.poll(0.0).finished_out == ["a"]
    tier.check()


def test_write_through_extends_a_kept_copy_and_is_freed_if_it_lands_too_late():
    kv, tier = make(host_tokens=512, keep=True)
    running = [("a", 40), ("b", 20), ("c", 10)]
    tier.write_through(running, lambda rid: torch.arange(0, 64), budget_tokens=1000, ready=None)
    assert tier.num_writes_in_flight() == 2  # c has no full page yet
    tier.write_through(running, lambda rid: torch.arange(0, 64), 1000, None)  # one batch at a time
    assert tier.num_writes_in_flight() == 2
    assert tier.poll(0.0).host_tokens == {"a": 32, "b": 16}
    assert tier.stats.bytes_written_through == 48 * tier.bytes_per_token
    tier.write_through([("a", 50)], lambda rid: torch.arange(0, 64), 1000, None)
    tier.drop("a")  # a finished while its pages were on their way
    assert tier.poll(0.0).host_tokens == {"b": 16}
    assert held(tier) == 16
    tier.check()


def test_check_catches_a_leaked_page():
    kv, tier = make()
    tier.start_out("a", torch.arange(0, 20), None, 0.0)
    tier.poll(0.0)
    tier.pages.alloc(16)  # owned by nobody
    with pytest.raises(AssertionError, match="leak"):
        tier.check()


def test_injected_copy_failures_free_the_pages_and_say_which_way_failed():
    kv, tier = make(keep=True)
    tier._fail_copies = {True: frozenset({2}), False: frozenset({1})}
    tier.start_out("a", torch.arange(0, 20), None, 0.0)
    tier.start_out("b", torch.arange(30, 50), None, 0.0)  # the 2nd rotate-out copy fails
    report = tier.poll(0.0)
    assert report.finished_out == ["a"] and report.failed_out == ["b"]
    assert tier.state("b") is None and tier.stats.copies_failed_d2h == 1
    tier.start_in("a", torch.arange(60, 80), 0, None, 0.0)  # the 1st rotate-in copy fails
    report = tier.poll(0.0)
    assert report.finished_in == [] and report.failed_in == ["a"] and held(tier) == 0
    assert tier.stats.copies_failed_h2d == 1 and tier.state("a") is None
    tier.check()


def test_a_failed_copy_of_a_dropped_request_is_just_a_cancellation():
    kv, tier = make()
    tier._fail_copies = {True: frozenset({1})}
    tier.start_out("a", torch.arange(0, 20), None, 0.0)
    tier.poll(0.0, num_d2h=0, num_h2d=0)
    tier.drop("a")
    report = tier.poll(0.0)
    assert report.failed_out == [] and report.cancelled == {"a"} and held(tier) == 0


def test_a_mover_fault_stops_with_a_clear_error():
    from superinfer.host_tier.manager import HostTierFault

    kv, tier = make()

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    tier.mover.poll = broken
    with pytest.raises(HostTierFault, match="illegal memory access.*stopping"):
        tier.collect()


def test_the_fault_switch_parses_and_rejects_nonsense():
    from superinfer.config import ConfigError
    from superinfer.env import TEST_FAIL_COPY, test_fail_copies

    assert test_fail_copies({}) == {}
    assert test_fail_copies({TEST_FAIL_COPY: "d2h:3, h2d:1,d2h:5"}) == {
        True: frozenset({3, 5}), False: frozenset({1})}
    for bad in ("d2h", "up:1", "h2d:0", "d2h:x"):
        with pytest.raises(ConfigError, match=TEST_FAIL_COPY):
            test_fail_copies({TEST_FAIL_COPY: bad})
