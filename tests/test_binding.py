"""Which resource binds (policy.binding) and the probe that measures it inside SGLang."""

from __future__ import annotations

import math
import time
import types

import pytest

from superinfer.adapters.sglang.binding_probe import BindingProbe
from superinfer.adapters.sglang.stats import parse_records
from superinfer.policy.binding import BindingMonitor, BindingTimes, classify, wait_reason


@pytest.mark.parametrize("times, bound", [
    (BindingTimes(), "none"),  # nothing observed
    (BindingTimes(prefill_s=3, decode_s=7, memory_wait_s=0.5, compute_wait_s=0.4), "none"),
    (BindingTimes(prefill_s=4, decode_s=6, memory_wait_s=3, compute_wait_s=2), "memory"),
    # waits behind prefills dominate and prefills fill the GPU: compute
    (BindingTimes(prefill_s=7, decode_s=3, memory_wait_s=1, compute_wait_s=5), "compute"),
    # ... but not by the required margin: memory still binds too
    (BindingTimes(prefill_s=7, decode_s=3, memory_wait_s=3, compute_wait_s=5), "memory"),
    # ... or prefills fill too little of the GPU: waiting in line, nothing binds
    (BindingTimes(prefill_s=4, decode_s=6, memory_wait_s=1, compute_wait_s=4), "none"),
    (BindingTimes(prefill_s=2, decode_s=8, compute_wait_s=5), "none"),
    # ... unless the decode steps ran because a rotation policy held prefill back (pacing):
    # prefills would have filled that time
    (BindingTimes(prefill_s=2, decode_s=8, compute_wait_s=5, paced_s=3), "compute"),
])
def test_classify(times, bound):
    assert classify(times) == bound == times.bound()


@pytest.mark.parametrize("gpu, waiting, room_needed, reason", [
    ("decode", False, None, None),
    ("prefill", True, None, "compute"),  # SGLang's rule: behind a prefill, for the GPU
    ("decode", True, None, "memory"),  # ... otherwise for room
    ("idle", True, None, "memory"),
    ("decode", True, True, "memory"),  # a rotation policy's head needed room
    ("decode", True, False, "compute"),  # ... or it held prefill back for the streams
    ("prefill", True, True, "compute"),
])
def test_wait_reason(gpu, waiting, room_needed, reason):
    assert wait_reason(gpu, waiting, room_needed) == reason


def test_monitor_charges_each_span_to_the_state_it_started_in():
    m = BindingMonitor(tau_s=1e9)
    m.observe(0.0, "prefill", "compute", 0.5)
    m.observe(2.0, "decode", "memory", 1.0)
    m.observe(5.0, "idle", None, 0.0)
    m.observe(6.0, "decode", None, 0.25)
    w = m.take_window()
    assert (w.prefill_s, w.decode_s, w.idle_s) == (2.0, 3.0, 1.0)
    assert (w.compute_wait_s, w.memory_wait_s) == (2.0, 3.0)
    assert w.paced_s == 0.0  # no decode while requests waited for the GPU
    assert w.kv_used_s == pytest.approx(2 * 0.5 + 3 * 1.0)
    assert w.stall_s == 3.0  # an iteration of 3 s: a stall (2 s is not)
    assert m.take_window().total_s == 0  # taken: the next window starts empty
    m.pause(7.0)  # the decode from 6.0 is charged; the gap until 100.0 is not
    m.observe(100.0, "prefill", None, 0.0)
    m.observe(101.0, "idle", None, 0.0)
    w = m.take_window()
    assert (w.decode_s, w.prefill_s, w.idle_s) == (1.0, 1.0, 0.0)
    assert w.stall_s == 0.0
    m.observe(104.6, "decode", "memory", 0.5)  # 3.6 s in one iteration: the loop stalled
    assert m.take_window().stall_s == pytest.approx(3.6)


def test_decode_while_requests_wait_for_the_gpu_is_paced_time():
    m = BindingMonitor(tau_s=1e9)
    m.observe(0.0, "decode", "compute", 0.5)  # a rotation policy held prefill back
    m.observe(1.5, "prefill", "compute", 0.5)
    m.observe(2.0, "decode", "memory", 0.5)
    m.observe(3.0, "idle", None, 0.0)
    w = m.take_window()
    assert (w.paced_s, w.decode_s, w.compute_wait_s) == (1.5, 2.5, 2.0)
    assert w.as_dict()["paced_share"] == pytest.approx(0.5)


def test_recent_view_forgets_old_load():
    m = BindingMonitor(tau_s=1.0)
    m.observe(0.0, "decode", "memory", 0.9)
    m.observe(10.0, "prefill", "compute", 0.9)
    assert m.recent_bound() == "memory"
    m.observe(20.0, "prefill", None, 0.9)  # ten time constants of compute waits later
    assert m.recent_bound() == "compute"
    assert m.recent.memory_wait_s == pytest.approx(10.0 * math.exp(-10.0), rel=1e-6)
    assert m.take_window().bound() == "memory"  # the whole window: 10 s of each, a tie


def test_monitor_rejects_unknown_states():
    m = BindingMonitor()
    with pytest.raises(ValueError, match="gpu must be"):
        m.observe(0.0, "busy", None, 0.0)
    with pytest.raises(ValueError, match="wait must be"):
        m.observe(0.0, "decode", "kv", 0.0)


