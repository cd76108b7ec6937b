"""eval.bench_policy drives the policy through its public API (events in, StepSnapshot plans
out): a short run of the benchmark's own scenario, so a change to that API cannot leave the
benchmark behind (it did once, unnoticed)."""

from __future__ import annotations

import pytest

from eval import bench_policy


@pytest.mark.parametrize("name,profiled", [("slo", True), ("slo", False), ("lvf", False)])
def test_a_short_benchmark_plans_and_rotates(name, profiled):
    profile = bench_policy.llama_profile() if profiled else None
    r = bench_policy.run(name, iterations=20, num_running=1024, num_waiting=4096,
                         decode_profile=profile)
    assert r["decode_profile"] is profiled and r["iterations"] == 20
    assert r["plan_ms_p50"] > 0 and r["plan_ms_max"] >= r["plan_ms_p99"]
    assert r["victims_chosen_per_iteration"] > 0  # memory is tight: the worst case is timed
