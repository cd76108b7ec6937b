"""Random traffic through real SGLang parts and the Rotator (tests/churn.py): every request
ends, nothing leaks at any idle period, and rotation, aborts and SGLang's retraction all ran."""

from __future__ import annotations

import json
import os

import pytest
from churn import VirtualClock, churn
from test_rotation_sglang import fresh

from superinfer.policy import CostModel


@pytest.fixture
def gpu_step_costs(monkeypatch):
    """On the real clock: decode steps priced as a GPU's (the default 25 ms), not as this CPU
    stand-in's microseconds: at those, finishing streams free room long before any deadline
    and the policy never needs to rotate."""
    monkeypatch.setattr(CostModel, "observe_decode", lambda self, *measured: None)


@pytest.mark.parametrize("page_size,radix,mover", [(1, True, "auto"), (16, False, "auto"),
                                                   (16, True, "direct")])
def test_random_traffic_ends_every_request_and_leaks_nothing(page_size, radix, mover):
    # A device pool of ~4 requests' worst case and a host tier of ~6: both fill up. On the
    # virtual clock (GPU-like step costs), so a slow CI machine sees the same deadlines.
    parts, rot = fresh(size=768, page_size=page_size, radix=radix, host_kv_gb=0.0001,
                       mover=mover, reserve_window_s=0.0)
    report = churn(parts, rot, requests=400, seed=page_size + radix, abort_p=0.01,
                   burst_every=15, clock=VirtualClock())
    assert report.arrived >= 400  # the last burst may carry past it
    assert report.finished + report.aborted == report.arrived
    assert report.idle_checks >= 1 and report.samples[-1]["table"] == 0
    assert rot.stats.rotations_out > 0 and rot.stats.rotations_in > 0
    assert rot.stats.plans_host_full > 0  # the small tier was full at times
    assert report.retracted > 0 and rot.stats.requeued == report.retracted
    assert report.aborted > 0


@pytest.mark.skipif(not os.environ.get("SUPERINFER_CHURN_S"),
                    reason="the long run: SUPERINFER_CHURN_S=<seconds>")
def test_long_churn_stays_flat(gpu_step_costs, capsys):
    seconds = float(os.environ["SUPERINFER_CHURN_S"])
    parts, rot = fresh(size=768, page_size=16, radix=True, host_kv_gb=0.0001,
                       reserve_window_s=0.0)
    # Lighter arrivals than the short runs' overload: idle periods come every few steps, each
    # one checked for leaks, one every 30 s sampled.
    report = churn(parts, rot, seconds=seconds, seed=7, abort_p=0.01, burst_every=40,
                   sample_every_s=30.0)
    samples = report.samples
    with capsys.disabled():
        print(json.dumps({"seconds": seconds, "steps": report.steps, "arrived": report.arrived,
                          "finished": report.finished, "aborted": report.aborted,
                          "retracted": report.retracted, "idle_checks": report.idle_checks,
                          "rotations_out": rot.stats.rotations_out,
                          "plans_host_full": rot.stats.plans_host_full,
                          "samples": samples}))
    assert report.finished + report.aborted == report.arrived
    # After the first tenth (warm-up: allocator and cache growth), the process stops growing.
    settled = [s for s in samples if s["t_s"] >= seconds / 10]
    assert settled[-1]["max_rss_mb"] <= settled[0]["max_rss_mb"] * 1.05 + 20
    assert settled[-1]["gc_objects"] <= settled[0]["gc_objects"] * 1.02 + 2000