def test_record_round_trip():
    t = BindingTimes(prefill_s=1.5, decode_s=2.5, idle_s=1.0, memory_wait_s=2.0,
                     compute_wait_s=0.5, kv_used_s=3.0)
    d = t.as_dict()
    assert d["bound"] == "memory" and d["prefill_share"] == 0.3 and d["kv_used_mean"] == 0.6
    assert BindingTimes.from_dict(d) == t


def test_probe_reads_sglang_batches_and_logs_records(caplog):
    """Under SGLang's own rule: waiting during a prefill is a wait for the GPU, waiting during
    a decode step is a wait for room; the record carries the seconds and the bound."""
    from tests.sglang_parts import SchedulerParts

    parts = SchedulerParts(schedule_policy="lpm")
    probe = BindingProbe(parts)
    reqs = [parts.make_req(f"b{i}", 40, max_new_tokens=8) for i in range(3)]
    parts.waiting_queue = [reqs[2]]
    batch = parts.prefill(reqs[:2])
    with caplog.at_level("INFO", logger="superinfer"):
        probe.launched(batch, now_s=0.0)  # prefill while b2 waits: for the GPU
        used = probe._kv_used()
        assert used == pytest.approx(80 / parts.max_total_num_tokens)
        batch.prepare_for_decode()  # the same requests, now a decode step: b2 waits for room
        probe.launched(batch, now_s=1.0)
        parts.waiting_queue = []
        probe.launched(None, now_s=4.0)  # nothing to run, nobody waits
        probe.idle(now_s=5.0)
    [rec] = [r for r in parse_records(caplog.text) if r["kind"] == "binding"]
    assert (rec["prefill_s"], rec["decode_s"], rec["idle_s"]) == (1.0, 3.0, 1.0)
    assert (rec["compute_wait_s"], rec["memory_wait_s"]) == (1.0, 3.0)
    assert rec["bound"] == "memory" and rec["tp_rank"] == 0 and rec["wall_s"] > 0
    with caplog.at_level("INFO", logger="superinfer"):
        for t in range(6, 20):  # SGLang's idle loop: no batch, nobody waits, idle again
            probe.launched(None, now_s=float(t))
            probe.idle(now_s=t + 0.5)
    assert len([r for r in parse_records(caplog.text) if r["kind"] == "binding"]) == 1


def test_probe_takes_a_rotation_policy_word_on_room():
    """Under rotasched a decode step while requests wait is a wait for room only when the
    plan's head needed room; otherwise the policy held prefill back for the streams."""
    from tests.sglang_parts import SchedulerParts

    parts = SchedulerParts()
    probe = BindingProbe(parts)
    reqs = [parts.make_req(f"c{i}", 30, max_new_tokens=8) for i in range(2)]
    batch = parts.prefill(reqs[:1])
    batch.prepare_for_decode()
    parts.waiting_queue = [reqs[1]]
    probe.launched(batch, now_s=0.0, room_needed=False)
    probe.launched(batch, now_s=1.0, room_needed=True)
    probe.launched(batch, now_s=3.0, room_needed=False)
    w = probe.monitor.take_window()
    assert (w.compute_wait_s, w.memory_wait_s) == (1.0, 2.0)


def test_rota_monitor_attaches_the_probe_under_another_policy(caplog, monkeypatch):
    """``--rota-monitor`` under lpm: the hooks attach a BindingProbe (no rotator), feed it every
    batch SGLang picks, and log its record when the scheduler goes idle."""
    from sglang.srt.managers.schedule_batch import NextBatchPlan

    from superinfer.adapters.sglang import hooks
    from tests.sglang_parts import SchedulerParts

    parts = SchedulerParts(schedule_policy="lpm")
    hooks._init_schedule_policy(lambda s: None, parts)
    assert getattr(parts, "_superinfer_probe", None) is None  # off by default
    # (the hook reads these two fields; SGLang 0.5.23's ServerArgs is read-only once resolved)
    parts.server_args = types.SimpleNamespace(schedule_policy="lpm", rota_monitor=True)
    hooks._init_schedule_policy(lambda s: None, parts)
    assert isinstance(parts._superinfer_probe, BindingProbe)
    assert getattr(parts, "_superinfer_rotator", None) is None
    clock = iter([0.0, 2.0, 3.0])
    monkeypatch.setattr("superinfer.adapters.sglang.binding_probe.time",
                        types.SimpleNamespace(monotonic=lambda: next(clock), time=time.time))
    req = parts.make_req("m0", 30, max_new_tokens=4)
    parts.waiting_queue = [req]

    def original(scheduler, running_batch, last_batch):
        batch = parts.prefill(list(scheduler.waiting_queue))
        scheduler.waiting_queue = []
        return NextBatchPlan(batch_to_run=batch, running_batch=running_batch)

    with caplog.at_level("INFO", logger="superinfer"):
        hooks._get_next_batch_to_run(original, parts, parts.empty_batch(), None)  # at 0.0
        hooks._get_next_batch_to_run(lambda *a: NextBatchPlan(None, a[1]), parts,
                                     parts.empty_batch(), None)  # nothing: idle from 2.0
        assert hooks._is_fully_idle(True, parts) is True  # idle at 3.0: the record
    [rec] = [r for r in parse_records(caplog.text) if r["kind"] == "binding"]
    assert (rec["prefill_s"], rec["idle_s"]) == (2.0, 1.0) and rec["bound"] == "none"
